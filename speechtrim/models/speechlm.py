"""speechtrim's own speech LLM: Whisper encoder (valid frames) -> projector -> length adapter -> LLM.

The audio embeddings are spliced into a chat prompt at an ``<audio>`` marker and the LLM runs on ``inputs_embeds``.
The model knows where the audio sits in every row (``audio_spans``), which the token reducers need.
The projector is linear, or a ``VocabProjector`` whose outputs live in the LLM's embedding space and which carries a
CTC head over the LLM's tokens (``ctc_logits``). The encoder and the LLM are frozen; the LLM may get LoRA matrices
(``add_lora``, peft) that training updates and loading merges (``merge_lora``), so a loaded model's LLM is a plain
transformers model that every reducer attaches to. The length adapters' experiments keep the LLM frozen.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from speechtrim.adapters import LengthAdapter, build
from speechtrim.assets.whisper import valid_frames
from speechtrim.audio import WINDOW_SECONDS
from speechtrim.hf.layers import CACHE_KWARG, returned_cache
from speechtrim.inference import candidate_log_probs
from speechtrim.hf.prefix import PrefixCache, as_cache
from speechtrim.models.config import SpeechLMConfig
from speechtrim.models import prompting
from speechtrim.precision import compute_precision
from speechtrim.models.prompting import AUDIO_MARKER, SUMMARY_MARKER, PromptBatch
from speechtrim.models.vocab_projector import VocabProjector, ctc_greedy

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def audio_frames(num_samples: int, available: int, sample_rate: int = 16000) -> int:
    """Encoder frames kept for a clip of ``num_samples``: those carrying audio, at least 1, at most ``available``."""
    return max(1, min(valid_frames(num_samples, sample_rate), available))


class SpeechLM(nn.Module):
    """A frozen Whisper encoder and frozen causal LLM joined by a trainable projector and length adapter.

    Args:
        encoder: a Hugging Face Whisper-style encoder (``model.get_encoder()`` of WhisperForConditionalGeneration).
        feature_extractor: its feature extractor (log-mel, 30 s windows).
        llm: a Hugging Face causal LM.
        tokenizer: the LLM's tokenizer (with a chat template, or plain prompts are used).
        adapter: a length adapter name (``speechtrim.adapters.names()``) or a built module.
        adapter_params: options for the adapter when built by name.
        pool: stack this many adjacent encoder frames before the projector (1 = none); the projector's input is
            ``pool * encoder_width``.
        system_prompt: the chat's system turn; None keeps the tokenizer template's default, "" gives an empty one.
        projector: "linear" (one linear layer) or "vocab" (``VocabProjector``: outputs in the LLM's embedding space,
            with a CTC head over the LLM's vocabulary; ``projector_params`` must hold its ``vocab_ids``).
        projector_params: options of the projector.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_extractor: Any,
        llm: nn.Module,
        tokenizer: Any,
        adapter: str | LengthAdapter = "none",
        adapter_params: dict[str, Any] | None = None,
        pool: int = 1,
        system_prompt: str | None = None,
        projector: str = "linear",
        projector_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be an int >= 1, got {pool!r}")
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.llm = llm
        self.tokenizer = tokenizer
        self.pool = pool
        adapter_name = adapter if isinstance(adapter, str) else getattr(adapter, "name", type(adapter).__name__)
        self.speech_config = SpeechLMConfig(
            adapter=adapter_name, adapter_params=dict(adapter_params or {}), pool=pool, projector=projector,
            projector_params={k: v for k, v in (projector_params or {}).items() if k != "vocab_ids"},
            system_prompt=system_prompt)
        encoder_width = int(encoder.config.d_model)
        llm_width = int(llm.get_input_embeddings().embedding_dim)
        if projector == "linear":
            self.projector = nn.Linear(pool * encoder_width, llm_width)
        elif projector == "vocab":
            self.projector = VocabProjector(pool * encoder_width, llm_width, **(projector_params or {}))
        else:
            raise ValueError(f"projector must be 'linear' or 'vocab', got {projector!r}")
        self.adapter = adapter if isinstance(adapter, nn.Module) else build(adapter, dim=llm_width, **(adapter_params or {}))
        for frozen in (self.encoder, self.llm):
            frozen.requires_grad_(False)
            frozen.eval()
        self.audio_reduction = None  # a pre-LLM reducer's AudioReduction while `with reducer(self):` lasts
        # Reducers attached to the LLM resolve layer="auto" from the LLM alone, but a layer selection was measured
        # on what this model feeds it: the back-reference lets the selection's key cover the audio path too.
        llm.speechtrim_frontend = weakref.ref(self)

    @classmethod
    def from_config(cls, config: SpeechLMConfig, encoder: nn.Module, feature_extractor: Any, llm: nn.Module,
                    tokenizer: Any, vocab_ids: torch.Tensor | None = None) -> SpeechLM:
        """A SpeechLM around these frozen parts, put together as ``config`` says (untrained projector/adapter).

        Args:
            config: the settings (its ``lora`` is not applied here: ``load_speechlm`` loads and merges it).
            encoder, feature_extractor, llm, tokenizer: the frozen parts.
            vocab_ids: a vocabulary projector's token ids.
        """
        projector_params = dict(config.projector_params)
        if config.projector == "vocab":
            if vocab_ids is None:
                raise ValueError("a vocabulary projector needs its vocab_ids")
            projector_params["vocab_ids"] = vocab_ids
        model = cls(encoder, feature_extractor, llm, tokenizer, adapter=config.adapter,
                    adapter_params=config.adapter_params, pool=config.pool, system_prompt=config.system_prompt,
                    projector=config.projector, projector_params=projector_params)
        model.speech_config = replace(config, lora=None)
        return model

    def sharing(self, **changes: Any) -> SpeechLM:
        """A new SpeechLM on this one's frozen encoder and LLM with a fresh projector and adapter, its settings this
        one's with ``changes`` (e.g. ``adapter="conv"``); what the length-adapter experiments train."""
        config = replace(self.speech_config, **changes)
        return SpeechLM.from_config(config, self.encoder, self.feature_extractor, self.llm, self.tokenizer)

    def use_projector(self, projector: nn.Module, kind: str, params: dict[str, Any]) -> None:
        """Replace the projector (e.g. by a ``VocabProjector`` built from the training vocabulary) and record it.

        Args:
            projector: the new projector module.
            kind: "linear" or "vocab".
            params: its options as ``speechlm.json`` keeps them (without token ids).
        """
        self.projector = projector
        self.speech_config.projector, self.speech_config.projector_params = kind, dict(params)

    @property
    def system_prompt(self) -> str | None:
        """The chat's system turn (``speech_config.system_prompt``)."""
        return self.speech_config.system_prompt

    @system_prompt.setter
    def system_prompt(self, value: str | None) -> None:
        self.speech_config.system_prompt = value

    def train(self, mode: bool = True) -> SpeechLM:
        """Train mode for the projector and adapter only; the frozen parts stay in eval mode."""
        super().train(mode)
        self.encoder.eval()
        self.llm.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @property
    def has_ctc_head(self) -> bool:
        """Whether the projector scores the LLM's vocabulary (CTC), as ``ctc_logits`` needs."""
        return isinstance(self.projector, VocabProjector)

    # ---- audio -> embeddings -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, audios: list[np.ndarray], sample_rate: int = 16000, precision: str = "float32"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frozen encoder and keep the valid frames.

        Args:
            audios: float32 mono clips at ``sample_rate`` (at most 30 s each).
            sample_rate: their sample rate.
            precision: the encoder's matrix products ("bfloat16": under autocast, ``speechtrim.precision``);
                the frames come back float32 either way.
        Returns:
            frames (B, T_max, D_enc) and mask (B, T_max) bool, T_max = the longest clip's ceil(seconds * 50).
        """
        if not audios:
            raise ValueError("encode() needs at least one clip")
        seconds = [len(audio) / sample_rate for audio in audios]
        too_long = [f"#{i}: {s:.1f} s" for i, s in enumerate(seconds) if s > WINDOW_SECONDS]
        if too_long:
            raise ValueError(
                f"clips longer than the encoder's {WINDOW_SECONDS:.0f} s window: {too_long}; split them first "
                "(speechtrim.audio.split_windows) and pass the pieces as separate clips"
            )
        features = self.feature_extractor(
            list(audios), sampling_rate=sample_rate, return_tensors="pt"
        ).input_features  # (B, n_mels, 3000)
        hidden = self.encoder_frames(features, precision)  # (B, 1500, D_enc)
        lengths = torch.tensor([audio_frames(len(audio), hidden.shape[1], sample_rate) for audio in audios])
        longest = int(lengths.max())
        mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T_max)
        return hidden[:, :longest], mask.to(self.device)

    @torch.no_grad()
    def encoder_frames(self, input_features: torch.Tensor, precision: str = "float32") -> torch.Tensor:
        """The frozen encoder's output (B, 1500, D_enc), float32, for log-mel features (B, n_mels, 3000); its
        matrix products in ``precision`` ("bfloat16": under autocast, ``speechtrim.precision``)."""
        features = input_features.to(self.device, self.encoder.dtype)
        with compute_precision(precision, self.device):
            return self.encoder(input_features=features).last_hidden_state.float()

    def pool_frames(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack ``pool`` adjacent frames: (B, T, D_enc) -> (B, ceil(T/pool), pool * D_enc), with the new mask."""
        if self.pool == 1:
            return frames, mask
        batch, length, width = frames.shape
        pad = (-length) % self.pool
        frames = nn.functional.pad(frames * mask.unsqueeze(-1), (0, 0, 0, pad))
        frames = frames.reshape(batch, (length + pad) // self.pool, self.pool * width)
        lengths = torch.div(mask.sum(dim=1) + self.pool - 1, self.pool, rounding_mode="floor")
        mask = torch.arange(frames.shape[1], device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
        return frames, mask

    def project(self, frames: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pool and project: (B, T, D_enc) -> embeddings (B, T', D_llm), mask (B, T'), CTC logits (B, T', K+1) or
        None (a linear projector has no CTC head)."""
        frames, mask = self.pool_frames(frames, mask)
        if isinstance(self.projector, VocabProjector):
            projected, logits = self.projector(frames, self.llm.get_input_embeddings().weight, mask)
            return projected, mask, logits
        return self.projector(frames), mask, None

    def add_summary(self, tokens: int, hidden: int = 256) -> None:
        """Give the vocabulary projector an untrained utterance summary of ``tokens`` vectors (recorded in the
        settings, so a saved model rebuilds it)."""
        if not isinstance(self.projector, VocabProjector):
            raise ValueError("an utterance summary needs the vocabulary projector (projector='vocab')")
        self.projector.add_summary(tokens, hidden)
        self.speech_config.projector_params.update(summary_tokens=tokens, summary_hidden=hidden)

    def summarize(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The projector's utterance summary (B, n, D_llm) of encoder frames (B, T, D_enc), or None when it has
        none; ``build_inputs(..., summary=...)`` places it where a prompt has ``<audio_summary>``."""
        result = self.summary_and_logits(frames, mask)
        return None if result is None else result[0]

    def summary_and_logits(self, frames: torch.Tensor, mask: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The utterance summary (B, n, D_llm) and its scores over the LLM's vocabulary (B, n, V), or None."""
        if not isinstance(self.projector, VocabProjector) or self.projector.summary is None:
            return None
        pooled, pooled_mask = self.pool_frames(frames, mask)
        return self.projector.summarize(pooled, pooled_mask, self.llm.get_input_embeddings().weight)

    def embed_audio(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projector (after optional frame pooling) then length adapter: (B, T, D_enc) -> (B, T', D_llm)."""
        projected, mask, _ = self.project(frames, mask)
        return self.adapter(projected, mask)

    @torch.no_grad()
    def ctc_logits(self, audios: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The CTC head's logits over ``projector.vocab_ids`` + blank, (B, T', K+1), and the valid tokens per row (B,).

        The head scores the same audio tokens the LLM receives (one per ``pool`` encoder frames), so a reducer can
        read which of them carry a token and which are blank. Raises ValueError for a model without a CTC head.
        """
        if not self.has_ctc_head:
            raise ValueError("this SpeechLM's projector has no CTC head (projector='linear'); the embedded model "
                             "and models built with projector='vocab' have one")
        frames, mask = self.encode(audios)
        _, mask, logits = self.project(frames, mask)
        return logits, mask.sum(dim=1)

    def ctc_transcribe(self, audios: list[np.ndarray]) -> list[str]:
        """Greedy CTC transcripts from the projector's head alone (no LLM): a diagnostic of what the LLM is given."""
        return self.ctc_decode(*self.ctc_logits(audios))

    def ctc_decode(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Best-path text of CTC logits (B, T', K+1) with ``lengths`` (B,) valid tokens per row."""
        ids = ctc_greedy(logits, lengths, self.projector.vocab_ids, self.projector.blank)
        return [self.tokenizer.decode(row).strip() for row in ids]

    # ---- LoRA on the LLM -----------------------------------------------------------------------------------
    def add_lora(self, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = LORA_TARGETS) -> None:
        """Wrap the LLM with trainable LoRA matrices (peft); everything else of the LLM stays frozen."""
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise ValueError("this SpeechLM's LLM already has LoRA matrices")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
        self.llm = get_peft_model(self.llm, config)
        self.llm.eval()
        self.speech_config.lora = {"rank": rank, "alpha": alpha, "targets": list(targets)}

    @property
    def has_lora(self) -> bool:
        """Whether the LLM is wrapped with unmerged LoRA matrices."""
        return hasattr(self.llm, "peft_config")

    def merge_lora(self) -> None:
        """Fold the LoRA matrices into the LLM's weights: the LLM is a plain transformers model again."""
        if not self.has_lora:
            raise ValueError("this SpeechLM's LLM has no LoRA matrices to merge")
        self.llm = self.llm.merge_and_unload()
        self.llm.requires_grad_(False)
        self.llm.eval()

    # ---- prompts -------------------------------------------------------------------------------------------
    def render_prompt(self, user_text: str, assistant_prefix: str = "") -> str:
        """The chat-formatted prompt for one user message containing one ``<audio>`` marker (see
        :func:`speechtrim.models.prompting.render_prompt`)."""
        return prompting.render_prompt(self.tokenizer, self.system_prompt, user_text, assistant_prefix)

    def build_inputs(self, prompts: list[str], audio_embeds: torch.Tensor, audio_mask: torch.Tensor,
                     targets: list[str] | None = None, assistant_prefix: str | list[str] = "",
                     prefix_cache: PrefixCache | None = None, summary: torch.Tensor | None = None) -> PromptBatch:
        """Splice each row's real audio embeddings (and utterance summary) into its prompt; left-pad the batch
        (see :func:`speechtrim.models.prompting.build_inputs` for the arguments)."""
        return prompting.build_inputs(self, prompts, audio_embeds, audio_mask, targets, assistant_prefix,
                                      prefix_cache, summary)

    def _prefix_kwargs(self, batch: PromptBatch) -> dict[str, Any]:
        """The LLM keyword that passes a fresh cache holding the batch's prefix (none without one)."""
        return {} if batch.prefix is None else {CACHE_KWARG: as_cache(batch.prefix, self.llm.config)}

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long, device=self.device)

    # ---- running -------------------------------------------------------------------------------------------
    def prepare(
        self, audios: list[np.ndarray], prompts: list[str], targets: list[str] | None = None,
        assistant_prefix: str | list[str] = "",
    ) -> PromptBatch:
        """Encode, project, adapt (reduce, while a pre-LLM reducer is attached) and splice: the whole way from
        waveforms to LLM inputs."""
        frames, mask = self.encode(audios)
        asked = any(SUMMARY_MARKER in prompt for prompt in prompts)
        summary = self.summarize(frames, mask) if asked else None  # (B, n, D_llm): what the reducers leave alone
        projected, projected_mask, logits = self.project(frames, mask)
        embeds, embeds_mask = self.adapter(projected, projected_mask)
        if self.audio_reduction is not None:
            full = self.build_inputs(prompts, embeds, embeds_mask, assistant_prefix=assistant_prefix,
                                     summary=summary)  # text counts (the summary counts as text)
            text_tokens = (full.attention_mask.sum(dim=1) - embeds_mask.sum(dim=1)).tolist()
            embeds, embeds_mask = self.audio_reduction.reduce(embeds, embeds_mask, logits, text_tokens)
        batch = self.build_inputs(prompts, embeds, embeds_mask, targets, assistant_prefix, summary=summary)
        if logits is not None:  # the CTC head's view of the whole audio, for generate(..., ctc_weight=)
            batch.extra["ctc_logits"], batch.extra["ctc_lengths"] = logits, projected_mask.sum(dim=1)
        return batch

    def loss(self, batch: PromptBatch, reduction: str = "tokens") -> torch.Tensor:
        """Cross-entropy of the target tokens (``build_inputs(..., targets=...)``) under the LLM.

        Args:
            batch: prompts built with ``targets=``.
            reduction: "tokens" averages over every target token of the batch (long answers dominate); "rows"
                averages each row's token mean over the rows, so a one-word answer weighs as much as a transcript.
        """
        if "target_spans" not in batch.extra:
            raise ValueError("loss() needs a batch built with targets=")
        if reduction not in ("tokens", "rows"):
            raise ValueError(f"reduction must be 'tokens' or 'rows', got {reduction!r}")
        length = batch.inputs_embeds.shape[1]
        first = min(start for start, _ in batch.extra["target_spans"]) - 1  # the earliest position that predicts one
        logits = self.llm(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            logits_to_keep=length - first,  # the LM head runs only where a target token is predicted
            **self._prefix_kwargs(batch),
        ).logits  # (B, T - first, V)
        losses = []
        for row, ((start, end), ids) in enumerate(zip(batch.extra["target_spans"], batch.extra["target_ids"])):
            predicted = logits[row, start - 1 - first : end - 1 - first]  # token t is predicted at position t-1
            losses.append(nn.functional.cross_entropy(predicted.float(), ids, reduction="sum"))
        if reduction == "rows":
            counts = torch.tensor([len(ids) for ids in batch.extra["target_ids"]], device=logits.device)
            return (torch.stack(losses) / counts).mean()
        total_tokens = sum(len(ids) for ids in batch.extra["target_ids"])
        return torch.stack(losses).sum() / total_tokens

    @torch.no_grad()
    def score(self, batch: PromptBatch, candidates: list[str]) -> torch.Tensor:
        """Log-probability of each candidate answer after each prompt: (B, C). Reads a label without parsing text."""
        if not candidates:
            raise ValueError("score() needs at least one candidate")
        out = self.llm(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,
            logits_to_keep=1,  # only the last position's next-token distribution is read
            **self._prefix_kwargs(batch),
        )
        return candidate_log_probs(self.llm, out.logits[:, -1], returned_cache(out), batch.attention_mask,
                                   batch.position_ids, [self._ids(text).tolist() for text in candidates])

    @torch.no_grad()
    def generate(self, batch: PromptBatch, max_new_tokens: int = 64, ctc_weight: float = 0.0,
                 **generate_kwargs: Any) -> list[str]:
        """Greedy (or any ``generate`` option) continuation of each prompt, decoded to text.

        Args:
            batch: from ``prepare`` (or ``build_inputs``).
            max_new_tokens: most tokens generated per row.
            ctc_weight: > 0 rescores the LLM's beam hypotheses with the CTC head (joint CTC/attention decoding,
                as hybrid ASR systems do): beam search (``num_beams`` >= 2, required) returns every finished beam,
                each is scored ``(1 - w) * its LLM score + w * its CTC log-likelihood``, both per token, and the
                best is returned. The text is always one the LLM generated; the head only chooses among them. A
                hypothesis the head cannot spell (empty, or a token outside its vocabulary) loses to one it can;
                when it can spell none, the LLM's best beam is returned. Needs a batch from ``prepare`` of a model with a CTC
                head; the hypotheses are spelled as the head is trained (``ctc_token_ids``).
            generate_kwargs: passed to ``transformers`` ``generate`` (``num_beams``, ``length_penalty``, ...).
        """
        if batch.prefix is not None:
            raise ValueError("generate() runs the whole prompt in one prefill: build the batch without prefix_cache")
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1] (0: the LLM alone), got {ctc_weight}")
        generate_kwargs.setdefault("do_sample", False)
        if self.tokenizer.pad_token_id is not None:
            generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if ctc_weight > 0:
            return self._generate_rescored(batch, max_new_tokens, ctc_weight, generate_kwargs)
        output = self.llm.generate(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            **generate_kwargs,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def _generate_rescored(self, batch: PromptBatch, max_new_tokens: int, ctc_weight: float,
                           generate_kwargs: dict[str, Any]) -> list[str]:
        """``generate(..., ctc_weight > 0)``: the LLM's beams, the best by the joint LLM + CTC score."""
        from speechtrim.models.joint_decoding import rescored_generate  # refuses fewer than 2 beams, or sampling

        if "ctc_logits" not in batch.extra:
            raise ValueError("ctc_weight > 0 needs the CTC head's logits: build the batch with prepare() of a model "
                             "with a CTC head (projector='vocab', as the embedded model has)")
        return rescored_generate(self.llm, self.tokenizer, self.projector, batch.inputs_embeds, batch.attention_mask,
                                 batch.extra["ctc_logits"], batch.extra["ctc_lengths"], max_new_tokens, ctc_weight,
                                 **generate_kwargs)


__all__ = ["AUDIO_MARKER", "PromptBatch", "SpeechLM", "SpeechLMConfig", "audio_frames"]
