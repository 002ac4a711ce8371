"""Read CTranslate2 ``model.bin`` files (possibly split into several parts) into torch tensors.

Layout (little-endian, binary version 4 and later):

    u32 version
    str spec name, u32 spec revision                       (strings: u16 length incl. NUL, bytes, NUL)
    u32 variable count
    per variable: str name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, data
    u32 alias count, per alias: str alias, str target name

dtype codes: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. A model split into parts
(``model.bin.part1``, ``model.bin.part2``, ...) is read as one stream, without joining the parts on disk.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

logger = logging.getLogger(__name__)

CT2_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
MIN_VERSION = 4  # older files store an item size instead of a dtype code


class CT2FormatError(ValueError):
    """A CTranslate2 model file is truncated, corrupt or of an unsupported version."""


@dataclass
class CT2Model:
    """The content of one CTranslate2 model file.

    Args:
        spec: spec class name, e.g. ``"WhisperSpec"``.
        revision: spec revision.
        version: binary format version.
        variables: variable name -> tensor (dtype as stored).
        aliases: alias name -> name of the variable it stands for.
    """

    spec: str
    revision: int
    version: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> torch.Tensor:
        """The tensor stored under ``name`` or under the variable that ``name`` aliases."""
        return self.variables[self.aliases.get(name, name)]


class _PartStream:
    """Sequential reader over the concatenation of several files; errors name the file and offset."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.index = 0
        self.offset = 0  # offset in the current file
        self.total = 0  # offset in the joined stream
        self.handle: BinaryIO | None = open(paths[0], "rb")

    def describe(self) -> str:
        if len(self.paths) == 1:
            return f"{self.paths[0]} (byte {self.total})"
        names = " + ".join(str(p) for p in self.paths)
        return f"{names} (byte {self.total} of the joined parts)"

    def read_into(self, buffer: memoryview, what: str) -> None:
        filled = 0
        while filled < len(buffer):
            got = self.handle.readinto(buffer[filled:]) if self.handle is not None else 0
            if got:
                filled += got
                self.offset += got
                self.total += got
                continue
            if self.index + 1 >= len(self.paths):
                raise CT2FormatError(
                    f"CTranslate2 file is truncated: needed {len(buffer) - filled} more bytes for {what} at end of "
                    f"{self.describe()}; the file is incomplete or corrupt, reinstall or re-download it"
                )
            self.handle.close()
            self.index += 1
            self.offset = 0
            self.handle = open(self.paths[self.index], "rb")

    def read(self, count: int, what: str) -> bytes:
        buffer = bytearray(count)
        self.read_into(memoryview(buffer), what)
        return bytes(buffer)

    def at_end(self) -> bool:
        """True when no byte is left in this file or any later part."""
        while self.handle is not None:
            if self.handle.read(1):
                return False
            if self.index + 1 >= len(self.paths):
                return True
            self.handle.close()
            self.index += 1
            self.handle = open(self.paths[self.index], "rb")
        return True

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _unpack(stream: _PartStream, fmt: str, what: str) -> int:
    return struct.unpack("<" + fmt, stream.read(struct.calcsize(fmt), what))[0]


def _read_string(stream: _PartStream, what: str) -> str:
    length = _unpack(stream, "H", f"the length of {what}")
    raw = stream.read(length, what)
    if length == 0 or raw[-1] != 0:
        raise CT2FormatError(f"corrupt CTranslate2 file: {what} is not NUL-terminated in {stream.describe()}")
    try:
        return raw[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise CT2FormatError(f"corrupt CTranslate2 file: {what} is not UTF-8 in {stream.describe()}") from None


def read_ct2(paths: Path | str | list[Path | str], max_rank: int = 8) -> CT2Model:
    """Read a CTranslate2 ``model.bin``, or the ordered parts of one, into torch tensors.

    Args:
        paths: the model file, or its parts in order (they are streamed, never joined on disk).
        max_rank: largest tensor rank accepted; a larger one means the file is corrupt.

    Raises:
        CT2FormatError (a ValueError): the file is truncated, corrupt or of an unsupported version; the
            message names the file.
    """
    part_paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    if not part_paths:
        raise ValueError("read_ct2 needs at least one file; pass the path of model.bin or of its parts")
    for path in part_paths:
        if not path.is_file():
            raise FileNotFoundError(f"CTranslate2 model file not found: {path}")
    stream = _PartStream(part_paths)
    try:
        version = _unpack(stream, "I", "the binary version")
        if version < MIN_VERSION or version > 64:
            raise CT2FormatError(
                f"unsupported CTranslate2 binary version {version} in {stream.describe()}; versions >= {MIN_VERSION} "
                "are supported: re-export the model with a recent ctranslate2 converter"
            )
        spec = _read_string(stream, "the spec name")
        revision = _unpack(stream, "I", "the spec revision")
        count = _unpack(stream, "I", "the variable count")
        model = CT2Model(spec=spec, revision=revision, version=version)
        for number in range(count):
            name = _read_string(stream, f"the name of variable {number}")
            rank = _unpack(stream, "B", f"the rank of {name!r}")
            if rank > max_rank:
                raise CT2FormatError(f"corrupt CTranslate2 file: {name!r} has rank {rank} in {stream.describe()}")
            shape = struct.unpack(f"<{rank}I", stream.read(4 * rank, f"the shape of {name!r}"))
            code = _unpack(stream, "B", f"the dtype of {name!r}")
            if code not in CT2_DTYPES:
                raise CT2FormatError(
                    f"unknown dtype code {code} for {name!r} in {stream.describe()}; known codes: {sorted(CT2_DTYPES)}"
                )
            dtype = CT2_DTYPES[code]
            num_bytes = _unpack(stream, "I", f"the byte count of {name!r}")
            expected = dtype.itemsize * int(torch.Size(shape).numel())
            if num_bytes != expected:
                raise CT2FormatError(
                    f"corrupt CTranslate2 file: {name!r} of shape {list(shape)} and {dtype} should hold {expected} "
                    f"bytes, the file says {num_bytes}, in {stream.describe()}"
                )
            buffer = bytearray(num_bytes)
            stream.read_into(memoryview(buffer), f"the data of {name!r}")
            if num_bytes:
                tensor = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
            else:
                tensor = torch.empty(shape, dtype=dtype)
            if name in model.variables:
                raise CT2FormatError(f"corrupt CTranslate2 file: {name!r} appears twice in {stream.describe()}")
            model.variables[name] = tensor
        alias_count = _unpack(stream, "I", "the alias count")
        for number in range(alias_count):
            alias = _read_string(stream, f"alias {number}")
            target = _read_string(stream, f"the target of alias {alias!r}")
            model.aliases[alias] = target
        if not stream.at_end():
            raise CT2FormatError(
                f"corrupt CTranslate2 file: unexpected bytes after the aliases in {stream.describe()}; "
                "check that the parts are complete and given in order"
            )
    finally:
        stream.close()
    logger.debug("read %s rev %d: %d variables, %d aliases", spec, revision, len(model.variables), len(model.aliases))
    return model


def ct2_string(tensor: torch.Tensor) -> str:
    """Decode a variable that CTranslate2 stores as a string (an int8 array of UTF-8 bytes)."""
    return bytes(tensor.to(torch.uint8).tolist()).decode("utf-8")
