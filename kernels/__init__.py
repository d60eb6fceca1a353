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


_MARKER = "weight_mix_triton.py"  # a file only this package has: how a copy of it is told from PyPI's


def _hand_over_to_pypi_kernels() -> bool:
    """Replace this module in `sys.modules` by PyPI's `kernels`: the first `kernels` on `sys.path` that is not a
    copy of this directory (this checkout under any spelling, a symlink, another checkout or worktree).

    Python's import returns whatever `sys.modules["kernels"]` holds once this module has run, so `import
    kernels` and `from kernels import ...` get PyPI's package. Returns False when there is none to hand over to.
    """
    path = list(sys.path)
    while True:
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None or spec.origin is None:
            return False
        found = os.path.dirname(spec.origin)
        if not os.path.exists(os.path.join(found, _MARKER)):
            break  # not one of ours: PyPI's
        copy_root = os.path.realpath(os.path.dirname(found))  # skip every entry that leads to that copy
        rest = [entry for entry in path if os.path.realpath(entry or os.curdir) != copy_root]
        if len(rest) == len(path):  # found through no plain entry (a custom finder): nothing more to skip
            return False
        path = rest
    module = importlib.util.module_from_spec(spec)
    this = sys.modules.get("kernels")
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if this is None:
            del sys.modules["kernels"]
        else:
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
