"""Mixing kernels of peft-clm (installed as `peft_clm.kernels`).

One op per pair of files: `<op>.py` holds the plain-torch reference and the dispatcher, `<op>_triton.py` the
Triton kernel. The dispatcher picks Triton for CUDA tensors when it is installed, and the reference elsewhere;
`PEFT_CLM_KERNELS=torch|triton` forces one side (Triton on CPU tensors needs `TRITON_INTERPRET=1`, as in CI).

Imported from a checkout's root (`python -m ...`, `python -c ...`, `python -m pytest`), this directory is also
found as a top-level `kernels`, which is PyPI's `kernels` package, a dependency of transformers >= 5.25 that
transformers imports with itself. Under that name the module hands over to PyPI's package when it is installed
(`_hand_over_to_pypi_kernels`), so the checkout never shadows it; without it, it stays importable as itself
and imports nothing of peft_clm.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_to_pypi_kernels() -> bool:
    """Replace this module in `sys.modules` by PyPI's `kernels`, found on `sys.path` without the checkout's root.

    Python's import returns whatever `sys.modules["kernels"]` holds once this module has run, so `import
    kernels` and `from kernels import ...` get PyPI's package. Returns False when there is none to hand over to.
    """
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    this = sys.modules["kernels"]
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules["kernels"] = this
        raise
    return True


if __name__ != "kernels" or not _hand_over_to_pypi_kernels():
    from .dispatch import MAX_TERMS, kernel_backend
    from .hidden_mix import hidden_mix, hidden_mix_reference
    from .weight_mix import weight_mix, weight_mix_reference

    __all__ = [
        "MAX_TERMS",
        "hidden_mix",
        "hidden_mix_reference",
        "kernel_backend",
        "weight_mix",
        "weight_mix_reference",
    ]
