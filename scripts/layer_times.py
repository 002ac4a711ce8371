"""Per-layer prefill times of the embedded model, unreduced, with a method, and with the method at ratio 0.

Where does a reducer's prefill time go? The scaling study reports totals; this prints, for one audio length, the
median time of every decoder layer (and of what runs outside the layers) over alternating runs of the three
configurations, with the length each layer received (a layer that reduces does so inside its own time). Fitting ``time = fixed + per_token * length`` to the unreduced
and reduced layers separates what the machine charges per layer whatever the length (on CPU, mostly reading the
layer's weights) from the method's own cost. For the layers that ran shorter with the method it also prints their
time as a share of the same layer's unreduced time next to what the FLOPs predict for their lengths: FastAdaSP's
eq. 10 and the compute count (``speechtrim.flops.compute_layer_flops``: every linear weight, causal attention).

    .venv/bin/python scripts/layer_times.py --seconds 60 --method random_evict --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="audio length (pocketsphinx clips tiled)")
    parser.add_argument("--method", default="fastadasp-sparse", help="a bench method name")
    parser.add_argument("--target", type=float, default=0.5, help="its prefill-FLOPs reduction (or ratio)")
    parser.add_argument("--layer", type=int, default=6, help="first reduction layer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.seconds <= 0 or args.repeats < 1 or not 0 < args.target < 1:
        parser.error("--seconds > 0, --repeats >= 1 and --target in (0, 1)")

    import torch

    from speechtrim.bench.runner import load_bench_model, median_encode, run_item
    from speechtrim.bench.scaling import LayerClock, _median_layers, long_audio
    from speechtrim.bench.sweep import select_methods
    from speechtrim.data.realspeech import load_pocketsphinx_clips
    from speechtrim.eval.harness import EvalItem
    from speechtrim.hf.layers import text_backbone
    from speechtrim.prompts import ASR_PROMPT

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in select_methods([args.method], args.layer) if m.reducer is not None]
    if len(methods) != 1 or methods[0].layer is None:
        parser.error(f"--method takes one in-decoder method (not a pre-LLM one), got {args.method!r}")
    method = methods[0]
    model = load_bench_model("embedded")
    audio = long_audio([clip.load() for clip in load_pocketsphinx_clips()], args.seconds)
    prepared = median_encode(model, EvalItem(f"{args.seconds:g}s", audio, "", ASR_PROMPT), 1)
    backbone = text_backbone(model.decoder)
    layers = backbone.layers
    configs = {"none": None, args.method: method.build(args.target), "ratio 0": method.build_zero()}
    for reducer in configs.values():  # warm-up
        run_item(model, prepared, reducer, None, 1, 1, stop_at_eos=False)
    clocks: dict[str, list] = {name: [] for name in configs}
    totals: dict[str, list] = {name: [] for name in configs}
    for _ in range(args.repeats):  # turns, so that a drift of the machine hits all three alike
        for name, reducer in configs.items():
            with LayerClock(layers) as clock:
                run = run_item(model, prepared, reducer, None, 1, 1, stop_at_eos=False)
            clocks[name].append(clock.prefill)
            totals[name].append(run.prefill_s)
    summary = {}
    for name in configs:
        per_layer = [(length, 1000 * seconds) for length, seconds in _median_layers(clocks[name])]
        total = 1000 * statistics.median(totals[name])
        inside = sum(ms for _, ms in per_layer)
        print(f"{name}: prefill {total:.0f} ms = layers {inside:.0f} ms + outside the layers {total - inside:.0f} ms")
        print("   layer:input length/ms  " + " ".join(f"{i}:{n}/{ms:.1f}" for i, (n, ms) in enumerate(per_layer)))
        summary[name] = {"prefill_ms": total, "layers": per_layer}
    from speechtrim.flops import compute_layer_flops, layer_flops, linear_weights

    width = backbone.num_heads * backbone.head_dim
    shares = []
    for index, ((full_n, full_ms), (_, ms)) in enumerate(zip(summary["none"]["layers"],
                                                                summary[args.method]["layers"])):
        # a layer's input length is what its pre-hook saw; the next layer's input is what this one ran on
        ran = summary[args.method]["layers"][index + 1][0] if index + 1 < len(layers) else None
        if ran is None or ran >= full_n or full_ms <= 0 or index < args.layer:
            continue
        weights = linear_weights(layers[index])
        shares.append({"layer": index, "length": ran, "measured": ms / full_ms,
                       "eq10": layer_flops(ran, backbone.hidden_size, backbone.intermediate_size)
                       / layer_flops(full_n, backbone.hidden_size, backbone.intermediate_size),
                       "compute": compute_layer_flops(ran, weights, width) / compute_layer_flops(full_n, weights, width)})
    if shares:
        middle = {key: statistics.median(share[key] for share in shares) for key in ("measured", "eq10", "compute")}
        print(f"layers {shares[0]['layer']}-{shares[-1]['layer']} on fewer tokens: median time {middle['measured']:.3f} "
              f"of the unreduced layer's; FLOPs predict {middle['compute']:.3f} (compute count), "
              f"{middle['eq10']:.3f} (eq. 10)")
        summary["shorter_layers"] = {"layers": len(shares), **{key: round(value, 4) for key, value in middle.items()}}
    print(json.dumps({"seconds": args.seconds, "method": args.method, "target": args.target, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
