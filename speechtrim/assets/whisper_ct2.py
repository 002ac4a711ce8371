"""CTranslate2 Whisper -> Hugging Face ``WhisperForConditionalGeneration``: the converter behind the packaged models.

Every CTranslate2 variable is mapped to exactly one HF parameter (or refused), the architecture flags are checked
against what HF Whisper implements, and the tokenizer and generation config are rebuilt from the shipped files.
:mod:`speechtrim.assets.whisper` runs it once per packaged model into the cache.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from speechtrim.assets.ct2 import CT2Model, read_ct2
from speechtrim.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration

logger = logging.getLogger(__name__)

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
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec, got {ct2.spec!r}; pass a Whisper model.bin")
    pending = dict(ct2.variables)

    def take(name: str) -> torch.Tensor:
        if name not in pending:
            raise ValueError(f"CTranslate2 Whisper has no variable {name!r} (or it was used twice)")
        return pending.pop(name)

    _check_flags(ct2, take, pending)
    layer_counts = {
        side: 1 + max((int(m.group(1)) for k in pending if (m := re.match(rf"{side}/layer_(\d+)/", k))), default=-1)
        for side in ("encoder", "decoder")
    }
    embed = _tied_embeddings(ct2, take, pending)  # (vocab, d_model)
    config = _whisper_config(embed, layer_counts, take, pending, special_ids)
    state = _whisper_state(embed, layer_counts, take)
    if pending:
        raise ValueError(f"CTranslate2 variables left unused by the Whisper mapping: {sorted(pending)}")
    return _assemble(config, state, embed.dtype)


def _check_flags(ct2: CT2Model, take: Callable[[str], torch.Tensor], pending: dict) -> None:
    """Refuse architecture flags HF Whisper does not implement; drop CTranslate2's bookkeeping."""
    for side in ("encoder", "decoder"):
        for flag, expected in _EXPECTED_FLAGS.items():
            key = f"{side}/{flag}"
            if key in pending and int(take(key)) != expected:
                raise ValueError(f"{key} = {int(ct2.variables[key])}, HF Whisper implements only {expected}")
    for key in _IGNORED:
        pending.pop(key, None)


def _tied_embeddings(ct2: CT2Model, take: Callable[[str], torch.Tensor], pending: dict) -> torch.Tensor:
    """The decoder's token embeddings, after checking that the output projection is tied to them."""
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
    return embed


def _whisper_config(embed: torch.Tensor, layer_counts: dict[str, int], take: Callable[[str], torch.Tensor],
                    pending: dict, special_ids: dict[str, int] | None) -> Any:
    """The ``WhisperConfig`` the CTranslate2 shapes describe."""
    from transformers import WhisperConfig

    if special_ids is None:
        eot = 50257 if embed.shape[0] >= 51865 else 50256
        if eot + 1 >= embed.shape[0]:
            raise ValueError(f"a vocabulary of {embed.shape[0]} is not Whisper's; pass special_ids for this model")
        special_ids = dict(pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=eot + 1)
    conv1 = pending["encoder/conv1/weight"]  # (d_model, n_mels, 3)
    return WhisperConfig(
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


def _whisper_state(embed: torch.Tensor, layer_counts: dict[str, int],
                   take: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF parameter name -> tensor, taking every CTranslate2 variable once."""
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
    return state


def _assemble(config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> WhisperForConditionalGeneration:
    """The HF model holding ``state`` exactly: every parameter set once, with the shape HF expects."""
    from transformers import WhisperForConditionalGeneration

    config.dtype = dtype
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


__all__ = ["convert_whisper", "whisper_from_ct2"]
