"""Chooses between the Triton kernels and their torch references."""

from __future__ import annotations

import importlib.util
import os

import torch


BACKENDS = ("torch", "triton")

# The Triton kernels take up to this many mixed terms (adapters); the torch references take any number.
MAX_TERMS = 4


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_backend(*tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op on `tensors`.

    Triton runs on CUDA tensors (or on CPU under `TRITON_INTERPRET=1`, which is how CI tests the kernels);
    everything else takes the torch reference. `PEFT_CLM_KERNELS` forces a side.
    """
    forced = os.environ.get("PEFT_CLM_KERNELS", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"PEFT_CLM_KERNELS={forced!r} is not one of {BACKENDS}.")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not _triton_available():
            raise RuntimeError("PEFT_CLM_KERNELS=triton but triton is not installed.")
        on_cuda = all(t.is_cuda for t in tensors)
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("PEFT_CLM_KERNELS=triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors.")
        return "triton"
    if _triton_available() and tensors and all(t.is_cuda for t in tensors):
        return "triton"
    return "torch"
