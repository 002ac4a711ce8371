"""speechtrim's cache evictors against NVIDIA kvpress's presses at equal KV-cache size, on the embedded model.

kvpress is never a dependency of speechtrim: it runs in its own environment (``.venv-kvpress``, made by
``--setup``), on the embedded model's LLM exported as a plain Hugging Face folder (LoRA merged), fed the very same
``inputs_embeds`` the embedded model builds. Both sides run a manual prefill (kvpress: with the press attached, as
its own pipeline does) and a fixed-length greedy loop for a fixed number of tokens; a press's compression ratio is set so
that it keeps exactly as many KV columns per layer as the speechtrim method kept.

    .venv/bin/python scripts/kvpress_side_by_side.py --setup          # once: .venv-kvpress with kvpress 0.5.5
    .venv/bin/python scripts/kvpress_side_by_side.py --ratios 0.15,0.3 --clips 14

Steps (the script runs all three; ``--step`` runs one): ``prepare`` (speechtrim's venv: prompts, unreduced and
speechtrim outputs, kept columns, prefill times), ``kvpress`` (kvpress's venv, started as a child process: every
press at each matched size), ``table`` (token agreement with the unreduced output, prefill time against the
unreduced prefill; markdown and one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KVPRESS_VENV = ROOT / ".venv-kvpress"
KVPRESS_VERSION = "0.5.5"
PRESSES = ("ObservedAttentionPress", "ExpectedAttentionPress", "SnapKVPress", "StreamingLLMPress", "KnormPress")
METHODS = ("h2o", "snapkv")


def agreement(output: list[int], reference: list[int]) -> float:
    """Share of the reference's tokens reproduced at the same positions."""
    if not reference:
        return 1.0
    return sum(a == b for a, b in zip(output, reference)) / len(reference)


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def greedy(model, inputs: dict, cache, first_logits, new_tokens: int) -> list[int]:
    """kvpress's side (its own transformers, so not speechtrim's ``greedy_continue``): fixed-length greedy decode
    over a compressed cache, positions only and no mask, as kvpress's pipeline decodes; batch of one."""
    import torch

    token = first_logits.argmax(dim=-1, keepdim=True)  # (1, 1)
    generated = [int(token)]
    position = inputs["position_ids"][..., -1:]
    with torch.no_grad():
        while len(generated) < new_tokens:
            position = position + 1
            out = model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            generated.append(int(token))
    return generated


def prepare(work: Path, clips: int, ratios: list[float], new_tokens: int, repeats: int) -> None:
    """speechtrim's side: prompts, unreduced and evicted outputs, kept columns and prefill times."""
    import torch

    from speechtrim import reducers
    from speechtrim.bench.runner import load_bench_model
    from speechtrim.engines.vllm import export_llm
    from speechtrim.eval.harness import load_eval_set
    from speechtrim.hf.kv_evict import kv_cache_bytes
    from speechtrim.hf.layers import returned_cache
    from speechtrim.inference import greedy_continue

    model = load_bench_model("embedded")
    llm_folder = export_llm(model.speechlm)
    real = load_eval_set("pocketsphinx").items
    extra = load_eval_set("synthetic-asr", clips - len(real)).items if clips > len(real) else []
    items = (real + extra)[:clips]
    rows, prompts = [], []
    for index, item in enumerate(items):
        prepared = model.prepare(item)
        prompts.append({name: value.cpu() for name, value in prepared.kwargs.items()})
        runs = {}
        for name, ratio in [("none", 0.0)] + [(m, r) for m in METHODS for r in ratios]:
            reducer = reducers.build(name, ratio=ratio) if name != "none" else None
            times, outputs, kept, size = [], None, None, None
            for _ in range(repeats):
                with torch.no_grad():
                    if reducer is None:
                        out, seconds = _timed(lambda: model.decoder(**prepared.kwargs, use_cache=True))
                        stats = None
                        generated = greedy_continue(model.decoder, out.logits[:, -1], returned_cache(out),
                                                    prepared.kwargs["attention_mask"],
                                                    prepared.kwargs["position_ids"], new_tokens, set())
                    else:
                        with reducer(model.decoder, audio_spans=prepared.audio_spans) as stats:
                            out, seconds = _timed(lambda: model.decoder(**prepared.kwargs, use_cache=True))
                            generated = greedy_continue(model.decoder, out.logits[:, -1], returned_cache(out),
                                                        prepared.kwargs["attention_mask"],
                                                        prepared.kwargs["position_ids"], new_tokens, set())
                times.append(seconds)
                outputs = generated
                size = kv_cache_bytes(returned_cache(out))
                kept = list(stats.cache_tokens_per_layer) if stats is not None else [prepared.length]
            runs[f"{name}@{ratio:g}"] = {"method": name, "ratio": ratio, "tokens": outputs, "kept": kept,
                                         "kv_bytes": size, "prefill_s": statistics.median(times)}
        rows.append({"clip": item.id, "length": prepared.length, "audio_tokens": prepared.audio_tokens,
                     "runs": runs})
        print(f"prepared {index + 1}/{len(items)}: {item.id}", file=sys.stderr, flush=True)
    torch.save(prompts, work / "prompts.pt")
    (work / "speechtrim.json").write_text(json.dumps({"llm": str(llm_folder), "new_tokens": new_tokens,
                                                      "ratios": ratios, "rows": rows}))


def run_kvpress(work: Path, repeats: int) -> None:
    """kvpress's side (run in .venv-kvpress): every press at the column counts speechtrim's methods kept."""
    import kvpress
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    spec = json.loads((work / "speechtrim.json").read_text())
    prompts = torch.load(work / "prompts.pt")
    models = {impl: AutoModelForCausalLM.from_pretrained(spec["llm"], attn_implementation=impl).eval()
              for impl in ("eager", "sdpa")}
    results = []
    for row, prompt in zip(spec["rows"], prompts):
        length = row["length"]
        targets = sorted({run["kept"][0] for run in row["runs"].values() if run["method"] != "none"})
        runs = {}
        for press_name in ("none",) + PRESSES:
            for kept in ([length] if press_name == "none" else targets):
                impl = "eager" if press_name == "ObservedAttentionPress" else "sdpa"
                model = models[impl]
                press = None
                if press_name != "none":
                    ratio = 1.0 - (kept + 0.5) / length  # int(length * (1 - ratio)) == kept
                    options = {"compression_ratio": ratio}
                    if press_name == "SnapKVPress":  # its observation window (default 64) must be shorter than
                        options["window_size"] = min(64, length // 2)  # the prompt: these are ~60-150 tokens
                    press = getattr(kvpress, press_name)(**options)
                times, tokens, cached = [], None, None
                for _ in range(repeats):
                    cache = DynamicCache()
                    with torch.no_grad():
                        if press is None:
                            out, seconds = _timed(lambda: model(**prompt, past_key_values=cache, use_cache=True))
                        else:
                            extra = {"output_attentions": True} if impl == "eager" else {}  # what H2O reads
                            with press(model):
                                out, seconds = _timed(lambda: model(**prompt, past_key_values=cache,
                                                                    use_cache=True, **extra))
                    times.append(seconds)
                    cached = int(cache.get_seq_length())
                    tokens = greedy(model, prompt, cache, out.logits[:, -1], spec["new_tokens"])
                runs[f"{press_name}@{kept}"] = {"press": press_name, "kept": kept, "cached": cached,
                                                "tokens": tokens, "prefill_s": statistics.median(times)}
        results.append({"clip": row["clip"], "runs": runs})
        print(f"kvpress {len(results)}/{len(prompts)}: {row['clip']}", file=sys.stderr, flush=True)
    (work / "kvpress.json").write_text(json.dumps({"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__")
                                                   else KVPRESS_VERSION, "rows": results}))


def table(work: Path) -> dict:
    """Token agreement with speechtrim's unreduced output and prefill time relative to each side's unreduced run."""
    ours = json.loads((work / "speechtrim.json").read_text())
    theirs = json.loads((work / "kvpress.json").read_text())
    lines = ["| method | KV kept (mean) | KV saved % | token agreement | prefill × own unreduced |",
             "|---|---|---|---|---|"]
    summary = {"clips": len(ours["rows"]), "new_tokens": ours["new_tokens"], "rows": []}
    same = sum(t["runs"][f"none@{o['length']}"]["tokens"] == o["runs"]["none@0"]["tokens"]
               for o, t in zip(ours["rows"], theirs["rows"]))
    summary["unreduced_equal"] = same
    for ratio in ours["ratios"]:
        entries = []
        for method in METHODS:
            key = f"{method}@{ratio:g}"
            entries.append((f"speechtrim {method}", [
                (o["runs"][key]["kept"][0], o["length"], agreement(o["runs"][key]["tokens"], o["runs"]["none@0"]["tokens"]),
                 o["runs"][key]["prefill_s"] / o["runs"]["none@0"]["prefill_s"]) for o in ours["rows"]]))
        for press in PRESSES:
            per_clip = []
            for o, t in zip(ours["rows"], theirs["rows"]):
                kept = o["runs"][f"h2o@{ratio:g}"]["kept"][0]
                run = t["runs"][f"{press}@{kept}"]
                per_clip.append((run["cached"], o["length"], agreement(run["tokens"], o["runs"]["none@0"]["tokens"]),
                                 run["prefill_s"] / t["runs"][f"none@{o['length']}"]["prefill_s"]))
            entries.append((f"kvpress {press}", per_clip))
        for name, per_clip in entries:
            kept = statistics.mean(k for k, *_ in per_clip)
            saved = 100 * statistics.mean(1 - k / n for k, n, *_ in per_clip)
            agree = statistics.mean(a for *_, a, _ in per_clip)
            slow = statistics.median(s for *_, s in per_clip)
            lines.append(f"| {name} (ratio {ratio:g}) | {kept:.1f} | {saved:.1f} | {agree:.3f} | {slow:.2f} |")
            summary["rows"].append({"method": name, "ratio": ratio, "kv_kept": kept, "kv_saved_pct": saved,
                                    "token_agreement": agree, "prefill_vs_unreduced": slow})
    text = "\n".join(lines) + (f"\n\n{len(ours['rows'])} clips, {ours['new_tokens']} greedy tokens each; unreduced "
                               f"outputs equal on both sides for {same}/{len(ours['rows'])} clips.")
    (work / "table.md").write_text(text + "\n")
    print(text)
    return summary


def setup() -> None:
    """Make .venv-kvpress: the CPU torch wheel pinned like speechtrim's, then kvpress (which picks transformers)."""
    if not (KVPRESS_VENV / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(KVPRESS_VENV)], check=True)
    pip = [str(KVPRESS_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0", f"kvpress=={KVPRESS_VERSION}"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="make .venv-kvpress and exit")
    parser.add_argument("--step", choices=("prepare", "kvpress", "table"), default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "kvpress-side-by-side")
    parser.add_argument("--clips", type=int, default=14)
    parser.add_argument("--ratios", default="0.15,0.3", help="eviction ratios of speechtrim's h2o and snapkv")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.setup:
        setup()
        return 0
    ratios = [float(part) for part in args.ratios.split(",") if part.strip()]
    if not ratios or not all(0 < r < 1 for r in ratios) or args.clips < 1 or args.new_tokens < 1:
        parser.error("--ratios takes eviction ratios in (0, 1) such as 0.15,0.3; --clips and --new-tokens >= 1")
    python = KVPRESS_VENV / "bin" / "python"
    if args.step is None and not python.is_file():  # said before the slow part, not after it
        print(f"{python} is missing: run `.venv/bin/python {Path(__file__).relative_to(ROOT)} --setup` first",
              file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step in (None, "prepare"):
        prepare(args.work, args.clips, ratios, args.new_tokens, args.repeats)
    if args.step in (None, "kvpress"):
        if args.step is None:
            subprocess.run([str(python), __file__, "--step", "kvpress", "--work", str(args.work),
                            "--repeats", str(args.repeats)], check=True, env={**os.environ, "PYTHONPATH": ""})
        else:
            run_kvpress(args.work, args.repeats)
    if args.step in (None, "table"):
        print(json.dumps(table(args.work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
