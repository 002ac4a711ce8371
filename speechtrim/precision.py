"""Mixed precision: bfloat16 matrix products under ``torch.autocast``, float32 weights and losses (training, encoding).

On a CPU with AMX or AVX512-BF16 units a bfloat16 matrix product runs an order of magnitude faster than a float32
one (1,600 x 576 x 1,536 on 2 cores here: 1.4 ms against 58 ms), but a training step is more than its products:
the embedded model's recipe (``train-embedded --precision bfloat16``) took 103 min against float32's 128 min on this
project's 2-core machine, packed encoding 1.9x, the CTC stage 2.1x, the joint stage only 1.2x faster (BENCHMARKS.md).
The trainable weights, their gradients, the optimiser's states and the losses stay float32 (autocast keeps
``ctc_loss``, ``log_softmax`` and the reductions in float32); the frozen encoder's and LLM's products run in
bfloat16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
    """Raise a ValueError naming the choices unless ``precision`` is one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


@contextlib.contextmanager
def compute_precision(precision: str, device: torch.device | str = "cpu", backward: bool = False) -> Iterator[None]:
    """Run the block's matrix products in ``precision`` on ``device`` ("float32": unchanged).

    With "bfloat16" the block runs under ``torch.autocast(device, torch.bfloat16)``. ``backward``: the block's
    graph will be differentiated (a training step); on a CPU it then also picks the math kernel of
    ``scaled_dot_product_attention``, whose backward pass in bfloat16 is 1.2x faster there than the fused kernel's at
    the joint stage's ~100-token sequences (at the encoder's 1,500 frames, without a backward pass, the math kernel is
    3x slower: inference keeps the fused one).
    """
    check_precision(precision)
    if precision == "float32":
        yield
        return
    device_type = torch.device(device).type
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        if backward and device_type == "cpu":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def cache_suffix(precision: str) -> str:
    """What an encoder-frame cache's id carries so that frames computed in one precision never stand in for the
    other's ("" for float32, the cache ids of before)."""
    check_precision(precision)
    return "" if precision == "float32" else f"-{precision}"


__all__ = ["PRECISIONS", "cache_suffix", "check_precision", "compute_precision"]
