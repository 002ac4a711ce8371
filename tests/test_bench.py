"""``speechtrim bench``: the sweep's rows and keys, resume after an interruption, FLOPs targets, fidelity of the
unreduced model, atomic tables and plot, bad input. A tiny random SpeechLM (4 decoder layers) built in code."""

import json

import numpy as np
import pytest
import soundfile
import torch

from speechtrim import reducers
from speechtrim.bench import sweep as sweep_module
from speechtrim.bench.main import BenchOptions, run_bench
from speechtrim.bench.report import markdown_tables, plot, write_tables
from speechtrim.bench.runner import EmbeddedModel, run_item
from speechtrim.bench.scaling import long_audio, max_batch, scaling_study
from speechtrim.bench.sweep import ROW_KEYS, SweepConfig, has_ctc_head, read_jsonl, run_sweep, select_methods
from speechtrim.cli import main
from speechtrim.eval.harness import EvalItem, EvalSet
from speechtrim.models.speechlm import SpeechLM
from tests.tiny_speechlm import tiny_speechlm

LAYER = 2
STRICT = ("fastadasp-sparse", "fastadasp-constant", "fastadasp-decay", "avg_merge", "fastv", "random_merge",
          "random_evict")  # methods that can always reach the targets used here


def tiny_bench_model(seed: int = 0) -> SpeechLM:
    """A tiny random SpeechLM whose LLM has 4 decoder layers (room for layer-2 and dense schedules)."""
    return tiny_speechlm(seed=seed, layers=4, max_positions=4096)


def toy_sets(clips: int = 2) -> list[EvalSet]:
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32) for seconds in (0.8, 1.2, 1.0)]
    asr = EvalSet("toy-asr", "asr", [EvalItem(f"a{i}", audio[i], "the emotion is happy", "transcribe this <audio> \n")
                                     for i in range(clips)])
    emotion = EvalSet("toy-emotion", "emotion",
                      [EvalItem(f"e{i}", audio[i], label, "what emotion <audio> \n", "the emotion is :")
                       for i, label in zip(range(clips), ["sad", "happy", "sad"])], ("happy", "sad"))
    return [asr, emotion]


@pytest.fixture
def model():
    return EmbeddedModel(tiny_bench_model(), "tiny", trained=False)


def test_reduced_fidelity_is_measured_against_the_unreduced_outputs(one_thread, model, tmp_path, monkeypatch):
    """Force every reduced run to answer differently: its fidelity must see it, while the unreduced row is perfect."""
    real = sweep_module.run_batch

    def forced(model, clips, reducer=None, candidates=None, *args, **kwargs):
        runs = real(model, clips, reducer, candidates, *args, **kwargs)
        for run in runs:
            if reducer is not None:  # the opposite label, or words the tiny model never says
                other = [c.strip() for c in candidates or () if c.strip() != run.output]
                run.output = other[0] if other else "zebra quartz"
        return runs

    monkeypatch.setattr(sweep_module, "run_batch", forced)
    config = SweepConfig(targets=(0.3,), methods=select_methods(["fastv"], LAYER), max_new_tokens=3)
    rows = {(row["method"], row["task"]): row
            for row in run_sweep(model, toy_sets(), config, tmp_path / "rows.jsonl", progress=False)}
    assert rows["none", "asr"]["fidelity"] == 0.0 and rows["none", "emotion"]["fidelity"] == 1.0
    assert rows["fastv", "emotion"]["fidelity"] == 0.0  # every label differs from the unreduced one
    assert rows["fastv", "asr"]["fidelity"] >= 1.0  # every word differs from the unreduced transcript


def test_sweep_rows_keys_targets_fidelity(one_thread, model, tmp_path):
    assert not has_ctc_head(model)  # the toy model's projector is linear: no ctc_compress in "all"
    config = SweepConfig(targets=(0.1, 0.3), methods=select_methods(None, LAYER, ctc_head=False), max_new_tokens=3)
    rows = run_sweep(model, toy_sets(), config, tmp_path / "rows.jsonl", progress=False)
    reduced = [m for m in config.methods if m.reducer is not None]
    assert len(rows) == 2 * (1 + len(reduced) * 2)
    names = {row["method"] for row in rows}
    assert {"none", "fastadasp-sparse", "fastadasp-constant", "fastadasp-decay"} <= names
    assert set(reducers.names()) - {"fastadasp", "ctc_compress"} <= names
    assert {"pre_merge", "samp", "segment_topk"} <= names  # the pre-LLM methods run next to FastAdaSP
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        assert not row.get("error"), row
        if row["method"] == "none":
            perfect = 1.0 if row["task"] == "emotion" else 0.0
            assert row["fidelity"] == perfect and row["flops_reduction"] == 0.0
            assert row["prefill_speedup"] == pytest.approx(1.0)
        if row["method"] in STRICT:
            assert abs(row["flops_reduction"] - row["target"]) < 0.03, row
        if row["keyed_by"] == "ratio":  # cache eviction: prefill untouched, smaller cache
            assert row["flops_reduction"] == 0.0 and row["kv_cache_ratio"] < 1.0
        assert row["rtf"] > 0 and row["prefill_ms"] > 0 and row["kv_cache_bytes"] > 0
        assert row["peak_mem_mb"] is None  # CPU
    emotion = [row for row in rows if row["task"] == "emotion"]
    assert {row["metric_name"] for row in emotion} == {"accuracy"}
    assert all(set(row["outputs"]) <= {"happy", "sad"} for row in emotion)
    assert len(read_jsonl(tmp_path / "rows.jsonl")) == len(rows)


def test_interrupted_sweep_resumes(one_thread, model, tmp_path, monkeypatch):
    jsonl = tmp_path / "rows.jsonl"
    config = SweepConfig(targets=(0.2, 0.4), methods=select_methods(["fastadasp-sparse", "fastv"], LAYER),
                         max_new_tokens=2)
    sets = toy_sets()[:1]
    seen = []

    def interrupt(row):
        seen.append(row["method"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, sets, config, jsonl, progress=False, on_row=interrupt)
    assert len(read_jsonl(jsonl)) == 3
    with open(jsonl, "a") as handle:  # a torn line from a crash mid-write is ignored and redone
        handle.write('{"key": "half a ro')
    measured = []
    original = sweep_module._measure
    monkeypatch.setattr(sweep_module, "_measure", lambda *a, **k: measured.append(a[2].name) or original(*a, **k))
    rows = run_sweep(model, sets, config, jsonl, progress=False)
    assert len(rows) == 5 and len(measured) == 2  # only the two unfinished rows ran
    assert [row["method"] for row in rows] == ["none", "fastadasp-sparse", "fastadasp-sparse", "fastv", "fastv"]
    assert len(read_jsonl(jsonl)) == 5
    lines = jsonl.read_text().splitlines()  # the torn line was removed: the file is valid JSONL again
    assert len(lines) == 5 and all(isinstance(json.loads(line), dict) for line in lines)


def test_unreachable_target_keeps_sweeping(one_thread, model, tmp_path):
    config = SweepConfig(targets=(0.1, 0.95), methods=select_methods(["fastadasp-sparse"], 3), max_new_tokens=2)
    rows = run_sweep(model, toy_sets()[:1], config, tmp_path / "rows.jsonl", progress=False)
    assert [bool(row.get("error")) for row in rows] == [False, False, True]
    assert "unreachable" in rows[-1]["error"] and rows[-1]["metric"] is None
    text = markdown_tables(rows, "tiny")
    assert "—" in text and "Full Token Baseline" in text


def test_tables_and_plot_are_atomic(one_thread, model, tmp_path, monkeypatch):
    config = SweepConfig(targets=(0.3,), methods=select_methods(["fastadasp"], LAYER), max_new_tokens=2)
    rows = run_sweep(model, toy_sets(), config, tmp_path / "rows.jsonl", progress=False)
    text = markdown_tables(rows, "tiny")
    for needle in ("toy-asr", "toy-emotion", "fastadasp-decay", "wer", "accuracy", "agreement", "UNTRAINED"):
        assert needle in text
    table = write_tables(text, tmp_path / "out" / "tables.md")
    png = plot(rows, tmp_path / "out" / "tradeoff.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and table.read_text().startswith("## toy-asr")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tables.md", "tradeoff.png"]  # no temp files
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    before = png.read_bytes()
    with pytest.raises(RuntimeError):
        plot(rows, png, "tiny")
    assert png.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tables.md", "tradeoff.png"]


def test_run_bench_on_manifest(one_thread, model, tmp_path):
    rng = np.random.default_rng(3)
    lines = []
    for index in range(2):
        soundfile.write(tmp_path / f"c{index}.wav", (0.1 * rng.standard_normal(12000)).astype(np.float32), 16000)
        lines.append(json.dumps({"audio": f"c{index}.wav", "transcript": "the emotion is sad"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    options = BenchOptions(preset="quick", data=[str(tmp_path / "m.jsonl")], methods=["fastadasp-sparse", "h2o"],
                           targets=(0.2,), out=tmp_path / "out", layer="2", max_new_tokens=2, progress=False)
    summary = run_bench(options, model=model)
    assert summary["model"] == "tiny" and "m (asr, 2 clips, real)" in summary["data"]
    assert [row["method"] for row in summary["rows"]] == ["none", "fastadasp-sparse", "h2o"]
    assert all(set(ROW_KEYS) <= set(row) and "outputs" not in row for row in summary["rows"])
    assert (tmp_path / "out" / "tables.md").is_file() and (tmp_path / "out" / "tradeoff.png").is_file()
    json.dumps(summary)  # the summary line is JSON
    again = run_bench(options, model=model)  # resumed: same rows, nothing appended
    assert len(again["rows"]) == 3 and len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 3


def test_scaling_study(one_thread, model):
    clips = [np.full(8000, 0.05, dtype=np.float32), np.full(4000, -0.05, dtype=np.float32)]
    audio = long_audio(clips, 2.0)
    assert audio.shape == (32000,) and audio[0] == pytest.approx(0.05)
    method = select_methods(["fastadasp-sparse"], 1)[1]
    rows = scaling_study(model, clips, method, lengths=(1.0, 2.0), target=0.4, max_new_tokens=2,
                         memory_budget_gb=0.01, progress=False)
    assert [(row["seconds"], row["method"]) for row in rows] == [
        (1.0, "none"), (1.0, "fastadasp-sparse"), (2.0, "none"), (2.0, "fastadasp-sparse")]
    for full, reduced in zip(rows[::2], rows[1::2]):
        assert reduced["flops_reduction"] == pytest.approx(0.4, abs=0.03)
        assert reduced["theoretical_prefill_speedup"] == pytest.approx(1 / (1 - reduced["flops_reduction"]))
        assert reduced["kv_cache_bytes"] < full["kv_cache_bytes"]
        assert reduced["max_batch_kv_bound"] >= full["max_batch_kv_bound"]
        assert full["tokens_per_s"] > 0 and reduced["tokens_per_s"] > 0  # fixed-length decode: 1 step each
        assert full["overhead_at_ratio_zero"] is None and reduced["overhead_at_ratio_zero"] > -1.0
        assert full["decode_vs_unreduced"] == pytest.approx(1.0) and reduced["decode_vs_unreduced"] > 0
        # layer 0 runs on the full prompt in both runs and taps scores for layer 1's decision
        assert full["costliest_layer_vs_unreduced"] is None and reduced["costliest_layer_vs_unreduced"] > 0
        assert full["max_batch_measured"] is None  # no MemoryPlan: nothing measured
        assert reduced["ideal_fraction"] == pytest.approx(
            reduced["measured_prefill_speedup"] / reduced["theoretical_prefill_speedup"])
        # the compute ideal counts every linear weight and the causal attention over the same per-layer lengths
        assert 0 < reduced["compute_flops_reduction"] < 1 and full["compute_flops_reduction"] == 0.0
        assert reduced["compute_fraction"] == pytest.approx(
            reduced["measured_prefill_speedup"] / reduced["compute_prefill_speedup"])
        assert reduced["measured_prefill_speedup_ci"] is None  # one repeat: no interval
    assert max_batch(100.0, 40, 20.0) == 3 and max_batch(10.0, 40, 20.0) == 0


def test_scaling_study_keeps_each_length_as_it_finishes_and_resumes(one_thread, model, tmp_path, monkeypatch):
    import speechtrim.bench.scaling as scaling

    clips = [np.full(8000, 0.05, dtype=np.float32)]
    method = select_methods(["fastadasp-sparse"], 1)[1]
    store = tmp_path / "rows.jsonl"
    real_run = scaling.run_item
    calls = []

    def run_item(*args, **kwargs):
        calls.append(args[1].length)
        if len(calls) > 4:  # warm-up + 3 runs of the first length pass; the second length is cut short
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(scaling, "run_item", run_item)
    with pytest.raises(KeyboardInterrupt):
        scaling_study(model, clips, method, lengths=(1.0, 2.0), target=0.4, max_new_tokens=2, progress=False,
                      store=store)
    kept = [json.loads(line) for line in store.read_text().splitlines()]
    assert [(row["seconds"], row["method"]) for row in kept] == [(1.0, "none"), (1.0, "fastadasp-sparse")]
    monkeypatch.setattr(scaling, "run_item", real_run)
    calls.clear()
    rows = scaling_study(model, clips, method, lengths=(1.0, 2.0), target=0.4, max_new_tokens=2, progress=False,
                         store=store)
    assert [(row["seconds"], row["method"]) for row in rows] == [
        (1.0, "none"), (1.0, "fastadasp-sparse"), (2.0, "none"), (2.0, "fastadasp-sparse")]
    assert rows[:2] == [{k: v for k, v in row.items() if k != "key"} for row in kept]  # reused, not rerun
    assert len(store.read_text().splitlines()) == 4
    other = scaling_study(model, clips, method, lengths=(1.0,), target=0.3, max_new_tokens=2, progress=False,
                          store=store)  # another target: nothing reused
    assert other[1]["target"] == 0.3 and len(store.read_text().splitlines()) == 6


def test_bad_input_messages(capsys):
    with pytest.raises(ValueError, match="unknown method.*fastadasp-sparse"):
        select_methods(["fastadasp", "tome"])
    with pytest.raises(ValueError, match="targets must be"):
        SweepConfig(targets=(0.0, 0.5))
    assert main(["bench", "--methods", "nonsense"]) == 2
    assert "unknown method(s) ['nonsense']" in capsys.readouterr().err
    assert main(["bench", "--targets", "ten"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert main(["bench", "--data", "librispeech", "--methods", "fastv"]) == 2
    assert "unknown data 'librispeech'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_cli_on_embedded_model(tmp_path, capsys):
    """`speechtrim bench --quick` end to end on the embedded model (two methods, one target, one clip: CI-sized)."""
    code = main(["bench", "--quick", "--data", "pocketsphinx", "--layer", "2", "--methods", "fastadasp-sparse,h2o",
                 "--targets", "0.5", "--limit", "1", "--max-new-tokens", "4", "--threads", "1", "--no-progress",
                 "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["command"] == "bench" and summary["model"].startswith("embedded")
    rows = {row["method"]: row for row in summary["rows"]}
    assert set(rows) == {"none", "fastadasp-sparse", "h2o"}
    assert rows["none"]["fidelity"] == 0.0
    assert rows["fastadasp-sparse"]["flops_reduction"] == pytest.approx(0.5, abs=0.02)
    assert rows["h2o"]["flops_reduction"] == 0.0 and rows["h2o"]["kv_cache_bytes"] < rows["none"]["kv_cache_bytes"]
    assert (tmp_path / "tables.md").is_file() and (tmp_path / "tradeoff.png").is_file()


def test_resume_never_reuses_rows_of_other_audio_weights_or_layer(one_thread, tmp_path, monkeypatch):
    """Rows are keyed by the weights' and clips' content and the integer layer that ran, not by names."""
    from speechtrim.layer_store import save_selection

    monkeypatch.setenv("SPEECHTRIM_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(5)

    def manifest(folder, scale):
        folder.mkdir(parents=True, exist_ok=True)
        soundfile.write(folder / "c.wav", (scale * rng.standard_normal(12000)).astype(np.float32), 16000)
        (folder / "good.jsonl").write_text(json.dumps({"audio": "c.wav", "transcript": "the emotion is sad"}) + "\n")
        return str(folder / "good.jsonl")

    first, other = manifest(tmp_path / "a", 0.1), manifest(tmp_path / "b", 0.3)  # same file name, other audio
    model = EmbeddedModel(tiny_bench_model(), "tiny", trained=False)

    def bench(data, bench_model, layer=None):
        options = BenchOptions(preset="quick", data=[data], methods=["fastadasp-sparse"], targets=(0.2,),
                               out=tmp_path / "out", layer=layer, max_new_tokens=2, progress=False)
        return run_bench(options, model=bench_model)

    assert bench(first, model)["reused_rows"] == 0
    assert bench(first, model)["reused_rows"] == 2  # everything the same: reused, and said so
    assert bench(other, model)["reused_rows"] == 0  # other audio under the same name
    retrained = EmbeddedModel(tiny_bench_model(seed=1), "tiny", trained=False)  # same name, other weights
    assert bench(first, retrained)["reused_rows"] == 0
    rows = bench(first, model)["rows"]
    assert rows[1]["layer"] == 2 and rows[1]["layer_source"] == "default"
    path = save_selection(model.decoder, {1: 0.1, 2: 0.5}, "fastadasp", 0.5)  # a stored selection picks layer 1
    rows = bench(first, model)["rows"]
    assert rows[1]["layer"] == 1 and rows[1]["layer_source"] == f"auto: {path}" and not rows[1].get("reused")
    assert rows[0].get("reused")  # the unreduced row does not depend on the layer
    tables = (tmp_path / "out" / "tables.md").read_text()
    # this run's rows only, though the file holds rows of four other models or clips
    assert tables.count("| none |") == 1 and tables.count("| fastadasp-sparse | 20 |") == 1  # system table


def test_fresh_sets_the_old_results_aside_and_a_file_as_out_is_refused(one_thread, model, tmp_path):
    options = BenchOptions(preset="quick", data=["pocketsphinx"], methods=["fastadasp-sparse"], targets=(0.2,),
                           out=tmp_path / "out", layer="2", max_new_tokens=2, progress=False, limit=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"key": "old", "model": "tiny"}\n')

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    import speechtrim.bench.sweep as sweep

    original = sweep.run_batch
    sweep.run_batch = stop  # interrupted before the first new row
    try:
        with pytest.raises(Stop):
            run_bench(BenchOptions(**{**options.__dict__, "fresh": True}), model=model)
    finally:
        sweep.run_batch = original
    assert (out / "results.previous.jsonl").read_text() == '{"key": "old", "model": "tiny"}\n'
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_bench(BenchOptions(**{**options.__dict__, "out": tmp_path / "file"}), model=model)


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = ("import argparse, time\nfrom speechtrim import cli\n"
              "def run(args):\n    print('started', flush=True)\n    time.sleep(60)\n    return 0\n"
              "parse = argparse.ArgumentParser.parse_args\n"
              "def patched(self, *a, **k):\n    ns = parse(self, *a, **k)\n    ns.run = run\n    return ns\n"
              "argparse.ArgumentParser.parse_args = patched\nraise SystemExit(cli.main(['assets', 'status']))\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "started"
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "terminated (SIGTERM)" in stderr and "Traceback" not in stderr


def test_a_failing_row_is_an_error_not_an_unreachable_dash(one_thread, model, tmp_path, monkeypatch):
    original = sweep_module.run_batch

    def broken(bench_model, clips, reducer, *args, **kwargs):
        if reducer is not None and reducer.name == "fastv":
            raise ValueError("a real bug")
        return original(bench_model, clips, reducer, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_batch", broken)
    options = BenchOptions(preset="quick", data=["pocketsphinx"], methods=["fastadasp-sparse", "fastv"],
                           targets=(0.2,), out=tmp_path / "out", layer="2", max_new_tokens=2, progress=False, limit=1)
    summary = run_bench(options, model=model)
    assert summary["failed_rows"] == 1
    rows = {row["method"]: row for row in summary["rows"]}
    assert rows["fastv"]["failed"] and "a real bug" in rows["fastv"]["error"] and not rows["fastadasp-sparse"].get("error")
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert "| fastv | error |" in tables and "'error' = the row failed" in tables


def test_results_lines_that_are_json_but_not_objects_are_dropped(tmp_path):
    from speechtrim.bench.sweep import repair_jsonl

    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a", "x": 1}\n[1, 2]\n"text"\n{"key": "b"}\n{"key": "c", "torn\n')
    assert repair_jsonl(path) == 3 and set(read_jsonl(path)) == {"a", "b"}
    assert repair_jsonl(path) == 0  # repaired once, quiet afterwards


def test_a_layer_beyond_the_model_is_refused_before_the_sweep(one_thread, model, tmp_path):
    options = BenchOptions(preset="quick", data=["pocketsphinx"], methods=["fastv"], targets=(0.2,),
                           out=tmp_path / "out", layer="99", max_new_tokens=2, progress=False, limit=1)
    with pytest.raises(ValueError, match="--layer 99 is outside the model's 4 decoder layers; pass 0 to 3"):
        run_bench(options, model=model)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_layer_clock_and_costliest_layer(one_thread, model):
    from speechtrim.bench.scaling import LayerClock, costliest_layer
    from speechtrim.hf.layers import text_backbone

    layers = text_backbone(model.decoder).layers
    prepared = model.prepare(EvalItem("clip", np.full(16000, 0.05, dtype=np.float32), "", "Transcribe.\n<audio>"))
    with LayerClock(layers) as clock:
        run_item(model, prepared, None, None, 3, 1, stop_at_eos=False)  # prefill, then 1-token decode steps
    assert [length for length, _ in clock.prefill] == [prepared.length] * len(layers)  # decode steps not counted
    assert all(seconds > 0 for _, seconds in clock.prefill)
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)  # hooks removed
    full = [(100, 1.0), (100, 2.0), (100, 1.0), (100, 1.0)]
    assert costliest_layer(full, [(100, 1.1), (100, 5.0), (50, 0.4), (50, 0.4)]) == pytest.approx(2.5)
    assert costliest_layer(full, [(50, 0.5)] * 4) is None


def test_scaling_ratios_are_paired_within_each_repeat():
    """A drift of the machine between repeats cancels in the paired ratios: each configuration is compared with the
    unreduced run of its own repeat, and the interval covers the median."""
    from types import SimpleNamespace

    from speechtrim.bench.scaling import _paired_ratios, scaling_table

    def run(prefill: float, decode: float = 1.0) -> SimpleNamespace:
        return SimpleNamespace(prefill_s=prefill, decode_s=decode, decode_steps=4)

    slow = [1.0, 2.0, 4.0, 8.0, 16.0]  # the machine slows down 2x per repeat
    runs = {"full": [run(t) for t in slow], "reduced": [run(t / 1.8, 0.9) for t in slow],
            "idle": [run(t * 1.01) for t in slow]}
    paired = _paired_ratios(runs)
    assert paired["reduced"]["speedup"] == pytest.approx(1.8)
    assert paired["reduced"]["speedup_ci"] == pytest.approx((1.8, 1.8))
    assert paired["reduced"]["decode"] == pytest.approx(1 / 0.9)
    assert paired["idle"]["overhead"] == pytest.approx(0.01)
    assert paired["none"]["speedup"] == pytest.approx(1.0) and paired["none"]["speedup_ci"] is None
    noisy = {"full": [run(t) for t in (1.0, 1.1, 0.9, 1.0)],
             "reduced": [run(t) for t in (0.5, 0.6, 0.55, 0.52)], "idle": [run(t) for t in (1.0, 1.1, 0.9, 1.0)]}
    low, high = _paired_ratios(noisy)["reduced"]["speedup_ci"]
    assert low <= _paired_ratios(noisy)["reduced"]["speedup"] <= high and low < high
    row = {"seconds": 30.0, "method": "m", "audio_tokens": 10, "flops_reduction": 0.5,
           "theoretical_prefill_speedup": 2.0, "measured_prefill_speedup": 1.8, "measured_prefill_speedup_ci": (1.7, 1.9),
           "ideal_fraction": 0.9, "compute_prefill_speedup": 1.9, "compute_fraction": 0.95,
           "overhead_at_ratio_zero": 0.012, "overhead_at_ratio_zero_ci": (-0.01, 0.03), "prefill_ms": 5.0,
           "decode_ms": 1.0, "tokens_per_s": 4.0, "decode_vs_unreduced": 1.1, "decode_vs_unreduced_ci": None,
           "rtf": 0.1, "kv_cache_bytes": 2**20, "max_batch_kv_bound": 3, "memory_budget_gb": 1}
    table = scaling_table([row])
    assert "| 1.80 [1.70–1.90] |" in table and "| +1.2 [-1.0–+3.0] % |" in table and "| 1.10 |" in table


def test_timed_runs_collect_before_and_never_during_and_the_model_is_frozen_out_of_the_scans(one_thread, model,
                                                                                            monkeypatch):
    """Each timed pass collects the garbage first and runs with the collector paused (a collection triggered by an
    earlier run must not land inside the clocks); ``frozen_long_lived`` takes the model out of those scans and puts
    it back on exit, and a pass leaves the collector as it found it."""
    import gc

    from speechtrim.bench import runner

    seen, collected = [], []
    real_collect, real_forward = gc.collect, model.decoder.forward
    monkeypatch.setattr(runner.gc, "collect", lambda *a: collected.append(gc.isenabled()) or real_collect(*a))

    def forward(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model.decoder, "forward", forward)
    prepared = model.prepare(toy_sets(1)[0].items[0])
    with runner.frozen_long_lived():
        assert gc.get_freeze_count() > 0  # the model's objects are in the permanent generation
        run_item(model, prepared, None, None, 3)
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    assert seen and not any(seen)  # every forward (prefill and decode steps) ran with the collector paused
    assert collected and all(collected)  # the collections ran before the pause
    gc.disable()
    try:
        run_item(model, prepared, None, None, 2)
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.enable()


def _clips(model, seconds, seed=0):
    rng = np.random.default_rng(seed)
    items = [EvalItem(f"c{i}", (0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32), "x",
                      "transcribe this <audio> \n") for i, s in enumerate(seconds)]
    return [model.prepare(item) for item in items]


BATCH_METHODS = ("none", "fastadasp-sparse", "fastadasp-constant", "fastv", "a_tome", "h2o", "snapkv", "pre_merge",
                 "samp")


@pytest.mark.parametrize("seconds", [(1.0, 1.0, 1.0), (0.8, 1.3, 1.0)], ids=["equal", "unequal"])
def test_a_batch_gives_each_clip_what_it_gives_alone(one_thread, model, seconds):
    """Left-padded batches change nothing a clip's row reports but the timings: the same greedy text, per-layer
    lengths and measured FLOPs reduction, for in-decoder mergers and evictors, cache evictors and pre-LLM methods,
    also when the clips' lengths differ (a FLOPs target's ratio is solved for every row's own prompt)."""
    from speechtrim.bench.runner import run_batch

    prepared = _clips(model, seconds, seed=1)
    for method in select_methods(list(BATCH_METHODS[1:]), LAYER):
        reducer = method.build(0.3)
        alone = [run_item(model, clip, reducer, None, 6) for clip in prepared]
        together = run_batch(model, prepared, reducer, None, 6)
        for a, b in zip(alone, together):
            assert (a.generated, a.decode_steps, a.tokens_per_layer) == (b.generated, b.decode_steps,
                                                                         b.tokens_per_layer), method.name
            assert a.flops_reduction == pytest.approx(b.flops_reduction), method.name
        assert len({run.prefill_s for run in together}) == 1  # an even share of the batch's prefill
    assert [run.generated for run in run_batch(model, prepared, None, None, 6)] == [
        run_item(model, clip, None, None, 6).generated for clip in prepared]
    labels = run_batch(model, prepared, None, ["happy", "sad"], 2)
    assert [run.output for run in labels] == [run_item(model, clip, None, ["happy", "sad"], 2).output
                                              for clip in prepared]


def test_rows_of_a_batch_solve_a_flops_target_for_their_own_prompts(one_thread, model):
    """The attachment solves a FLOPs target's ratio per row: in a padded batch of prompts of different lengths each
    row removes what it removes alone, and so saves the target, not what row 0's ratio would save it."""
    from speechtrim import reducers as registry

    prepared = _clips(model, (0.8, 1.6), seed=2)
    reducer = registry.build("fastv", flops_reduction=0.4, layer=LAYER)
    from speechtrim.bench.runner import pad_batch

    batch = pad_batch(prepared)
    with reducer(model.decoder, audio_spans=batch.audio_spans) as stats:
        model.decoder(**batch.kwargs, use_cache=True)
    rows = stats.tokens_per_row
    for row, clip in enumerate(prepared):
        with reducer(model.decoder, audio_spans=clip.audio_spans) as own:
            model.decoder(**clip.kwargs, use_cache=True)
        assert rows[row] == own.tokens_per_layer
    assert rows[0][-1] / rows[0][0] != rows[1][-1] / rows[1][0]  # different lengths: different kept shares


def test_pad_batch_joins_embedded_prompts_and_refuses_processor_inputs(one_thread, model):
    from speechtrim.bench.runner import pad_batch

    prepared = _clips(model, (0.8, 1.3, 1.0), seed=1)
    joined = pad_batch(prepared)
    assert joined.kwargs["inputs_embeds"].shape[:2] == (3, max(clip.length for clip in prepared))
    assert joined.kwargs["attention_mask"].sum(dim=1).tolist() == [clip.length for clip in prepared]
    assert pad_batch(prepared[:1]) is prepared[0]
    hub_like = type(prepared[0])({"input_ids": torch.zeros(1, 3, dtype=torch.long)}, None, 3, 0)
    with pytest.raises(ValueError, match="use batch size 1"):
        pad_batch([hub_like, hub_like])


def test_a_batched_sweep_keys_its_rows_apart_and_records_the_batch(one_thread, model, tmp_path):
    """batch_size enters the row key (rows run alone keep theirs), every row records it, and on equal-length clips the
    batched sweep scores what the clip-by-clip sweep does."""
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(16000)).astype(np.float32) for _ in range(3)]
    asr = EvalSet("eq-asr", "asr", [EvalItem(f"a{i}", a, "the emotion is happy", "transcribe this <audio> \n")
                                    for i, a in enumerate(audio)])
    methods = select_methods(["fastv", "pre_merge"], LAYER)
    rows = {}
    for size in (1, 3):
        config = SweepConfig(targets=(0.3,), methods=methods, max_new_tokens=4, batch_size=size)
        rows[size] = run_sweep(model, [asr], config, tmp_path / "rows.jsonl", progress=False)
    assert len(read_jsonl(tmp_path / "rows.jsonl")) == 6  # nothing reused across batch sizes
    for one, three in zip(rows[1], rows[3]):
        assert one["batch_size"] == 1 and three["batch_size"] == 3 and one["key"] != three["key"]
        assert (one["outputs"], one["metric"], one["fidelity"]) == (three["outputs"], three["metric"],
                                                                    three["fidelity"])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        SweepConfig(batch_size=0)


def test_presets_hold_the_clip_counts_and_targets_the_benchmark_promises():
    """The presets' sizes (issue 11): quick >= 8 ASR clips (real and held-out synthetic) and >= 8 emotion clips,
    the default >= 32 ASR and >= 48 emotion; both reach 30 % and 50 % FLOPs saved, the default from 10 %."""
    from speechtrim.bench.main import PRESETS

    def clips(preset: str, names: tuple[str, ...]) -> int:
        return sum(count for name, count in PRESETS[preset].data if name in names)

    for preset, asr, emotion in (("quick", 8, 8), ("default", 32, 48)):
        names = {name for name, _ in PRESETS[preset].data}
        assert {"pocketsphinx", "synthetic-asr", "synthetic-emotion"} <= names
        assert all(count is not None and count > 0 for _, count in PRESETS[preset].data)
        assert clips(preset, ("pocketsphinx", "synthetic-asr")) >= asr
        assert clips(preset, ("synthetic-emotion",)) >= emotion
        assert {0.3, 0.5} <= set(PRESETS[preset].targets)  # ASR
        emotion_targets = dict(PRESETS[preset].task_targets).get("emotion", PRESETS[preset].targets)
        assert min(emotion_targets) <= 0.1  # the only depth every method reaches on the emotion prompts
    assert min(PRESETS["default"].targets) == 0.1 and not PRESETS["default"].task_targets


def test_task_targets_give_a_task_its_own_targets_and_keep_the_row_keys(one_thread, model, tmp_path):
    methods = select_methods(["fastv"], LAYER)
    plain = run_sweep(model, toy_sets(), SweepConfig(targets=(0.3,), methods=methods, max_new_tokens=3),
                      tmp_path / "plain.jsonl", progress=False)
    config = SweepConfig(targets=(0.3,), methods=methods, max_new_tokens=3, task_targets={"emotion": (0.1, 0.3)})
    rows = run_sweep(model, toy_sets(), config, tmp_path / "rows.jsonl", progress=False)
    targets = {task: sorted(row["target"] for row in rows if row["task"] == task and row["method"] == "fastv")
               for task in ("asr", "emotion")}
    assert targets == {"asr": [0.3], "emotion": [0.1, 0.3]}
    keys = {(row["task"], row["method"], row["target"]): row["key"] for row in rows}
    assert all(keys[row["task"], row["method"], row["target"]] == row["key"] for row in plain)  # same rows, same keys
    with pytest.raises(ValueError, match="targets must be"):
        SweepConfig(targets=(0.3,), methods=methods, task_targets={"emotion": (1.5,)})


def test_run_bench_passes_the_presets_task_targets_unless_targets_are_given(model, tmp_path, monkeypatch):
    seen = []

    def capture(model, sets, config, jsonl, progress=True, on_row=None):
        seen.append(config)
        return []

    monkeypatch.setattr(sweep_module, "run_sweep", capture)
    soundfile.write(tmp_path / "c.wav", np.zeros(8000, dtype=np.float32), 16000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "c.wav", "transcript": "a"}) + "\n")
    for targets in (None, (0.2,)):
        run_bench(BenchOptions(preset="quick", data=[str(tmp_path / "m.jsonl")], methods=["fastv"], targets=targets,
                               layer="2", out=tmp_path / "out", progress=False), model=model)
    assert seen[0].targets == (0.3, 0.5) and seen[0].task_targets == {"emotion": (0.1, 0.3)}
    assert seen[1].targets == (0.2,) and seen[1].task_targets == {}
