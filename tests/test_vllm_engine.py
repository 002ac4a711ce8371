"""The vLLM engine without vLLM: the prompt-embeds encoding, the streaming client against a fake OpenAI-compatible
server on loopback, the vLLM sweep (rows, FLOPs, fidelity, a server dying mid-sweep) and its refusals. The real
server is in tests/test_vllm_server.py (slow)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from speechtrim import reducers
from speechtrim.bench.main import BenchOptions, run_bench
from speechtrim.bench.runner import EmbeddedModel
from speechtrim.bench.sweep import select_methods
from speechtrim.bench.vllm_bench import (label_of, run_vllm_sweep, throughput_table, vllm_methods, vllm_table,
                                         vllm_throughput)
from speechtrim.engines.vllm import VLLMClient, encode_embeddings
from tests.test_bench import toy_sets
from tests.tiny_speechlm import tiny_speechlm


class FakeVLLM(BaseHTTPRequestHandler):
    """Streams "happy <n>" for a prompt of n embeddings, word by word, as vLLM's completions endpoint does."""

    seen: list[tuple[int, int]] = []  # (tokens, width) of each prompt received
    fixed: list[bool] = []  # whether each request asked for exactly max_tokens
    fail_after: int | None = None

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if FakeVLLM.fail_after is not None and len(FakeVLLM.seen) >= FakeVLLM.fail_after:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"engine dead")
            return
        embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])))
        FakeVLLM.seen.append(tuple(embeds.shape))
        assert body["temperature"] == 0.0 and body["stream"] is True
        FakeVLLM.fixed.append(bool(body.get("ignore_eos")) and body.get("min_tokens") == body["max_tokens"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = ["happy", f" {embeds.shape[0]}"]
        for word in words:
            self.wfile.write(f"data: {json.dumps({'choices': [{'text': word}]})}\n\n".encode())
        usage = {"choices": [], "usage": {"completion_tokens": len(words)}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def fake_server():
    FakeVLLM.seen, FakeVLLM.fixed, FakeVLLM.fail_after = [], [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_prompt_embeds_are_torch_saved_tensors_in_base64():
    embeds = torch.randn(7, 5)
    decoded = torch.load(io.BytesIO(base64.b64decode(encode_embeddings(embeds))))
    assert torch.equal(decoded, embeds)
    with pytest.raises(ValueError, match="tokens, hidden"):
        encode_embeddings(torch.randn(1, 7, 5))


def test_the_client_streams_text_tokens_and_times_the_first_token(fake_server):
    client = VLLMClient(fake_server)
    client.check()
    completions, wall = client.complete_many([torch.randn(n, 4) for n in (3, 5, 8)], max_tokens=4, concurrency=2)
    assert [c.text for c in completions] == ["happy 3", "happy 5", "happy 8"]
    assert all(c.tokens == 2 and 0 <= c.ttft_s <= c.total_s <= wall for c in completions)
    with pytest.raises(ConnectionError, match="no vLLM server answers"):
        VLLMClient("http://127.0.0.1:9").check()


def test_labels_are_read_off_the_generated_answer():
    assert label_of(" Happy, clearly", ("happy", "sad")) == "happy"
    assert label_of("I think sad", ("happy", "sad")) == "i think sad"


def test_the_vllm_sweep_runs_pre_llm_methods_and_keeps_rows_when_the_server_dies(fake_server, tmp_path):
    torch.set_num_threads(1)
    model = EmbeddedModel(tiny_speechlm(seed=0, layers=4, max_positions=4096), "tiny", trained=False)
    methods = vllm_methods(select_methods(None, 0, ctc_head=False), named=False)
    assert {m.name for m in methods} == {"none", "pre_merge", "samp", "segment_topk"}
    client = VLLMClient(fake_server)
    connect = lambda: contextlib.nullcontext(client)  # noqa: E731
    rows = run_vllm_sweep(model, toy_sets(), methods, (0.3, 0.97), connect, tmp_path / "rows.jsonl",
                          max_new_tokens=4, concurrency=2, progress=False)
    assert len(rows) == 2 * 7 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 14
    unreachable = [row for row in rows if row.get("unreachable")]
    assert unreachable and all(row["target"] == 0.97 for row in unreachable)  # a '—' cell, not a crash
    assert "| — |" in vllm_table(rows)
    rows = [row for row in rows if not row.get("unreachable")]
    full = {row["data"]: row for row in rows if row["method"] == "none"}
    for row in rows:
        if row["method"] == "none":
            assert row["flops_reduction"] == 0 and "transformers_agreement" in row
            continue
        assert row["audio_tokens"] < full[row["data"]]["audio_tokens"]  # fewer embeddings reached the server
        assert 0.2 < row["flops_reduction"] < 0.4
        assert row["task"] != "emotion" or row["fidelity"] == 1.0  # "happy <n>": the label agrees
        assert row["requests_per_s"] > 0 and row["ttft_ms_median"] >= 0
    FakeVLLM.fail_after = len(FakeVLLM.seen) + 3  # the server dies during the next sweep
    with pytest.raises(ConnectionError, match="rows finished so far are kept"):
        run_vllm_sweep(model, toy_sets(), methods, (0.3,), connect, tmp_path / "again.jsonl", max_new_tokens=4,
                       concurrency=1, progress=False)
    kept = (tmp_path / "again.jsonl").read_text().splitlines()
    assert len(kept) == 1 and json.loads(kept[0])["method"] == "none"


def test_the_vllm_sweep_gives_a_task_its_own_targets(fake_server, tmp_path):
    torch.set_num_threads(1)
    model = EmbeddedModel(tiny_speechlm(seed=0, layers=4, max_positions=4096), "tiny", trained=False)
    methods = vllm_methods(select_methods(["samp"], 0, ctc_head=False), named=True)
    client = VLLMClient(fake_server)
    rows = run_vllm_sweep(model, toy_sets(), methods, (0.3,), lambda: contextlib.nullcontext(client),
                          tmp_path / "rows.jsonl", max_new_tokens=4, concurrency=2, progress=False,
                          task_targets={"emotion": (0.2, 0.4)})
    targets = {task: sorted(row["target"] for row in rows if row["task"] == task and row["method"] == "samp")
               for task in ("asr", "emotion")}
    assert targets == {"asr": [0.3], "emotion": [0.2, 0.4]}


def test_in_decoder_methods_and_bad_options_are_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="paged KV cache keeps one length"):
        run_bench(BenchOptions(preset="quick", methods=["fastv"], engine="vllm", vllm_url="http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="serves speechtrim's SpeechLM"):
        run_bench(BenchOptions(preset="quick", model="Qwen/Qwen2-Audio-7B", engine="vllm"))
    with pytest.raises(ValueError, match="only applies with --engine vllm"):
        run_bench(BenchOptions(preset="quick", vllm_url="http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="--concurrency"):
        run_bench(BenchOptions(preset="quick", engine="vllm", vllm_url="http://127.0.0.1:9", concurrency=0))


def test_a_missing_vllm_environment_names_the_set_up_command(monkeypatch, tmp_path):
    import speechtrim.engines.vllm as engine

    monkeypatch.setattr(engine, "VLLM_VENV", tmp_path / "no-venv")
    with pytest.raises(FileNotFoundError, match="scripts/setup.sh"):
        run_bench(BenchOptions(preset="quick", engine="vllm"))
    assert reducers.REDUCERS.get("pre_merge").acts_on == "embeddings"


def test_the_throughput_study_measures_transformers_first_then_vllm(fake_server):
    torch.set_num_threads(1)
    model = EmbeddedModel(tiny_speechlm(seed=0, layers=4, max_positions=4096), "tiny", trained=False)
    methods = vllm_methods(select_methods(["pre_merge"], 0, ctc_head=False), named=True)
    clips = [item.audio for item in toy_sets()[0].items]
    client = VLLMClient(fake_server)
    rows = vllm_throughput(model, clips, methods, (2.0,), (0.5,), lambda: contextlib.nullcontext(client),
                           requests=2, max_new_tokens=3, progress=False)
    assert [row["method"] for row in rows] == ["none", "pre_merge"]
    assert FakeVLLM.fixed and all(FakeVLLM.fixed)  # fixed-length decodes, as the transformers loop runs them
    assert rows[1]["audio_tokens"] < rows[0]["audio_tokens"]
    assert all(row["vllm_requests_per_s"] > 0 and row["transformers_tokens_per_s"] > 0 for row in rows)
    assert "| 2 s x 2 | pre_merge | 50% |" in throughput_table(rows)
