"""The checkout's `kernels/` directory (installed as `peft_clm.kernels`) never shadows PyPI's `kernels`.

From the repository root, `python -m ...` and `python -c ...` put the root on `sys.path`, where `kernels/` is
found as a top-level `kernels`; transformers >= 5.25 imports PyPI's `kernels` with itself (CI failed on this).
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = textwrap.dedent("""
    import json, sys
    import transformers.integrations.hub_kernels  # imports `kernels` when PyPI's is installed
    import peft_clm
    import kernels
    from peft_clm.kernels import hidden_mix
    print(json.dumps({"kernels": kernels.__file__, "ours": sys.modules["peft_clm.kernels"].__file__,
                      "version": getattr(kernels, "__version__", None)}))
""")


def _pypi_kernels_version() -> str | None:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_the_checkout_root_on_sys_path_does_not_shadow_pypi_kernels():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = os.path.join(ROOT, "kernels", "__init__.py")
    assert os.path.samefile(found["ours"], ours)
    if _pypi_kernels_version() is not None:
        # handed over: the top-level name is PyPI's package, with its version
        assert not os.path.samefile(found["kernels"], ours)
        assert found["version"] == _pypi_kernels_version()
    else:
        # nothing to hand over to: the directory stays importable as itself
        assert os.path.samefile(found["kernels"], ours)
