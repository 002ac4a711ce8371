"""Training and k-fold evaluation on a tiny SpeechLM: learning, frozen parts, resume, NaN stop, encoder cache."""

import json

import numpy as np
import pytest
import soundfile
import torch

from speechtrim.data.clip import Clip
from speechtrim.data.emotion import Dataset, DatasetError
from speechtrim.train.encoder_cache import EncoderCache
from speechtrim.train.kfold import TEXT_ONLY, cross_validate, fold_splits, summarise
from speechtrim.train.trainer import TrainConfig, TrainingDiverged, TrainItem, _batches, fit
from tests.tiny_speechlm import tiny_speechlm

PROMPT = "what the emotion : <audio> \n"


def tone_dataset(folder, per_class=8):
    """Two classes that only the audio tells apart: low tones are 'sad', loud high tones 'happy'."""
    examples = []
    rng = np.random.default_rng(0)
    for label, (freq, amp) in {"sad": (150, 0.05), "happy": (900, 0.5)}.items():
        for index in range(per_class):
            t = np.arange(int(16000 * rng.uniform(0.3, 0.6))) / 16000
            path = folder / f"{label}{index}.wav"
            soundfile.write(path, (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
            examples.append(Clip(path, label, text="the audio", speaker=f"s{index % 4}"))
    return Dataset("tones", examples, ("happy", "sad"), synthetic=True)


@pytest.fixture
def setup(tmp_path, tmp_cache):
    model = tiny_speechlm(seed=0)
    dataset = tone_dataset(tmp_path)
    frames = EncoderCache(model, "tiny-test").get([e.audio_path for e in dataset.examples], progress=False)
    return model, dataset, frames


def test_encoder_cache_reuses_files(setup, tmp_cache):
    model, dataset, frames = setup
    assert [f.shape[0] for f in frames] == [int(np.ceil(soundfile.info(str(e.audio_path)).duration * 50))
                                            for e in dataset.examples]
    calls = []
    original = model.encode
    model.encode = lambda audios: calls.append(len(audios)) or original(audios)
    again = EncoderCache(model, "tiny-test").get([e.audio_path for e in dataset.examples], progress=False)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(frames, again))


def test_fit_lowers_the_loss_and_touches_only_trainable_parts(setup):
    model, dataset, frames = setup
    frozen = {name: p.clone() for name, p in model.named_parameters() if name.startswith(("encoder.", "llm."))}
    items = [TrainItem(f, PROMPT, e.label) for f, e in zip(frames, dataset.examples)]
    history = fit(model, items, TrainConfig(epochs=6, batch_size=4, grad_accum=1, lr=3e-3), progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"{name} changed but must stay frozen"


def test_adapter_learning_rate_applies_to_the_adapter_only(setup):
    _, dataset, frames = setup
    model = tiny_speechlm(adapter="attn_q_mean", seed=0)
    before = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    items = [TrainItem(f, PROMPT, e.label) for f, e in zip(frames, dataset.examples)]
    fit(model, items, TrainConfig(epochs=1, batch_size=4, grad_accum=1, lr=1e-2, adapter_lr=1e-9), progress=False)
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()
             if p.requires_grad}
    assert all(change < 1e-6 for name, change in moved.items() if name.startswith("adapter.")), moved
    assert all(change > 1e-3 for name, change in moved.items() if name.startswith("projector.")), moved
    with pytest.raises(ValueError, match="adapter_lr"):
        TrainConfig(adapter_lr=0.0)


def test_interrupted_training_resumes_where_it_stopped(setup, tmp_path):
    model, dataset, frames = setup
    items = [TrainItem(f, PROMPT, e.label) for f, e in zip(frames, dataset.examples)]
    config = TrainConfig(epochs=4, batch_size=4, grad_accum=1, lr=1e-3)
    straight = fit(model, items, config, progress=False)
    straight_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("projector", "adapter"))}

    fresh = tiny_speechlm(seed=0)
    checkpoint = tmp_path / "run.ckpt"
    fit(fresh, items, TrainConfig(**{**config.__dict__, "epochs": 2}), checkpoint=checkpoint, progress=False)
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["epochs"] = 4  # the same run, stopped after two epochs
    torch.save(state, checkpoint)
    resumed = tiny_speechlm(seed=0)
    history = fit(resumed, items, config, checkpoint=checkpoint, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for key, value in straight_state.items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert history[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-4)


def test_linear_schedule_decays_and_an_interrupted_run_resumes_on_the_same_curve(setup, tmp_path, monkeypatch):
    model, dataset, frames = setup
    items = [TrainItem(f, PROMPT, e.label) for f, e in zip(frames, dataset.examples)]
    config = TrainConfig(epochs=3, batch_size=4, grad_accum=1, lr=1e-3, lr_schedule="linear", group_by_length=True)
    seen: list[float] = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(self.param_groups[0]["lr"])
                        or step(self, *a, **k))
    straight = fit(model, items, config, progress=False)
    total = 3 * 4  # 16 clips in batches of 4, three epochs
    assert seen == pytest.approx([1e-3 * (1 - k / total) for k in range(total)])

    class Stop(Exception):
        pass

    interrupted = tiny_speechlm(seed=0)
    checkpoint = tmp_path / "run.ckpt"
    calls = {"n": 0}
    loss = interrupted.loss

    def stop_in_epoch_three(batch):
        calls["n"] += 1
        if calls["n"] == 10:  # the second batch of the third epoch
            raise Stop
        return loss(batch)

    interrupted.loss = stop_in_epoch_three
    with pytest.raises(Stop):
        fit(interrupted, items, config, checkpoint=checkpoint, progress=False)
    seen.clear()
    resumed = tiny_speechlm(seed=0)
    history = fit(resumed, items, config, checkpoint=checkpoint, progress=False)
    assert seen == pytest.approx([1e-3 * (1 - k / total) for k in range(8, total)])
    assert history[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-4)
    with pytest.raises(ValueError, match="only with a constant"):
        fit(tiny_speechlm(seed=0), items, TrainConfig(**{**config.__dict__, "epochs": 4}), checkpoint=checkpoint,
            progress=False)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")


def test_length_groups_cover_every_item_once_in_batches_of_similar_length():
    lengths = list(np.random.default_rng(1).integers(10, 500, size=203))
    config = TrainConfig(batch_size=4, group_by_length=True)
    order = np.random.default_rng(2).permutation(203)
    batches = _batches(order, lengths, config, np.random.default_rng(3))
    assert sorted(i for batch in batches for i in batch) == list(range(203))
    assert all(1 <= len(batch) <= 4 for batch in batches) and len(batches) == 51

    def waste(groups):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in groups)
    plain = _batches(order, lengths, TrainConfig(batch_size=4), np.random.default_rng(3))
    assert plain == [order[i : i + 4].tolist() for i in range(0, 203, 4)]
    assert waste(batches) < waste(plain) / 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    model, dataset, frames = setup
    items = [TrainItem(f, PROMPT, e.label) for f, e in zip(frames, dataset.examples)]
    checkpoint = tmp_path / "run.ckpt"
    fit(model, items, TrainConfig(epochs=1, batch_size=4, lr=1e-3), checkpoint=checkpoint, progress=False)
    good = checkpoint.read_bytes()
    poisoned = [TrainItem(torch.full_like(item.frames, float("nan")), item.prompt, item.target) for item in items]
    with pytest.raises(TrainingDiverged, match="Lower the learning rate"):
        fit(model, poisoned, TrainConfig(epochs=2, batch_size=4, lr=1e-3), checkpoint=checkpoint, progress=False)
    assert checkpoint.read_bytes() == good


def separable_frames(dataset, width=32, seed=0):
    """Encoder-like frames whose mean carries the label (a random tiny encoder does not separate the tones)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(width, generator=generator)
    return [torch.randn(20, width, generator=generator) * 0.3 + (1 if e.label == "happy" else -1) * direction
            for e in dataset.examples]


def test_cross_validation_learns_beats_text_only_and_resumes(setup, tmp_path):
    _, dataset, _ = setup
    model = tiny_speechlm(seed=0, init_range=0.5)  # a random LLM with 0.02 init has near-flat logits
    frames = separable_frames(dataset)
    transcripts = ["the audio"] * len(dataset)
    config = TrainConfig(epochs=20, batch_size=4, grad_accum=1, lr=1e-2)
    audio = cross_validate(model, dataset, frames, transcripts, "mean", tmp_path / "mean", folds=2, config=config,
                           progress=False)
    text = cross_validate(model, dataset, frames, transcripts, None, tmp_path / "text", folds=2, config=config,
                          progress=False)
    assert summarise(audio)["wa"] > summarise(text)["wa"], "the text says nothing; only audio can beat chance"
    assert summarise(text)["audio_tokens"] == 0 and summarise(audio)["audio_tokens"] == 1
    marker = json.loads((tmp_path / "mean" / "fold0.json").read_text())
    again = cross_validate(model, dataset, frames, transcripts, "mean", tmp_path / "mean", folds=2, config=config,
                           progress=False)  # every fold is done: nothing is retrained
    assert again[0].wa == marker["wa"] and again[0].train_seconds == marker["train_seconds"]


def test_folds_are_speaker_independent_and_checked(setup):
    _, dataset, _ = setup
    for train, test in fold_splits(dataset, 2, seed=0):
        assert not {dataset.examples[i].speaker for i in train} & {dataset.examples[i].speaker for i in test}
    with pytest.raises(DatasetError, match="fewer examples than folds"):
        fold_splits(dataset, 9, seed=0)


def test_tables_chart_and_timing(setup, tmp_path):
    from speechtrim.train.compare import markdown_tables, plot, time_inference

    model, dataset, frames = setup
    timings = time_inference(model, [TEXT_ONLY, "none", "mean"], tmp_path, frames, ["the audio"] * len(frames),
                             dataset, clips=4, repeats=2)
    assert set(timings) == {TEXT_ONLY, "none", "mean"} and all(value > 0 for value in timings.values())
    rows = [{"adapter": name, "wa": 0.5 + i / 10, "wa_std": 0.01, "ua": 0.5, "ua_std": 0.0, "macro_f1": 0.4,
             "macro_f1_std": 0.02, "audio_tokens": tokens, "trainable_params": 1_200_000,
             "speed_up": None if name == TEXT_ONLY else 1 - timings[name] / timings["none"]}
            for i, (name, tokens) in enumerate([(TEXT_ONLY, 0.0), ("none", 23.5), ("mean", 1.0)])]
    summary = {"data": "tones", "synthetic": True, "clips": 16, "folds": 2, "rows": rows}
    tables = markdown_tables(summary)
    assert "tones (SYNTHETIC)" in tables and "| mean | 0.70 ± 0.01 |" in tables and "| none | 1.20M | +0% |" in tables
    chart = plot(summary, tmp_path / "chart.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transcribing_stores_the_same_encoder_frames_the_cache_would_compute(tmp_path):
    from speechtrim.assets.whisper import load_whisper
    from speechtrim.audio import load_audio
    from speechtrim.models.speechlm import SpeechLM
    from speechtrim.train.compare import transcripts_for

    dataset = tone_dataset(tmp_path, per_class=2)
    whisper, processor = load_whisper("tiny.en")
    tiny = tiny_speechlm()
    model = SpeechLM(whisper.get_encoder(), processor.feature_extractor, tiny.llm, tiny.tokenizer)
    cache = EncoderCache(model, "tiny.en-test", folder=tmp_path / "frames")
    texts = transcripts_for(dataset, "tiny.en", tmp_path / "out", cache)
    assert len(texts) == len(dataset.examples)
    encode = model.encode
    model.encode = lambda audios: pytest.fail("the frames should already be stored")
    stored = cache.get([e.audio_path for e in dataset.examples], progress=False)
    for example, frames in zip(dataset.examples, stored):
        expected, mask = encode([load_audio(example.audio_path)])
        assert frames.shape == (int(mask.sum()), 384)
        torch.testing.assert_close(frames, expected[0, mask[0]], rtol=1e-2, atol=1e-2)  # stored as float16
