"""Mixing kernels of peft-clm (installed as `peft_clm.kernels`).

One op per pair of files: `<op>.py` holds the plain-torch reference and the dispatcher, `<op>_triton.py` the
Triton kernel. The dispatcher picks Triton for CUDA tensors when it is installed, and the reference elsewhere;
`PEFT_CLM_KERNELS=torch|triton` forces one side (Triton on CPU tensors needs `TRITON_INTERPRET=1`, as in CI).
This package imports nothing of peft_clm: from the repository root the directory is also importable as a
top-level `kernels`, a name transformers probes for when it is imported.
"""

from .dispatch import MAX_TERMS, kernel_backend
from .hidden_mix import hidden_mix, hidden_mix_reference
from .weight_mix import weight_mix, weight_mix_reference


__all__ = [
    "MAX_TERMS", "hidden_mix", "hidden_mix_reference", "kernel_backend", "weight_mix", "weight_mix_reference",
]
