"""The CTranslate2 model.bin reader: exact round trip of every dtype, split files, and clear errors on damage."""

import struct
from pathlib import Path

import pytest
import torch

from speechtrim.assets.ct2 import CT2FormatError, read_ct2

DTYPE_CODES = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: dict, spec: str = "WhisperSpec", revision: int = 3, aliases: dict | None = None) -> bytes:
    """Serialise tensors in the CTranslate2 model.bin layout (binary version 6), written independently of the reader."""
    out = [struct.pack("<I", 6), _string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, tensor in variables.items():
        tensor = tensor.contiguous()
        plain = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
        data = plain.numpy().tobytes()
        out += [_string(name), struct.pack("<B", tensor.dim()), struct.pack(f"<{tensor.dim()}I", *tensor.shape)]
        out += [struct.pack("<B", DTYPE_CODES[tensor.dtype]), struct.pack("<I", len(data)), data]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    return b"".join(out)


def write_ct2(path: Path, variables: dict, **kwargs) -> Path:
    """Write ``variables`` as a CTranslate2 model.bin at ``path``."""
    path.write_bytes(ct2_bytes(variables, **kwargs))
    return path


def _variables() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "encoder/weight": torch.randn(3, 4, 2, generator=generator),
        "decoder/half": torch.randn(5, 7, generator=generator).half(),
        "decoder/brain": torch.randn(6, generator=generator).bfloat16(),
        "decoder/count": torch.tensor(6, dtype=torch.int16),
        "decoder/flag": torch.tensor(1, dtype=torch.int8),
        "decoder/ids": torch.randint(-(2**31), 2**31 - 1, (4, 2), dtype=torch.int32, generator=generator),
        "decoder/bytes": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=generator),
        "decoder/empty": torch.zeros(0, 3),
    }


def _assert_same(read, variables):
    assert list(read.variables) == list(variables)
    for name, tensor in variables.items():
        got = read.variables[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got, tensor), name


def test_round_trip_every_dtype(tmp_path):
    variables = _variables()
    path = write_ct2(tmp_path / "model.bin", variables, revision=7, aliases={"decoder/alias": "decoder/half"})
    read = read_ct2(path)
    assert (read.spec, read.revision, read.version) == ("WhisperSpec", 7, 6)
    _assert_same(read, variables)
    assert read.aliases == {"decoder/alias": "decoder/half"}
    assert torch.equal(read.resolve("decoder/alias"), variables["decoder/half"])


@pytest.mark.parametrize("cuts", [[1], [37], [200, 201], [150, 300, 301]])
def test_split_parts_read_as_one(tmp_path, cuts):
    variables = _variables()
    blob = ct2_bytes(variables, aliases={"a": "decoder/ids"})
    bounds = [0, *cuts, len(blob)]
    parts = []
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        part = tmp_path / f"model.bin.part{index + 1}"
        part.write_bytes(blob[start:end])  # a part may be empty
        parts.append(part)
    read = read_ct2(parts)
    _assert_same(read, variables)
    assert read.aliases == {"a": "decoder/ids"}
    assert not (tmp_path / "model.bin").exists()


@pytest.mark.parametrize("keep", [2, 10, 60, -5, -1])
def test_truncated_file_names_the_file(tmp_path, keep):
    blob = ct2_bytes(_variables())
    path = tmp_path / "broken_model.bin"
    path.write_bytes(blob[:keep])
    with pytest.raises(ValueError, match="truncated.*broken_model.bin"):
        read_ct2(path)


def test_missing_part_is_reported_with_every_part(tmp_path):
    blob = ct2_bytes(_variables())
    first = tmp_path / "model.bin.part1"
    first.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CT2FormatError, match="model.bin.part1"):
        read_ct2(first)


def test_parts_in_wrong_order_are_refused(tmp_path):
    blob = ct2_bytes(_variables())
    one, two = tmp_path / "p1", tmp_path / "p2"
    one.write_bytes(blob[:100])
    two.write_bytes(blob[100:])
    with pytest.raises(ValueError, match="p2 \\+ p1|p2.*p1"):
        read_ct2([two, one])


def test_corrupt_dtype_and_trailing_bytes(tmp_path):
    variables = {"x": torch.ones(2)}
    blob = bytearray(ct2_bytes(variables))
    dtype_at = 4 + len(_string("WhisperSpec")) + 8 + len(_string("x")) + 1 + 4
    assert blob[dtype_at] == 0
    blob[dtype_at] = 42
    (tmp_path / "bad_dtype.bin").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="dtype code 42.*bad_dtype.bin"):
        read_ct2(tmp_path / "bad_dtype.bin")
    (tmp_path / "tail.bin").write_bytes(ct2_bytes(variables) + b"\0")
    with pytest.raises(ValueError, match="unexpected bytes.*tail.bin"):
        read_ct2(tmp_path / "tail.bin")


def test_old_version_and_missing_file(tmp_path):
    (tmp_path / "old.bin").write_bytes(struct.pack("<I", 3) + ct2_bytes({})[4:])
    with pytest.raises(ValueError, match="unsupported CTranslate2 binary version 3.*old.bin"):
        read_ct2(tmp_path / "old.bin")
    with pytest.raises(FileNotFoundError, match="nothere.bin"):
        read_ct2(tmp_path / "nothere.bin")
