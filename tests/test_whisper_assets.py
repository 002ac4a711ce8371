"""CTranslate2 -> HF Whisper conversion: the name mapping on tiny random models, errors, and the packaged weights."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from speechtrim.assets import whisper as whisper_assets
from speechtrim.assets.ct2 import read_ct2
from speechtrim.assets.whisper import (
    PACKAGED_WHISPER,
    convert_whisper,
    load_whisper,
    prepare_whisper,
    transcribe,
    valid_frames,
    whisper_from_ct2,
)
from speechtrim.eval.text import normalize_english, wer
from tests.test_ct2 import write_ct2

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
BYTE_VOCAB = 256
EOT, SOT, EN, DE, FR, TRANSLATE, TRANSCRIBE = range(BYTE_VOCAB, BYTE_VOCAB + 7)
PREV, NO_TIMESTAMPS = BYTE_VOCAB + 8, BYTE_VOCAB + 10
VOCAB = BYTE_VOCAB + len(SPECIALS) + 5  # room for 5 timestamp tokens
IDS = {"pad_token_id": EOT, "bos_token_id": EOT, "eos_token_id": EOT, "decoder_start_token_id": SOT}


def tiny_whisper(dtype=torch.float32, seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=40,
        max_source_positions=8, max_target_positions=12, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT,
        decoder_start_token_id=SOT,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (layer norms and biases included)
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model.to(dtype)


def hf_to_ct2(model: WhisperForConditionalGeneration) -> dict:
    """The CTranslate2 WhisperSpec layout of an HF Whisper, written from the CTranslate2 side."""
    sd = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    cfg = model.config
    out = {
        "encoder/num_heads": torch.tensor(cfg.encoder_attention_heads, dtype=torch.int16),
        "decoder/num_heads": torch.tensor(cfg.decoder_attention_heads, dtype=torch.int16),
        "decoder/activation": torch.tensor(3, dtype=torch.int8),
        "decoder/alibi": torch.tensor(0, dtype=torch.int8),
        "decoder/pre_norm": torch.tensor(1, dtype=torch.int8),
        "decoder/scale_embeddings": torch.tensor(0, dtype=torch.int8),
        "decoder/start_from_zero_embedding": torch.tensor(0, dtype=torch.int8),
        "decoder/alignment_heads": torch.tensor(1, dtype=torch.int16),
        "decoder/alignment_layer": torch.tensor(-1, dtype=torch.int16),
        "decoder/embeddings/weight": sd["model.decoder.embed_tokens.weight"],
    }
    for conv in ("conv1", "conv2"):
        for kind in ("weight", "bias"):
            out[f"encoder/{conv}/{kind}"] = sd[f"model.encoder.{conv}.{kind}"]

    def norm(dst: str, src: str):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def linear(dst: str, src: str):
        out[f"{dst}/weight"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    for side, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        out[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for index in range(layers):
            dst, src = f"{side}/layer_{index}", f"model.{side}.layers.{index}"
            attn = f"{src}.self_attn"
            zeros = torch.zeros_like(sd[f"{attn}.q_proj.bias"])
            out[f"{dst}/self_attention/linear_0/weight"] = torch.cat(
                [sd[f"{attn}.{p}_proj.weight"] for p in "qkv"])
            out[f"{dst}/self_attention/linear_0/bias"] = torch.cat(
                [sd[f"{attn}.q_proj.bias"], zeros, sd[f"{attn}.v_proj.bias"]])
            linear(f"{dst}/self_attention/linear_1", f"{attn}.out_proj")
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            if side == "decoder":
                cross = f"{src}.encoder_attn"
                linear(f"{dst}/attention/linear_0", f"{cross}.q_proj")
                out[f"{dst}/attention/linear_1/weight"] = torch.cat(
                    [sd[f"{cross}.k_proj.weight"], sd[f"{cross}.v_proj.weight"]])
                out[f"{dst}/attention/linear_1/bias"] = torch.cat([zeros, sd[f"{cross}.v_proj.bias"]])
                linear(f"{dst}/attention/linear_2", f"{cross}.out_proj")
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
            linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
            linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
    return out


PROJECTION_ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}


def _write_tiny(tmp_path: Path, model, **changes) -> Path:
    variables = hf_to_ct2(model)
    for name, value in changes.items():
        if value is None:
            variables.pop(name)
        else:
            variables[name] = value
    return write_ct2(tmp_path / "model.bin", variables, aliases=PROJECTION_ALIAS)


def _features(model, batch: int = 2, seed: int = 1) -> torch.Tensor:
    frames = 2 * model.config.max_source_positions
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.config.num_mel_bins, frames, generator=generator).to(model.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mapping_reproduces_state_dict_and_logits(tmp_path, dtype):
    reference = tiny_whisper(dtype)
    converted = whisper_from_ct2(read_ct2(_write_tiny(tmp_path, reference)), IDS)
    ref_state, got_state = reference.state_dict(), converted.state_dict()
    assert set(got_state) == set(ref_state)
    for name, tensor in ref_state.items():
        assert got_state[name].dtype == dtype, name
        assert torch.equal(got_state[name], tensor), name
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()
    assert converted.config.decoder_layers == 3 and converted.config.decoder_attention_heads == 4
    assert converted.config.encoder_ffn_dim == 24 and converted.config.num_mel_bins == 8
    features = _features(reference).float()
    decoder_ids = torch.tensor([[SOT, EN, TRANSCRIBE, 5, 77], [SOT, DE, TRANSLATE, 9, 3]])
    with torch.no_grad():
        expected = reference.float()(features, decoder_input_ids=decoder_ids).logits
        got = converted.float()(features, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_unused_missing_and_unsupported_variables_fail_loudly(tmp_path):
    model = tiny_whisper()
    extra = read_ct2(_write_tiny(tmp_path, model, **{"decoder/layer_0/extra/bias": torch.ones(3)}))
    with pytest.raises(ValueError, match="unused.*decoder/layer_0/extra/bias"):
        whisper_from_ct2(extra, IDS)
    missing = read_ct2(_write_tiny(tmp_path, model, **{"decoder/layer_2/ffn/linear_1/bias": None}))
    with pytest.raises(ValueError, match="decoder/layer_2/ffn/linear_1/bias"):
        whisper_from_ct2(missing, IDS)
    relu = read_ct2(_write_tiny(tmp_path, model, **{"decoder/activation": torch.tensor(0, dtype=torch.int8)}))
    with pytest.raises(ValueError, match="decoder/activation"):
        whisper_from_ct2(relu, IDS)
    untied = _write_tiny(tmp_path, model)
    variables = hf_to_ct2(model)
    variables["decoder/projection/weight"] = torch.randn_like(variables["decoder/embeddings/weight"])
    write_ct2(untied, variables)
    with pytest.raises(ValueError, match="not tied"):
        whisper_from_ct2(read_ct2(untied), IDS)
    with pytest.raises(ValueError, match="pass special_ids"):  # a vocabulary of 272 has no id 50256
        whisper_from_ct2(read_ct2(_write_tiny(tmp_path, model)))
    other = write_ct2(tmp_path / "other.bin", {"x": torch.ones(1)}, spec="TransformerSpec")
    with pytest.raises(ValueError, match="WhisperSpec"):
        whisper_from_ct2(read_ct2(other), IDS)


def _tokenizer_json(path: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    tokenizer.save(str(path))
    return path


def _decoder_prompts(model, run) -> list[list[int]]:
    """The decoder input ids of the first decoder call made while ``run()`` executes."""
    seen = []
    handle = model.model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].tolist()) if not seen else None,
        with_kwargs=True,
    )
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("multilingual", [False, True])
def test_convert_folder_loads_and_generates(tmp_path, multilingual):
    reference = tiny_whisper(torch.float16)
    model_bin = _write_tiny(tmp_path, reference)
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({"alignment_heads": [[1, 0], [2, 3]], "suppress_ids": [5, 6],
                                       "suppress_ids_begin": [32, EOT], "lang_ids": [EN, DE, FR]}))
    out = tmp_path / "hf"
    out.mkdir()
    convert_whisper([model_bin], config_json, _tokenizer_json(tmp_path / "tokenizer.json"), out,
                    multilingual=multilingual)
    model = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = WhisperProcessor.from_pretrained(out)
    assert processor.feature_extractor.feature_size == 8
    assert len(processor.tokenizer) == VOCAB  # timestamp tokens fill the vocabulary
    assert processor.tokenizer.convert_tokens_to_ids("<|0.00|>") == NO_TIMESTAMPS + 1
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.float()), name
    gen = model.generation_config
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (SOT, EOT, EOT)
    assert (gen.no_timestamps_token_id, gen.prev_sot_token_id, gen.max_length) == (NO_TIMESTAMPS, PREV, 12)
    assert gen.suppress_tokens == [5, 6] and gen.begin_suppress_tokens == [32, EOT]
    assert gen.alignment_heads == [[1, 0], [2, 3]] and gen.is_multilingual == multilingual
    features = _features(model)
    if multilingual:
        assert gen.lang_to_id == {"<|en|>": EN, "<|de|>": DE, "<|fr|>": FR}
        assert gen.task_to_id == {"translate": TRANSLATE, "transcribe": TRANSCRIBE}
        run = lambda: model.generate(features, language="en", task="transcribe")  # noqa: E731
        expected_prompt = [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]
    else:
        assert not hasattr(gen, "lang_to_id")
        run = lambda: model.generate(features)  # noqa: E731
        expected_prompt = [SOT, NO_TIMESTAMPS]
    assert _decoder_prompts(model, run) == [expected_prompt] * 2
    tokens = run()
    assert tokens.shape[0] == 2 and tokens.max() < VOCAB


def test_transcribe_splits_long_audio_and_joins(tmp_path, monkeypatch):
    model = tiny_whisper()
    model.generation_config.is_multilingual = False
    processor_dir = tmp_path / "proc"
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    tokenizer = WhisperTokenizer(tokenizer_file=str(_tokenizer_json(tmp_path / "tokenizer.json")))
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=8), tokenizer)
    processor.save_pretrained(processor_dir)
    batches = []
    word = tokenizer.encode(" hi", add_special_tokens=False)

    def fake_encoder(input_features):  # the tiny encoder takes 16 mel frames, not a real 30 s window
        return BaseModelOutput(last_hidden_state=input_features.transpose(1, 2))

    def fake_generate(encoder_outputs, **kwargs):
        features = encoder_outputs.last_hidden_state
        batches.append((tuple(features.shape), kwargs))
        return torch.tensor([[SOT, *word, EOT]] * features.shape[0])

    monkeypatch.setattr(model, "get_encoder", lambda: fake_encoder)
    monkeypatch.setattr(model, "generate", fake_generate)
    audios = [np.zeros(65 * 16000, np.float32), np.zeros(10 * 16000, np.float32), np.zeros(0, np.float32)]
    encoded = []
    texts = transcribe(model, processor, audios, batch_size=3, max_new_tokens=7,
                       on_encoded=lambda index, audio, hidden: encoded.append((index, len(audio), hidden.shape)))
    assert texts == ["hi hi hi", "hi", ""]
    assert [shape[0] for shape, _ in batches] == [3, 1]  # windows 30 + 30 + 5 s, then 10 s
    assert batches[0][0][1:] == (3000, 8)
    assert batches[0][1]["max_new_tokens"] == 7 and "language" not in batches[0][1]
    assert encoded == [(1, 10 * 16000, (3000, 8))]  # only the clip that fits one window hands its frames on
    with pytest.raises(ValueError, match="English-only"):
        transcribe(model, processor, audios[:1], language="de")
    with pytest.raises(ValueError, match="mono"):
        transcribe(model, processor, [np.zeros((2, 100), np.float32)])


def test_valid_frames():
    assert valid_frames(0) == 0
    assert valid_frames(1) == 1
    assert valid_frames(16000) == 50
    assert valid_frames(16001) == 51
    assert valid_frames(54400) == 170  # 3.4 s
    assert valid_frames(8000, sample_rate=8000) == 50
    assert valid_frames(45 * 16000) == 1500
    with pytest.raises(ValueError):
        valid_frames(-1)


def test_unknown_names_list_the_packaged_ones(tmp_cache):
    with pytest.raises(ValueError, match="tiny.en.*base|base.*tiny.en"):
        load_whisper("definitely-not-a-whisper-model")
    with pytest.raises(ValueError, match="packaged"):
        prepare_whisper("tiny")
    assert set(PACKAGED_WHISPER) == {"tiny.en", "base"}


def test_normalize_and_wer(tmp_path, monkeypatch):
    assert normalize_english("Mr. Smith's  2nd  [laughs] colour, uh, OK!") == "mister smith is 2nd colour ok"
    assert wer(["He was not an ill disposed young man"], ["He was not an ill-disposed young man."]) == 0.0
    assert wer(["He was not an ill disposed young man"], ["He was not an old-sposed young man."]) == 0.25
    assert wer(["Hello, World!"], ["hello world"]) == 0.0
    assert wer(["Hello, World!"], ["hello world"], normalize=False) == 1.0
    assert wer(["a b c d", "[noise]"], ["a x c d", "z z"]) == pytest.approx(3 / 4)  # empty ref: insertions
    assert wer(["a b"], [""]) == 1.0
    with pytest.raises(ValueError, match="2 references but 1"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        wer(["[noise]"], ["a"])
    table = tmp_path / "spelling.json"
    table.write_text(json.dumps({"colour": "color"}))
    monkeypatch.setenv("SPEECHTRIM_SPELLING_JSON", str(table))
    assert normalize_english("The Colour") == "the color"
    monkeypatch.setenv("SPEECHTRIM_SPELLING_JSON", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="SPEECHTRIM_SPELLING_JSON"):
        normalize_english("x")


# ---- packaged weights (slow) ----


def _librivox() -> tuple[list[np.ndarray], list[str]]:
    import soundfile as sf

    references = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        text, _, utterance = line.rpartition("(")
        references[utterance.strip(" )")] = text.replace("<s>", "").replace("</s>", "").strip()
    audios, texts = [], []
    for utterance in sorted(references):
        audio, rate = sf.read(LIBRIVOX / f"{utterance}.wav", dtype="float32")
        assert rate == 16000 and audio.ndim == 1
        audios.append(audio)
        texts.append(references[utterance])
    return audios, texts


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("whisper_cache")
        patch.setenv("SPEECHTRIM_CACHE", str(folder))
        yield folder


@pytest.mark.slow
def test_tiny_en_transcribes_librivox(module_cache):
    model, processor = load_whisper("tiny.en")
    audios, references = _librivox()
    hypotheses = transcribe(model, processor, audios, batch_size=5)
    score = wer(references, hypotheses)
    print(f"tiny.en librivox WER {score:.4f}: {hypotheses}")
    assert score <= 0.15


BASE_0880 = "He was not an ill-disposed young man."


@pytest.mark.slow
def test_base_transcript_is_pinned(module_cache):
    model, processor = load_whisper("base")
    assert model.generation_config.is_multilingual and model.config.vocab_size == 51865
    audios, _ = _librivox()
    assert transcribe(model, processor, [audios[1]], language="en") == [BASE_0880]


@pytest.mark.slow
def test_second_load_reuses_the_cache(module_cache, monkeypatch):
    folder = prepare_whisper("tiny.en")
    assert folder.parent == module_cache and folder.name.startswith("whisper-tiny.en-0.1.0-1a5afae06a4d")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(whisper_assets, "convert_whisper", refuse)
    assert prepare_whisper("tiny.en") == folder
    model, _ = load_whisper("tiny.en")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert sum(p.numel() for p in model.parameters()) == 37_760_256  # d 384, 4+4 layers, vocab 51864, tied


@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing(tmp_cache, monkeypatch):
    def crash(model_files, config_json, tokenizer_json, out_dir, **kwargs):
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(whisper_assets, "convert_whisper", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_whisper("tiny.en")
    assert os.listdir(tmp_cache) == []
