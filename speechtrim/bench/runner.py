"""Timed inference of one clip with or without a reducer: prefill, label scoring, greedy decode, system metrics.

The benchmark drives the model step by step rather than through ``generate()`` so that prefill and decode are timed
apart (FastAdaSP eq. 9) and the KV cache can be measured right after prefill. The loop is exactly what greedy
``generate()`` does for one prompt: one prefill forward, then one forward per new token with the 2-D attention mask
grown by one column and the next position id; it stops at an end-of-sequence token.

Models: :class:`EmbeddedModel` wraps speechtrim's own :class:`~speechtrim.models.speechlm.SpeechLM` (audio longer
than the encoder's 30 s window is split into windows whose embeddings are concatenated), :class:`HubModel` a Hugging
Face speech LLM whose processor expands the audio tokens (Qwen2-Audio, Voxtral, Granite-Speech, ...).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speechtrim.eval.harness import EvalItem
from speechtrim.hf.kv_evict import kv_cache_bytes
from speechtrim.hf.layers import returned_cache, text_backbone
from speechtrim.inference import candidate_log_probs, greedy_continue
from speechtrim.models.prompting import AUDIO_MARKER, SUMMARY_MARKER

logger = logging.getLogger(__name__)

EMBEDDED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "embedded"


@dataclass
class Prepared:
    """A clip ready for the decoder: the prefill kwargs and where its audio tokens are (batch of one).

    Args:
        kwargs: keyword arguments of the prefill forward (``inputs_embeds``/``input_ids``, ``attention_mask``, ...).
        audio_spans: [[(start, end)]] for the reducers, or None when the model's audio token id finds them.
        length: prompt tokens entering the decoder.
        audio_tokens: audio tokens among them.
        encode_s: seconds spent turning the waveform into these inputs (encoder, projector, splice).
        reduce_audio: for a model whose audio embeddings speechtrim splices itself, ``reduce_audio(reducer)`` gives
            the clip with its audio embeddings reduced by a pre-LLM method and that method's statistics; None:
            pre-LLM methods run on the decoder's input embeddings (``reducer(decoder)``).
    """

    kwargs: dict[str, Any]
    audio_spans: list[list[tuple[int, int]]] | None
    length: int
    audio_tokens: int
    encode_s: float = 0.0
    reduce_audio: Callable[[Any], tuple[Prepared, Any]] | None = None


class _Fingerprinted:
    """A bench model whose ``weights`` module is hashed once into ``fingerprint``, what bench rows are keyed by."""

    weights: nn.Module

    @property
    def fingerprint(self) -> str:
        """BLAKE2b of every weight (``speechtrim.fingerprint.module_fingerprint``), computed once."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            from speechtrim.fingerprint import module_fingerprint

            cached = self.__dict__["_fingerprint"] = module_fingerprint(self.weights)
        return cached


class EmbeddedModel(_Fingerprinted):
    """speechtrim's SpeechLM (Whisper encoder -> projector -> adapter -> frozen LLM) behind the bench interface.

    Args:
        speechlm: a built or loaded :class:`~speechtrim.models.speechlm.SpeechLM`.
        name: how rows name the model.
        trained: False when the projector is untrained (task metrics are then meaningless).
    """

    def __init__(self, speechlm: nn.Module, name: str = "embedded", trained: bool = True) -> None:
        self.speechlm = speechlm
        self.name = name
        self.trained = trained
        self.tokenizer = speechlm.tokenizer
        self.weights = speechlm  # encoder, projector, adapter and LLM: all of it decides a row

    @property
    def decoder(self) -> nn.Module:
        """The module the reducers attach to and the loop calls."""
        return self.speechlm.llm

    @torch.no_grad()
    def prepare(self, item: EvalItem) -> Prepared:
        """Encode (in 30 s windows), project and splice one clip into its prompt."""
        from speechtrim.audio import split_windows

        started = time.perf_counter()
        windows = split_windows(item.audio)
        frames, mask = self.speechlm.encode(windows)  # (W, T, D_enc), (W, T)
        projected, projected_mask, logits = self.speechlm.project(frames, mask)
        embeds, embeds_mask = self.speechlm.adapter(projected, projected_mask)  # (W, T', D_llm), (W, T')
        flat = embeds[embeds_mask].unsqueeze(0)  # (1, N_audio, D_llm): windows joined in time order
        aligned = logits is not None and tuple(logits.shape[:2]) == tuple(embeds.shape[:2])
        flat_logits = logits[embeds_mask].unsqueeze(0) if aligned else None  # (1, N_audio, K+1)
        summary = (self.speechlm.summarize(frames[mask].unsqueeze(0), mask[mask].unsqueeze(0))  # whole clip
                   if SUMMARY_MARKER in item.prompt else None)
        prepared = self._splice(item, flat, summary)
        _sync(flat.device)
        prepared.encode_s = time.perf_counter() - started
        text_tokens = prepared.length - prepared.audio_tokens

        def reduce_audio(reducer: Any) -> tuple[Prepared, Any]:
            from speechtrim.models.audio_reduction import AudioReduction

            reduction = AudioReduction(self.speechlm, reducer)
            ones = torch.ones(flat.shape[:2], dtype=torch.bool, device=flat.device)
            reduced, _ = reduction.reduce(flat, ones, flat_logits, [text_tokens])
            return self._splice(item, reduced, summary), reduction.stats

        prepared.reduce_audio = reduce_audio
        return prepared

    def _splice(self, item: EvalItem, audio: torch.Tensor, summary: torch.Tensor | None = None) -> Prepared:
        """The prompt of ``item`` with the audio embeddings (1, N, D) and the utterance summary (1, n, D) spliced in."""
        ones = torch.ones(audio.shape[:2], dtype=torch.bool, device=audio.device)  # (1, N_audio)
        batch = self.speechlm.build_inputs([item.prompt], audio, ones, assistant_prefix=item.assistant_prefix,
                                           summary=summary)
        kwargs = {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask,
                  "position_ids": batch.position_ids}
        return Prepared(kwargs, batch.audio_spans, int(batch.inputs_embeds.shape[1]), int(audio.shape[1]))

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)


class HubModel(_Fingerprinted):
    """A Hugging Face speech LLM with a processor that expands audio placeholder tokens (audio spans from the
    config's audio token id).

    Args:
        name: a Hugging Face model id or local folder.
        device: where to run it.
    """

    def __init__(self, name: str, device: str = "cpu") -> None:
        from transformers import AutoModelForMultimodalLM, AutoProcessor

        self.name = name
        self.trained = True
        self.processor = AutoProcessor.from_pretrained(name)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForMultimodalLM.from_pretrained(name, dtype="auto").to(device).eval()
        self.weights = self.model

    @property
    def decoder(self) -> nn.Module:
        """The module the reducers attach to and the loop calls."""
        return self.model

    @torch.no_grad()
    def prepare(self, item: EvalItem) -> Prepared:
        """Chat-format the prompt with the audio and let the processor build the inputs."""
        started = time.perf_counter()
        text = item.prompt.replace(AUDIO_MARKER, "").replace(SUMMARY_MARKER, "").strip()
        conversation = [{"role": "user", "content": [{"type": "audio", "audio": item.audio},
                                                     {"type": "text", "text": text}]}]
        inputs = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        if item.assistant_prefix:
            logger.info("hub models get no assistant prefix; the label is scored right after the prompt")
        inputs = {key: value.to(self.model.device) if isinstance(value, torch.Tensor) else value
                  for key, value in inputs.items()}
        from speechtrim.hf.spans import audio_token_id

        token_id = audio_token_id(self.model.config)
        audio = int((inputs["input_ids"] == token_id).sum()) if token_id is not None else 0
        length = int(inputs["input_ids"].shape[1])
        inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
        inputs["position_ids"] = torch.arange(length, device=self.model.device).unsqueeze(0)
        return Prepared(inputs, None, length, audio, time.perf_counter() - started)

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)


def load_bench_model(model: str = "embedded", speechlm: str | Path | None = None, device: str = "cpu"):
    """The model a sweep runs: the embedded SpeechLM (default), a saved SpeechLM folder, or a hub speech LLM.

    Args:
        model: "embedded", a folder saved by ``save_trained``, or a Hugging Face speech LLM id / folder.
        speechlm: a saved SpeechLM folder (takes precedence over ``model``).
        device: "cpu" or "cuda".
    """
    from speechtrim.models.storage import CONFIG_FILE, build_speechlm, load_speechlm

    folder = Path(speechlm).expanduser() if speechlm is not None else None
    if folder is None and model != "embedded" and (Path(model).expanduser() / CONFIG_FILE).is_file():
        folder = Path(model).expanduser()
    if folder is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"--speechlm {folder} does not exist; pass a folder written by `speechtrim train --save` or `speechtrim train-embedded --out`")
        return EmbeddedModel(load_speechlm(folder).to(device), name=str(folder), trained=True)
    if model == "embedded":
        if (EMBEDDED_WEIGHTS / CONFIG_FILE).is_file():
            return EmbeddedModel(load_speechlm(EMBEDDED_WEIGHTS).to(device), name="embedded", trained=True)
        logger.warning(
            "NO TRAINED PROJECTOR: %s holds no trained SpeechLM, so the benchmark uses the packaged Whisper encoder "
            "and SmolLM2 joined by an UNTRAINED projector. Task metrics (WER, accuracy) are MEANINGLESS; fidelity "
            "to the unreduced model and the system metrics still hold. Pass --speechlm FOLDER for a trained one.",
            EMBEDDED_WEIGHTS)
        return EmbeddedModel(build_speechlm().to(device), name="embedded-untrained", trained=False)
    from speechtrim.assets.cache import hub_source

    try:
        source = hub_source(model, "speech LLM", ["embedded"])
    except ValueError as error:
        raise ValueError(f"{error}. No network is needed for the embedded default: drop --model, or pass "
                         "--speechlm FOLDER for a saved SpeechLM.") from None
    return HubModel(source, device)


@dataclass
class ItemRun:
    """What one clip produced and cost (timings are medians over repeats).

    Args:
        output: the transcript / translation, or the chosen label for label tasks.
        generated: the greedy continuation as text.
        prefill_s: prefill forward seconds.
        decode_s: seconds of the decode steps after the first token (which comes from prefill).
        decode_steps: decode forwards run (new tokens - 1).
        kv_cache_bytes: key + value bytes the cache holds right after prefill.
        peak_mem_mb: CUDA peak allocated memory during the run, None on CPU.
        tokens_per_layer: prefill length each decoder layer saw.
        cache_tokens_per_layer: KV-cache columns each layer kept after prefill.
        flops_reduction: measured prefill-FLOPs reduction (FastAdaSP eq. 10 over ``tokens_per_layer``).
    """

    output: str
    generated: str
    prefill_s: float
    decode_s: float
    decode_steps: int
    kv_cache_bytes: int
    peak_mem_mb: float | None
    tokens_per_layer: list[int] = field(default_factory=list)
    cache_tokens_per_layer: list[int] = field(default_factory=list)
    flops_reduction: float = 0.0


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _last_logits_only(decoder: nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model's forward takes it (the prefill needs the last position only)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(decoder.forward).parameters else {}


def _eos_ids(model: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.tokenizer, "eos_token_id", None),
                   getattr(getattr(model.decoder, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(value) for value in source)
    return ids


@torch.no_grad()
def _run_once(model: Any, prepared: Prepared, reducer: Any, candidates: list[str] | None,
              max_new_tokens: int, eos: set[int], depth: int) -> ItemRun:
    """One timed pass (``eos`` empty = always generate ``max_new_tokens``)."""
    decoder = model.decoder
    device = prepared.kwargs["attention_mask"].device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # collect the garbage earlier runs left before any clock starts: otherwise a full collection, triggered by what
    # the run before allocated, lands inside this one (at 30 s of audio a FastAdaSP reducer at ratio 0 timed right
    # after the reduced run read 5.5 % slower than timed after itself; with this collection, no difference beyond
    # the noise of medians of 10, about 3 %)
    gc.collect()
    reduce_s, pre_llm_stats = 0.0, None
    if reducer is not None and reducer.acts_on == "embeddings" and prepared.reduce_audio is not None:
        started = time.perf_counter()  # the reduction before the LLM is part of the prefill's cost
        prepared, pre_llm_stats = prepared.reduce_audio(reducer)
        _sync(device)
        reduce_s = time.perf_counter() - started
    if reducer is not None and pre_llm_stats is None:
        context = reducer(decoder, audio_spans=prepared.audio_spans)
    else:
        context = contextlib.nullcontext(pre_llm_stats)
    with context as stats:
        _sync(device)
        started = time.perf_counter()
        out = decoder(**prepared.kwargs, use_cache=True, **_last_logits_only(decoder))
        _sync(device)
        prefill_s = time.perf_counter() - started + reduce_s
        cache = returned_cache(out)
        cache_bytes = kv_cache_bytes(cache)
        logits = out.logits[:, -1]  # (1, V)
        label = None
        mask, positions = prepared.kwargs["attention_mask"], prepared.kwargs["position_ids"]  # (1, T)
        if candidates:
            scores = candidate_log_probs(decoder, logits, cache, mask, positions,
                                         [model.token_ids(text) for text in candidates])[0]  # (C,)
            label = candidates[int(scores.argmax())].strip()
        _sync(device)
        started = time.perf_counter()
        generated = greedy_continue(decoder, logits, cache, mask, positions, max_new_tokens, eos)
        _sync(device)
        decode_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    text = model.tokenizer.decode(generated, skip_special_tokens=True).strip()
    if stats is not None:
        lengths, cache_lengths, saved = stats.tokens_per_layer, stats.cache_tokens_per_layer, stats.flops_reduction
    else:
        lengths = cache_lengths = [prepared.length] * depth
        saved = 0.0
    return ItemRun(label if label is not None else text, text, prefill_s, decode_s, len(generated) - 1, cache_bytes,
                   peak, list(lengths), list(cache_lengths), float(saved))


def run_item(model: Any, prepared: Prepared, reducer: Any = None, candidates: list[str] | None = None,
             max_new_tokens: int = 32, repeats: int = 1, stop_at_eos: bool = True) -> ItemRun:
    """Prefill, (label scoring), greedy decode of one prepared clip, ``repeats`` times; timings are medians.

    Args:
        model: an :class:`EmbeddedModel` or :class:`HubModel`.
        prepared: the clip from ``model.prepare``.
        reducer: a built reducer (``speechtrim.reducers.build``) or None for the unreduced model.
        candidates: answers to score for a label task (the output is the most likely one), or None.
        max_new_tokens: most tokens generated (the first comes from the prefill).
        repeats: runs to take the median time of; outputs come from the first (greedy, deterministic).
        stop_at_eos: False generates exactly ``max_new_tokens`` (fixed-length decode timing).
    """
    if max_new_tokens < 1 or repeats < 1:
        raise ValueError(f"max_new_tokens and repeats must be >= 1, got {max_new_tokens} and {repeats}")
    depth = text_backbone(model.decoder).depth
    eos = _eos_ids(model) if stop_at_eos else set()
    runs = [_run_once(model, prepared, reducer, candidates, max_new_tokens, eos, depth) for _ in range(repeats)]
    first = runs[0]
    first.prefill_s = statistics.median(run.prefill_s for run in runs)
    first.decode_s = statistics.median(run.decode_s for run in runs)
    peaks = [run.peak_mem_mb for run in runs if run.peak_mem_mb is not None]
    first.peak_mem_mb = max(peaks) if peaks else None
    return first


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(tensor.numel() * tensor.element_size() for tensor in tensors))


def median_encode(model: Any, item: EvalItem, repeats: int) -> Prepared:
    """``model.prepare(item)`` run ``repeats`` times; its ``encode_s`` is the median."""
    runs = [model.prepare(item) for _ in range(max(repeats, 1))]
    runs[0].encode_s = float(np.median([run.encode_s for run in runs]))
    return runs[0]
