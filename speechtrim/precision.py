"""Mixed precision: bfloat16 matrix products under ``torch.autocast``, float32 weights and losses (training, encoding).

On a CPU with AMX or AVX512-BF16 units a bfloat16 matrix product runs an order of magnitude faster than a float32
one (1,600 x 576 x 1,536 on 2 cores here: 1.4 ms against 58 ms), but a training step is more than its products:
the embedded model's recipe (``train-embedded --precision bfloat16``) took 103 min against float32's 128 min on this
project's 2-core machine, packed encoding 1.9x, the CTC stage 2.1x, the joint stage only 1.2x faster; with the frozen
matrices cast once per stage (``FrozenWeights``) and on a faster day, 78 min (the packaged model; BENCHMARKS.md).
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


class FrozenWeights:
    """The frozen matrices of ``module`` held in ``precision`` while a training loop runs, restored for the rest.

    Under autocast every step casts each frozen float32 weight to bfloat16 again (and frees the copy at the end of
    the step); casting them once for the whole stage gives the same products without that work (4.23 s against
    4.59 s a joint step of the embedded recipe on this project's 2-core CPU). Only 2-D weights that do not require a
    gradient are cast, never ``skip`` (e.g. the input embeddings, which the projector scores against); ``lower()``
    swaps the low-precision copies in, ``restore()`` the float32 tensors back (cheap: no copy either way), so that an
    evaluation or a save in between sees the model as it was. With "float32" both do nothing.
    """

    def __init__(self, module: torch.nn.Module, precision: str, skip: tuple[torch.Tensor, ...] = ()) -> None:
        check_precision(precision)
        skipped = {id(tensor) for tensor in skip}
        self._weights: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        if precision == "float32":
            return
        dtype = getattr(torch, precision)
        for parameter in module.parameters():
            if (parameter.dim() == 2 and not parameter.requires_grad and parameter.dtype == torch.float32
                    and id(parameter) not in skipped):
                self._weights.append((parameter, parameter.data, parameter.data.to(dtype)))

    def lower(self) -> None:
        for parameter, _, low in self._weights:
            parameter.data = low

    def restore(self) -> None:
        for parameter, full, _ in self._weights:
            parameter.data = full

    def __len__(self) -> int:
        return len(self._weights)


def cache_suffix(precision: str) -> str:
    """What an encoder-frame cache's id carries so that frames computed in one precision never stand in for the
    other's ("" for float32, the cache ids of before)."""
    check_precision(precision)
    return "" if precision == "float32" else f"-{precision}"


__all__ = ["PRECISIONS", "FrozenWeights", "cache_suffix", "check_precision", "compute_precision"]
