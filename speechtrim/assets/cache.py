"""Where converted assets live, and how files are written so that a crash never leaves half of one.

The cache root is ``$SPEECHTRIM_CACHE`` when set, else ``$XDG_CACHE_HOME/speechtrim``, else
``~/.cache/speechtrim``. Each converted asset gets its own folder keyed by the source package version and a
checksum of the source files, so an upgraded package is converted again and an old conversion is never reused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "SPEECHTRIM_CACHE"


def cache_root() -> Path:
    """The folder that holds every converted asset (created on first use)."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "speechtrim"
    else:
        root = Path.home() / ".cache" / "speechtrim"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_files(paths: list[Path], chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 of the concatenated bytes of ``paths`` (in order), as hex."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def package_file(distribution: str, relative: str, install_hint: str) -> Path:
    """Path of a data file inside an installed distribution, without importing the package.

    Raises:
        FileNotFoundError: the distribution is not installed or lacks the file; the message says how to install it.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the package {distribution!r} is not installed; install it with: {install_hint}"
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} {dist.version} has no file {relative!r}; reinstall it: {install_hint}")
    return path


def recorded_sha256(distribution: str, relative: str) -> str:
    """Hex SHA-256 of a file as the distribution's RECORD lists it (checked by pip at install; no re-hashing).

    Falls back to hashing the installed file when the RECORD has no entry for it.
    """
    dist = importlib.metadata.distribution(distribution)
    for entry in dist.files or []:
        if str(entry) == relative and entry.hash is not None and entry.hash.mode == "sha256":
            padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
            return base64.urlsafe_b64decode(padded).hex()
    return sha256_files([Path(str(dist.locate_file(relative)))])


def package_version(distribution: str) -> str | None:
    """Installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it is renamed to ``final`` in one step.

    On any exception the temporary folder is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; a shared cache must stay readable
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``final`` for writing; it replaces ``final`` only when the block succeeds.

    The file gets the mode a plain ``open`` would give (0666 less the umask), not ``mkstemp``'s 0600.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    try:
        os.chmod(staging, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


def write_json_atomic(final: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``final`` atomically."""
    with atomic_file(final) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def hub_source(name: str, kind: str, packaged: list[str]) -> str:
    """Return ``name`` if it is a local folder or a reachable Hugging Face model, else a ValueError that lists the
    packaged names that work without a network.

    Args:
        name: a local folder or a Hugging Face model id.
        kind: what is being loaded, for the message (e.g. "Whisper", "LLM").
        packaged: the packaged names of that kind.
    """
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError, HFValidationError) as error:
        raise ValueError(
            f"cannot load {kind} {name!r}: it is neither a local folder nor a reachable Hugging Face model "
            f"({error.__class__.__name__}). Without a network, use a packaged one: {sorted(packaged)}"
        ) from None
    return name
