"""The settings a SpeechLM is put together from: what ``speechlm.json`` holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class SpeechLMConfig:
    """Everything ``speechlm.json`` holds: how a SpeechLM is put together around its trained weights.

    Args:
        encoder: the packaged Whisper it uses (``speechtrim.assets.whisper``); None for one built in code.
        llm: the packaged LLM (``speechtrim.assets.llm``); None for one built in code.
        adapter: the length adapter's registered name.
        adapter_params: its options.
        pool: encoder frames stacked per audio token.
        projector: "linear" or "vocab".
        projector_params: the projector's options (a vocabulary projector's token ids live in the weights).
        system_prompt: the chat's system turn (None: the template's default; "": none).
        lora: rank, alpha and targets of the LoRA matrices trained on the LLM (None: the LLM is untouched).
        extra: what the training recorded with the weights (task, labels, data, ...).
    """

    encoder: str | None = None
    llm: str | None = None
    adapter: str = "none"
    adapter_params: dict[str, Any] = field(default_factory=dict)
    pool: int = 1
    projector: str = "linear"
    projector_params: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    lora: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of ``speechlm.json`` (``extra``'s keys beside the others)."""
        data = asdict(self)
        return {**data.pop("extra"), **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpeechLMConfig:
        """Read ``speechlm.json``: known keys fill the fields, the others go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        config = cls(**{key: value for key, value in data.items() if key in known})
        config.extra = {key: value for key, value in data.items() if key not in known}
        config.adapter_params = dict(config.adapter_params or {})
        config.projector_params = dict(config.projector_params or {})
        return config


__all__ = ["SpeechLMConfig"]
