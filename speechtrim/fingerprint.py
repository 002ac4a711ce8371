"""Content fingerprints: what decides whether a stored result may be reused.

A fingerprint hashes the bytes themselves (every weight of a model, every sample of a clip), never a name or a
path, so retrained weights under the same name or other audio under the same file name never match.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import nn


def module_fingerprint(module: nn.Module) -> str:
    """BLAKE2b of every parameter and buffer of ``module`` (names, dtypes, shapes and bytes), 32 hex digits."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.cpu().contiguous().reshape(-1)
        if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit patterns
            flat = flat.view(torch.int16)
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()


def array_fingerprint(array: np.ndarray) -> str:
    """BLAKE2b of an array's dtype, shape and bytes, 32 hex digits."""
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(f"{array.dtype}|{array.shape}|".encode(), digest_size=16)
    digest.update(array.tobytes())
    return digest.hexdigest()


def json_fingerprint(value: Any) -> str:
    """SHA-256 of a JSON-ready value with sorted keys, 32 hex digits."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


__all__ = ["array_fingerprint", "json_fingerprint", "module_fingerprint"]
