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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speechtrim.eval.harness import EvalItem
from speechtrim.hf.kv_evict import kv_cache_bytes
from speechtrim.hf.layers import returned_cache, text_backbone
from speechtrim.inference import candidate_log_probs, greedy_continue_batch
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
        ctc: the CTC head's logits of the whole clip (1, T_ctc, K + 1) and their length (1,), for joint CTC/LLM
            decoding (``Decoding.ctc_weight``); None for a model without a CTC head.
    """

    kwargs: dict[str, Any]
    audio_spans: list[list[tuple[int, int]]] | None
    length: int
    audio_tokens: int
    encode_s: float = 0.0
    reduce_audio: Callable[[Any], tuple[Prepared, Any]] | None = None
    ctc: tuple[torch.Tensor, torch.Tensor] | None = None


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

    joins_batches = True  # its prompts are inputs_embeds: ``pad_batch`` joins several clips

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
        if logits is not None:  # the head's view of the whole audio (windows joined), whatever reduces the LLM's
            prepared.ctc = logits[projected_mask].unsqueeze(0), projected_mask.sum().view(1)
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

    def beam_search(self, prepared: Prepared, ctc: tuple[torch.Tensor, torch.Tensor] | None, decoding: Any,
                    max_new_tokens: int) -> list[str]:
        """Each row's transcript by beam search (a left-padded batch, ``pad_batch``), the beam chosen with the CTC
        head when ``decoding`` says so (``ctc``: (B, T_ctc, K + 1) logits and (B,) lengths, ``pad_ctc``)."""
        kwargs = prepared.kwargs
        if decoding.ctc_weight > 0:
            from speechtrim.models.joint_decoding import rescored_generate

            if ctc is None:
                raise ValueError("a CTC weight needs the model's CTC head; this model has none: use --ctc-weight 0")
            return rescored_generate(self.decoder, self.tokenizer, self.speechlm.projector, kwargs["inputs_embeds"],
                                     kwargs["attention_mask"], *ctc, max_new_tokens, decoding.ctc_weight,
                                     num_beams=decoding.num_beams)
        output = self.decoder.generate(inputs_embeds=kwargs["inputs_embeds"], attention_mask=kwargs["attention_mask"],
                                       max_new_tokens=max_new_tokens, num_beams=decoding.num_beams, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id)
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]


class HubModel(_Fingerprinted):
    """A Hugging Face speech LLM with a processor that expands audio placeholder tokens (audio spans from the
    config's audio token id).

    Args:
        name: a Hugging Face model id or local folder.
        device: where to run it.
    """

    joins_batches = False  # the processor's inputs (ids, audio features) run one clip at a time

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

    def beam_search(self, prepared: Prepared, ctc: tuple[torch.Tensor, torch.Tensor] | None, decoding: Any,
                    max_new_tokens: int) -> list[str]:
        """One clip's answer (a list of one) by the processor's inputs through ``generate`` with beams (no CTC head
        here)."""
        if decoding.ctc_weight > 0:
            raise ValueError(f"{self.name} has no CTC head over its vocabulary to rescore beams with: use "
                             "--ctc-weight 0")
        kwargs = {key: value for key, value in prepared.kwargs.items() if key != "position_ids"}
        output = self.model.generate(**kwargs, max_new_tokens=max_new_tokens, num_beams=decoding.num_beams,
                                     do_sample=False)
        prompt = int(prepared.kwargs["input_ids"].shape[1])
        return [self.tokenizer.decode(output[0, prompt:], skip_special_tokens=True).strip()]


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
        search_s: with beam decoding (``run_item(..., decoding=)``), the seconds of the beam search whose text
            ``output`` is (in a batch, an even share of the batch's one search); it runs after the timed greedy
            passes and is not part of ``prefill_s``/``decode_s``.
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
    search_s: float = 0.0


@contextlib.contextmanager
def frozen_long_lived() -> Iterator[None]:
    """Keep every object alive on entry (the model's modules and tensors, the tokenizer: about 455,000 for the
    embedded model) out of the garbage collector's scans until exit (``gc.freeze``), so the collection before each
    timed run costs what the sweep made since, not the model: 0.2 s -> under 1 ms here. The quick preset ran 494
    such collections, 107 s of its 461 s (cProfile). Objects frozen are still freed when their last reference goes;
    only reference cycles among them wait for the exit."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


def pad_batch(clips: list[Prepared]) -> Prepared:
    """Several prepared clips as one left-padded batch (one clip: itself, unchanged).

    Only prompts given as ``inputs_embeds`` (speechtrim's SpeechLM) can be joined here; a hub model's processor
    output (input ids, audio features) is refused with a ValueError.
    """
    if len(clips) == 1:
        return clips[0]
    names = {"inputs_embeds", "attention_mask", "position_ids"}
    if any(set(clip.kwargs) != names for clip in clips):
        raise ValueError("batches of several clips need prompts given as inputs_embeds (speechtrim's SpeechLM); a hub "
                         "model's processor inputs are run one clip at a time: use batch size 1")
    first = clips[0].kwargs
    width = max(clip.length for clip in clips)
    rows = len(clips)
    embeds = first["inputs_embeds"].new_zeros(rows, width, first["inputs_embeds"].shape[-1])
    mask = first["attention_mask"].new_zeros(rows, width)
    positions = first["position_ids"].new_ones(rows, width)  # padding's positions: 1, as generate() gives them
    spans: list[list[tuple[int, int]]] | None = [] if all(clip.audio_spans for clip in clips) else None
    for row, clip in enumerate(clips):
        offset = width - clip.length
        embeds[row, offset:] = clip.kwargs["inputs_embeds"][0]
        mask[row, offset:] = clip.kwargs["attention_mask"][0]
        positions[row, offset:] = clip.kwargs["position_ids"][0]
        if spans is not None:
            spans.append([(start + offset, end + offset) for start, end in clip.audio_spans[0]])
    kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
    return Prepared(kwargs, spans, width, max(clip.audio_tokens for clip in clips))


def _attached(model: Any, clips: list[Prepared], reducer: Any) -> tuple[Prepared, contextlib.AbstractContextManager,
                                                                        float, list | None]:
    """The clips as the decoder gets them (one left-padded batch), the context that runs them with ``reducer``, the
    seconds spent reducing here, and the per-clip statistics of that reduction: a pre-LLM method on a model that
    splices its own audio reduces each clip's audio embeddings now (the context then yields nothing); any other
    reducer attaches to the decoder for the ``with`` block (0 s here, statistics from the context)."""
    if reducer is None:
        return pad_batch(clips), contextlib.nullcontext(None), 0.0, None
    if reducer.acts_on == "embeddings" and all(clip.reduce_audio is not None for clip in clips):
        started = time.perf_counter()  # the reduction before the LLM is part of the prefill's cost
        reduced = [clip.reduce_audio(reducer) for clip in clips]
        batch = pad_batch([clip for clip, _ in reduced])
        _sync(batch.kwargs["attention_mask"].device)
        return batch, contextlib.nullcontext(None), time.perf_counter() - started, [stats for _, stats in reduced]
    batch = pad_batch(clips)
    return batch, reducer(model.decoder, audio_spans=batch.audio_spans), 0.0, None


def _row_records(stats: Any, row: int, rows: int, length: int, depth: int) -> tuple[list[int], list[int], float]:
    """Tokens per layer, cache tokens per layer and measured FLOPs reduction of batch row ``row`` from a
    reduction's statistics (None: the unreduced prompt of ``length`` tokens)."""
    if stats is None:
        return [length] * depth, [length] * depth, 0.0
    if rows == 1:
        return list(stats.tokens_per_layer), list(stats.cache_tokens_per_layer), float(stats.flops_reduction)
    from speechtrim.flops import flops_reduction as flops_saved

    tokens = stats.tokens_per_row[row]  # padding excluded; the cache layout is recorded for row 0 only
    saved = flops_saved([tokens[0]] * len(tokens), tokens, stats.hidden_size, stats.intermediate_size)
    return list(tokens), list(stats.cache_tokens_per_layer), float(saved)


@torch.no_grad()
def _run_once(model: Any, clips: list[Prepared], reducer: Any, candidates: list[str] | None,
              max_new_tokens: int, eos: set[int], depth: int) -> list[ItemRun]:
    """One timed pass of a batch of clips (``eos`` empty = always generate ``max_new_tokens``)."""
    # collect the garbage earlier runs left before any clock starts, and collect none while the clocks run:
    # otherwise a full collection, triggered by what the run before allocated, lands inside this one (at 30 s of
    # audio a FastAdaSP reducer at ratio 0 timed right after the reduced run read 5.5 % slower than timed after
    # itself; with this collection, no difference beyond the noise of medians of 10, about 3 %). Inside
    # ``frozen_long_lived`` this scans only what was made since the model loaded (< 1 ms instead of 0.2 s).
    gc.collect()
    paused = gc.isenabled()
    gc.disable()
    try:
        return _timed_pass(model, clips, reducer, candidates, max_new_tokens, eos, depth)
    finally:
        if paused:
            gc.enable()


def _timed_pass(model: Any, clips: list[Prepared], reducer: Any, candidates: list[str] | None,
                max_new_tokens: int, eos: set[int], depth: int) -> list[ItemRun]:
    """``_run_once`` with the garbage collector paused. A batch's seconds and KV bytes are shared out evenly
    among its clips."""
    decoder = model.decoder
    device = clips[0].kwargs["attention_mask"].device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch, context, reduce_s, clip_stats = _attached(model, clips, reducer)
    rows = len(clips)
    with context as stats:
        _sync(device)
        started = time.perf_counter()
        out = decoder(**batch.kwargs, use_cache=True, **_last_logits_only(decoder))
        _sync(device)
        prefill_s = time.perf_counter() - started + reduce_s
        cache = returned_cache(out)
        cache_bytes = kv_cache_bytes(cache)
        logits = out.logits[:, -1]  # (B, V): left padding puts every row's last token last
        labels = None
        mask, positions = batch.kwargs["attention_mask"], batch.kwargs["position_ids"]  # (B, T)
        if candidates:
            scores = candidate_log_probs(decoder, logits, cache, mask, positions,
                                         [model.token_ids(text) for text in candidates])  # (B, C)
            labels = [candidates[int(index)].strip() for index in scores.argmax(dim=1)]
        _sync(device)
        started = time.perf_counter()
        generated = greedy_continue_batch(decoder, logits, cache, mask, positions, max_new_tokens, eos)
        _sync(device)
        decode_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    runs = []
    for row, (clip, tokens) in enumerate(zip(clips, generated)):
        text = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if clip_stats is not None:
            lengths, cache_lengths, saved = _row_records(clip_stats[row], 0, 1, clip.length, depth)
        else:
            lengths, cache_lengths, saved = _row_records(stats, row, rows, clip.length, depth)
        runs.append(ItemRun(labels[row] if labels is not None else text, text, prefill_s / rows, decode_s / rows,
                            len(tokens) - 1, cache_bytes // rows, peak, lengths, cache_lengths, saved))
    return runs


def run_item(model: Any, prepared: Prepared, reducer: Any = None, candidates: list[str] | None = None,
             max_new_tokens: int = 32, repeats: int = 1, stop_at_eos: bool = True, decoding: Any = None) -> ItemRun:
    """Prefill, (label scoring), greedy decode of one prepared clip, ``repeats`` times; timings are medians.

    With beam ``decoding`` (a generation task), the output is instead the text of a beam search run once after
    the timed passes, with the same reducer (``generate`` with ``num_beams``; the CTC head chooses among the beams
    when ``decoding.ctc_weight`` > 0); its seconds are ``search_s``, the timings stay the greedy pass's.

    Args:
        model: an :class:`EmbeddedModel` or :class:`HubModel`.
        prepared: the clip from ``model.prepare``.
        reducer: a built reducer (``speechtrim.reducers.build``) or None for the unreduced model.
        candidates: answers to score for a label task (the output is the most likely one), or None.
        max_new_tokens: most tokens generated (the first comes from the prefill).
        repeats: runs to take the median time of; outputs come from the first (greedy, deterministic).
        stop_at_eos: False generates exactly ``max_new_tokens`` (fixed-length decode timing).
        decoding: a :class:`~speechtrim.models.joint_decoding.Decoding`; None or greedy: the greedy text.
    """
    return run_batch(model, [prepared], reducer, candidates, max_new_tokens, repeats, stop_at_eos, decoding)[0]


def run_batch(model: Any, clips: list[Prepared], reducer: Any = None, candidates: list[str] | None = None,
              max_new_tokens: int = 32, repeats: int = 1, stop_at_eos: bool = True,
              decoding: Any = None) -> list[ItemRun]:
    """``run_item`` for several clips run together as one left-padded batch (one prefill, one decode loop): each
    clip's run carries its own output, token counts and measured FLOPs reduction, and an even share of the batch's
    seconds and KV bytes (padding included). One clip is exactly ``run_item``.

    In a batch, an in-decoder reducer solves a FLOPs target's ratio for every clip's own prompt
    (``PrefillState.row_ratios``), so each clip removes what it removes alone; each clip's measured reduction is its
    own.
    """
    if max_new_tokens < 1 or repeats < 1:
        raise ValueError(f"max_new_tokens and repeats must be >= 1, got {max_new_tokens} and {repeats}")
    if not clips:
        raise ValueError("run_batch needs at least one clip")
    depth = text_backbone(model.decoder).depth
    eos = _eos_ids(model) if stop_at_eos else set()
    passes = [_run_once(model, clips, reducer, candidates, max_new_tokens, eos, depth) for _ in range(repeats)]
    first = passes[0]
    for index, run in enumerate(first):
        run.prefill_s = statistics.median(runs[index].prefill_s for runs in passes)
        run.decode_s = statistics.median(runs[index].decode_s for runs in passes)
        peaks = [runs[index].peak_mem_mb for runs in passes if runs[index].peak_mem_mb is not None]
        run.peak_mem_mb = max(peaks) if peaks else None
    if decoding is not None and not decoding.greedy and not candidates:  # one search for the batch, untimed
        started = time.perf_counter()
        with torch.no_grad():
            reduced, context, _, _ = _attached(model, clips, reducer)
            with context:
                outputs = model.beam_search(reduced, pad_ctc(clips), decoding, max_new_tokens)
        share = (time.perf_counter() - started) / len(clips)
        for run, output in zip(first, outputs):
            run.output, run.search_s = output, share
    return first


def pad_ctc(clips: list[Prepared]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The clips' CTC logits as one (B, T_max, K + 1) batch (zeros past each clip's length) and their (B,)
    lengths; None when a clip has none."""
    if any(clip.ctc is None for clip in clips):
        return None
    if len(clips) == 1:
        return clips[0].ctc
    logits = [clip.ctc[0][0] for clip in clips]  # (T_i, K + 1)
    padded = logits[0].new_zeros(len(logits), max(item.shape[0] for item in logits), logits[0].shape[-1])
    for row, item in enumerate(logits):
        padded[row, : item.shape[0]] = item
    return padded, torch.cat([clip.ctc[1].view(1) for clip in clips])


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(tensor.numel() * tensor.element_size() for tensor in tensors))


def median_encode(model: Any, item: EvalItem, repeats: int) -> Prepared:
    """``model.prepare(item)`` run ``repeats`` times; its ``encode_s`` is the median."""
    runs = [model.prepare(item) for _ in range(max(repeats, 1))]
    runs[0].encode_s = float(np.median([run.encode_s for run in runs]))
    return runs[0]
