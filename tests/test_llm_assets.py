"""The packaged SmolLM2 loads offline and talks sense; unknown names fail with a useful message."""

import pytest

from speechtrim.assets import llm


def test_unknown_packaged_name_lists_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m"):
        llm.prepare_llm("gpt-7")


def test_unreachable_hub_id_says_what_works_offline():
    with pytest.raises(ValueError, match="packaged one"):
        llm.load_llm("no-such-org/no-such-model-speechtrim")


def test_cache_key_follows_package_version_and_checksum(tmp_cache):
    folder = llm.llm_cache_dir("smollm2-135m")
    assert folder.parent == tmp_cache
    assert "0.1.2" in folder.name and len(folder.name.rsplit("-", 1)[1]) == 12


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt():
    model, tokenizer = llm.load_llm("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer


@pytest.mark.slow
def test_second_prepare_reuses_the_cache():
    first = llm.prepare_llm("smollm2-135m")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert llm.prepare_llm("smollm2-135m") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
