"""The checkout's `kernels/` directory (installed as `peft_clm.kernels`) never shadows PyPI's `kernels`.

From the repository root, `python -m ...` and `python -c ...` put the root on `sys.path`, where `kernels/` is
found as a top-level `kernels`; transformers >= 5.25 imports PyPI's `kernels` with itself (CI failed on this).
`kernels/__init__.py` then hands the name over to PyPI's package. The stub tests run its real `__init__.py` in
throw-away checkouts with `python -S` (no site-packages, so no real PyPI `kernels`), beside a fake PyPI package.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = textwrap.dedent("""
    import importlib.machinery, json, os, sys
    # the shadowing this guards against is in place: the checkout's kernels/ is what the path finds first
    assert os.path.samefile(importlib.machinery.PathFinder.find_spec("kernels").origin,
                            os.path.join(sys.argv[1], "kernels", "__init__.py"))
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # keep the root on sys.path
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))  # '' and the absolute root
    proc = subprocess.run([sys.executable, "-c", PROBE, ROOT], cwd=ROOT, env=env, capture_output=True, text=True)
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


# ------------------------------------------------------------------------------ stub checkouts, fake PyPI package
STUBS = {
    "dispatch.py": "MAX_TERMS = 4\n\ndef kernel_backend():\n    return 'torch'\n",
    "hidden_mix.py": "def hidden_mix(*a):\n    pass\n\ndef hidden_mix_reference(*a):\n    pass\n",
    "weight_mix.py": "def weight_mix(*a):\n    pass\n\ndef weight_mix_reference(*a):\n    pass\n",
    "weight_mix_triton.py": "",
    "hidden_mix_triton.py": "",
}


def _checkout(where):
    os.makedirs(os.path.join(where, "kernels"))
    shutil.copy(os.path.join(ROOT, "kernels", "__init__.py"), os.path.join(where, "kernels", "__init__.py"))
    for name, text in STUBS.items():
        with open(os.path.join(where, "kernels", name), "w") as f:
            f.write(text)
    return str(where)


def _fake_pypi(where, body="__version__ = '9.9'\nclass CUDAProperties:\n    pass\n"):
    os.makedirs(os.path.join(where, "kernels"))
    with open(os.path.join(where, "kernels", "__init__.py"), "w") as f:
        f.write(body)
    with open(os.path.join(where, "kernels", "utils.py"), "w") as f:
        f.write("FROM_PYPI = True\n")
    return str(where)


def _import_kernels(cwd, *path):
    code = ("import sys, kernels\nprint(kernels.__file__)\nprint(getattr(kernels, '__version__', None), "
            "hasattr(kernels, 'hidden_mix'))\nif hasattr(kernels, 'CUDAProperties'):\n"
            "    from kernels.utils import FROM_PYPI\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def places(tmp_path):
    return {"checkout": _checkout(tmp_path / "checkout"), "pypi": _fake_pypi(tmp_path / "site"), "tmp": tmp_path}


def test_hands_over_to_the_pypi_package_submodules_included(places):
    proc = _import_kernels(places["checkout"], places["pypi"])
    assert proc.returncode == 0, proc.stderr
    file, state = proc.stdout.split("\n")[:2]
    assert file.startswith(places["pypi"]) and state == "9.9 False"


def test_stays_itself_when_there_is_no_pypi_package(places):
    proc = _import_kernels(places["checkout"])
    assert proc.returncode == 0, proc.stderr
    file, state = proc.stdout.split("\n")[:2]
    assert file.startswith(places["checkout"]) and state == "None True"


def test_the_checkout_under_two_spellings_or_two_checkouts_do_not_recurse(places):
    link = places["tmp"] / "link"
    os.symlink(places["checkout"], link)
    other = _checkout(places["tmp"] / "worktree")
    for path in ([str(link), places["pypi"]], [other, str(link), places["pypi"]]):
        proc = _import_kernels(places["checkout"], *path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split("\n")[:2] == [os.path.join(places["pypi"], "kernels", "__init__.py"), "9.9 False"]
    proc = _import_kernels(places["checkout"], other, str(link))  # copies only: the first stays itself
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[1] == "None True"


def test_an_error_in_the_pypi_package_comes_through(places):
    broken = _fake_pypi(places["tmp"] / "broken", body="raise ImportError('pypi kernels is broken')\n")
    proc = _import_kernels(places["checkout"], broken)
    assert proc.returncode != 0
    assert "pypi kernels is broken" in proc.stderr and "RecursionError" not in proc.stderr
