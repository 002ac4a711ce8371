"""Building, saving and loading a SpeechLM: packaged encoder and LLM around the trained projector, adapter and LoRA.

``save_trained`` writes the trained parts (safetensors) and the ``SpeechLMConfig`` (``speechlm.json``);
``load_speechlm`` rebuilds the model from them, merging the LoRA matrices into the LLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from speechtrim.models.config import SpeechLMConfig
from speechtrim.models.speechlm import SpeechLM

TRAINED_FILE = "projector_adapter.safetensors"
CONFIG_FILE = "speechlm.json"


def build_speechlm(
    encoder: str = "base", llm: str = "smollm2-135m", adapter: str = "none",
    adapter_params: dict[str, Any] | None = None, pool: int = 1, seed: int = 0, projector: str = "linear",
    projector_params: dict[str, Any] | None = None,
) -> SpeechLM:
    """A SpeechLM from packaged (or hub) Whisper and LLM names, with a freshly seeded projector and adapter.

    Args:
        encoder: Whisper name for ``speechtrim.assets.load_whisper`` ("base", "tiny.en", hub id, folder).
        llm: LLM name for ``speechtrim.assets.load_llm`` ("smollm2-135m", hub id, folder).
        adapter: length adapter name.
        adapter_params: adapter options.
        pool: encoder frames stacked before the projector.
        seed: seed of the trainable parts' initialisation.
        projector: "linear" or "vocab" (see ``SpeechLM``).
        projector_params: projector options ("vocab" needs ``vocab_ids``).
    """
    from speechtrim.assets.llm import load_llm
    from speechtrim.assets.whisper import load_whisper

    whisper, processor = load_whisper(encoder)
    language_model, tokenizer = load_llm(llm)
    torch.manual_seed(seed)
    model = SpeechLM(whisper.get_encoder(), processor.feature_extractor, language_model, tokenizer,
                     adapter=adapter, adapter_params=adapter_params, pool=pool, projector=projector,
                     projector_params=projector_params)
    model.speech_config.encoder, model.speech_config.llm = encoder, llm
    return model


def trained_state(model: SpeechLM) -> dict[str, torch.Tensor]:
    """Everything of ``model`` that training changed: projector and adapter weights, and LoRA matrices (``lora.``)."""
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()
             if name.startswith(("projector.", "adapter."))}
    if model.has_lora:
        from peft import get_peft_model_state_dict

        state.update({f"lora.{name}": tensor.detach() for name, tensor in get_peft_model_state_dict(model.llm).items()})
    return state


def save_trained(model: SpeechLM, folder: str | Path, extra: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Save the trained parts (safetensors; LoRA matrices unmerged) and the settings that rebuild the rest
    (``speech_config`` as speechlm.json).

    Args:
        model: a SpeechLM whose encoder and LLM are packaged ones (``build_speechlm``).
        folder: where to write (atomically).
        extra: more fields for speechlm.json.
        dtype: store floating-point weights in this type (e.g. torch.float16 to halve the file); None keeps theirs.
    """
    from safetensors.torch import save_file

    import os

    from speechtrim.assets.cache import atomic_dir, current_umask, write_json_atomic

    folder = Path(folder)
    config = model.speech_config
    if config.encoder is None or config.llm is None:
        raise ValueError("this SpeechLM's encoder or LLM is not a packaged one (speech_config.encoder / .llm are "
                         "None), so it could not be rebuilt from the saved weights; build it with build_speechlm")
    if config.lora and not model.has_lora:
        raise ValueError("this SpeechLM's LoRA matrices are merged into its LLM (as load_speechlm does), so they "
                         "cannot be saved apart; save the model before merge_lora()")
    with atomic_dir(folder) as staging:
        state = {name: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
                 for name, tensor in trained_state(model).items()}
        save_file(state, str(staging / TRAINED_FILE))
        os.chmod(staging / TRAINED_FILE, 0o666 & ~current_umask())  # safetensors writes 0600; keep the user's umask
        write_json_atomic(staging / CONFIG_FILE, {**config.to_json(), **(extra or {})})
    return folder


def load_speechlm(folder: str | Path, merge: bool = True) -> SpeechLM:
    """Rebuild a SpeechLM saved by ``save_trained``: packaged encoder and LLM, trained projector and adapter, and
    the LoRA matrices (if any) merged into the LLM's weights, so the LLM is a plain transformers model.

    Args:
        folder: what ``save_trained`` wrote.
        merge: fold the LoRA matrices into the LLM (False keeps them apart: to train further and save again).
    """
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / TRAINED_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a saved SpeechLM: it needs {CONFIG_FILE} and {TRAINED_FILE}")
    config = SpeechLMConfig.from_json(json.loads((folder / CONFIG_FILE).read_text()))
    state = load_file(str(folder / TRAINED_FILE))
    projector_params = dict(config.projector_params)
    if config.projector == "vocab":
        projector_params["vocab_ids"] = state["projector.vocab_ids"]
    model = build_speechlm(config.encoder, config.llm, config.adapter, config.adapter_params, config.pool,
                           projector=config.projector, projector_params=projector_params)
    lora_state = {name[len("lora."):]: tensor for name, tensor in state.items() if name.startswith("lora.")}
    if config.lora:
        from peft import set_peft_model_state_dict

        model.add_lora(**config.lora)
        result = set_peft_model_state_dict(model.llm, lora_state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: LoRA weights do not fit speechlm.json (unexpected {result.unexpected_keys})")
        if merge:
            model.merge_lora()
    elif lora_state:
        raise ValueError(f"{folder}: the weights hold LoRA matrices but speechlm.json has no 'lora' entry")
    own = {name: tensor for name, tensor in state.items() if not name.startswith("lora.")}
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [name for name in missing if name.startswith(("projector.", "adapter."))]
    if missing or unexpected:
        raise ValueError(f"{folder}: trained weights do not fit speechlm.json (missing {missing}, unexpected "
                         f"{unexpected})")
    model.speech_config = config
    return model.eval()


__all__ = ["CONFIG_FILE", "TRAINED_FILE", "build_speechlm", "load_speechlm", "save_trained", "trained_state"]
