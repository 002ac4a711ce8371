"""The packaged assets that ``speechtrim assets list|prepare|status`` knows, and where each one stands."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechtrim.assets.cache import folder_bytes, package_version


@dataclass(frozen=True)
class Asset:
    """One packaged model: which PyPI packages carry it, and how to convert it into the cache."""

    name: str
    kind: str
    description: str
    license: str
    distributions: tuple[str, ...]
    cache_dir: Callable[[], Path]
    prepare: Callable[[], Path]

    def status(self) -> dict[str, Any]:
        """Installed packages, whether the conversion is in the cache, where, and how big."""
        installed = all(package_version(dist) is not None for dist in self.distributions)
        folder: Path | None = None
        if installed:
            folder = self.cache_dir()
        prepared = folder is not None and (folder / "speechtrim.json").is_file()
        return {
            "name": self.name,
            "kind": self.kind,
            "installed": installed,
            "prepared": prepared,
            "size_mb": round(folder_bytes(folder) / 2**20, 1) if prepared else 0.0,
            "license": self.license,
            "path": str(folder) if prepared else "",
            "packages": list(self.distributions),
            "description": self.description,
        }


def catalog() -> list[Asset]:
    """Every packaged asset, in the order ``assets prepare`` converts them."""
    from speechtrim.assets import llm, whisper

    assets = []
    for name, spec in whisper.PACKAGED_WHISPER.items():
        assets.append(
            Asset(
                name=f"whisper-{name}",
                kind="audio encoder + ASR",
                description=spec.description,
                license=spec.license,
                distributions=tuple(spec.distributions),
                cache_dir=lambda name=name: whisper.whisper_cache_dir(name),
                prepare=lambda name=name: whisper.prepare_whisper(name),
            )
        )
    for name, spec in llm.PACKAGED_LLMS.items():
        assets.append(
            Asset(
                name=name,
                kind="causal LLM",
                description=spec.description,
                license=spec.license,
                distributions=(spec.distribution,),
                cache_dir=lambda name=name: llm.llm_cache_dir(name),
                prepare=lambda name=name: llm.prepare_llm(name),
            )
        )
    return assets
