"""Mixing kernels of peft-clm (installed as `peft_clm.kernels`).

Each op has a plain-torch reference beside it; the dispatcher picks Triton for CUDA tensors when it is
available and the reference elsewhere. `PEFT_CLM_KERNELS=torch|triton` forces one side.
"""

from .dispatch import kernel_backend
from .dual_norm_mix import NormSpec, dual_norm_mix, dual_norm_mix_reference, norm_spec
from .hidden_mix import hidden_mix, hidden_mix_reference
from .weight_mix import weight_mix, weight_mix_reference

__all__ = [
    "NormSpec",
    "dual_norm_mix",
    "dual_norm_mix_reference",
    "norm_spec",
    "hidden_mix",
    "hidden_mix_reference",
    "kernel_backend",
    "weight_mix",
    "weight_mix_reference",
]
