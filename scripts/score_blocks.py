"""Time the tapped layer's one-pass attention (``key_attention_scores`` with values) against SDPA, per block size.

The scoring attention runs in blocks of query rows; how many rows fit the CPU's caches decides its speed. This
times SmolLM2-135M-shaped attention (9 query heads on 3 key heads, head size 64, causal, batch 1) at a few
lengths, for each block size, against ``scaled_dot_product_attention`` on the same tensors, and checks that every
block size gives the same scores and output.

    .venv/bin/python scripts/score_blocks.py --lengths 375,1500,3000 --rows 32,48,64,96,128,256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="375,1500,3000", help="comma-separated sequence lengths")
    parser.add_argument("--rows", default="32,48,64,96,128,256", help="comma-separated query rows per block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    lengths = [int(value) for value in args.lengths.split(",")]
    block_rows = [int(value) for value in args.rows.split(",")]
    if args.repeats < 1 or min(lengths) < 1 or min(block_rows) < 1:
        parser.error("--repeats, --lengths and --rows must be positive")

    import torch

    from speechtrim.hf import attention

    if args.threads:
        torch.set_num_threads(args.threads)

    def median_ms(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times)

    results = []
    default = attention._SCORE_BLOCK_ROWS
    try:
        for length in lengths:
            generator = torch.Generator().manual_seed(0)
            query = torch.randn(1, 9, length, 64, generator=generator)
            key, value = (torch.randn(1, 3, length, 64, generator=generator) for _ in range(2))
            sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, enable_gqa=True))
            attention._SCORE_BLOCK_ROWS = default
            reference = attention.key_attention_scores(query, key, None, None, value=value)
            row = {"length": length, "sdpa_ms": round(sdpa, 2), "blocks": {}}
            for rows in block_rows:
                attention._SCORE_BLOCK_ROWS = rows
                scores, output = attention.key_attention_scores(query, key, None, None, value=value)
                if not (torch.allclose(scores, reference[0], rtol=1e-4, atol=1e-3)
                        and torch.allclose(output, reference[1], rtol=1e-4, atol=1e-5)):
                    raise AssertionError(f"block size {rows} changed the scores or the output at length {length}")
                fused = median_ms(lambda: attention.key_attention_scores(query, key, None, None, value=value))
                row["blocks"][rows] = {"ms": round(fused, 2), "x_sdpa": round(fused / sdpa, 2)}
                print(f"{length} tokens, {rows} rows per block: {fused:.1f} ms = {fused / sdpa:.2f}x SDPA "
                      f"({sdpa:.1f} ms)")
            results.append(row)
    finally:
        attention._SCORE_BLOCK_ROWS = default
    print(json.dumps({"default_rows": default, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
