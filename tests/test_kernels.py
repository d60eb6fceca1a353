"""Every Triton kernel against its plain-torch reference over shapes, dtypes, k and alpha, forward and backward.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest); on a GPU they run for real.
"""

import importlib.util

import pytest
import torch
from peft import get_peft_model
from tiny_models import inputs, perturb, tiny_model

from peft_clm import ClmConfig
from peft_clm.kernels import hidden_mix_reference, kernel_backend, weight_mix_reference


pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SHAPES = [(1, 1, 7), (2, 5, 33), (3, 4, 128), (2, 3, 1000)]


def _alphas(k, batch, per_row, g):
    fixed = [0.5, -0.5, 1.7, 2.0]
    if per_row:
        return [torch.randn(batch, generator=g) * 1.5 for _ in range(k)]
    return fixed[:k]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("per_row", [False, True])
def test_hidden_mix_forward_and_backward(shape, dtype, k, per_row):
    from peft_clm.kernels.hidden_mix_triton import hidden_mix_triton

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    ys = [torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(k)]
    alphas = _alphas(k, shape[0], per_row, g)
    grad = torch.randn(shape, generator=g).to(DEVICE, dtype)
    ref = hidden_mix_reference(x, ys, alphas)
    ref_grads = torch.autograd.grad(ref, [x, *ys], grad)
    out = hidden_mix_triton(x, ys, alphas)
    grads = torch.autograd.grad(out, [x, *ys], grad)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_hidden_mix_non_contiguous_input():
    from peft_clm.kernels.hidden_mix_triton import hidden_mix_triton

    x = torch.randn(5, 2, 33).transpose(0, 1).to(DEVICE)
    y = torch.randn(5, 2, 33).transpose(0, 1).to(DEVICE)
    assert not x.is_contiguous()
    torch.testing.assert_close(hidden_mix_triton(x, [y], [0.3]), hidden_mix_reference(x, [y], [0.3]))


@pytest.mark.parametrize("shape", [(7,), (33, 17), (128, 96), (3, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 4])
def test_weight_mix_in_place(shape, dtype, k):
    from peft_clm.kernels.weight_mix_triton import weight_mix_triton

    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(shape, generator=g).to(DEVICE, dtype)
    ws = [torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(k)]
    alphas = [0.5, -1.25, 1.5, 3.0][:k]
    out = torch.empty_like(w0)
    ptr = out.data_ptr()
    weight_mix_triton(w0, ws, alphas, out)
    assert out.data_ptr() == ptr
    tol = TOL[dtype]
    torch.testing.assert_close(out, weight_mix_reference(w0, ws, alphas), atol=tol, rtol=tol)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("mode", ["logits", "hidden", "weights"])
def test_full_model_same_logits_with_either_kernel_side(arch, mode, monkeypatch):
    ids, mask = inputs(batch=2, left_pad=1)
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode, alpha=0.6)).to(DEVICE)
    model.add_adapter("b", ClmConfig(interpolation=mode))
    perturb(model, seed=1)
    perturb(model, seed=2, adapter="b")
    model.base_model.set_adapter(["default", "b"])
    model.set_alpha({"default": 0.6, "b": -0.3} if mode == "weights" else {"default": [0.6, 1.2], "b": -0.3})
    import peft_clm.kernels.hidden_mix_triton as hm
    import peft_clm.kernels.weight_mix_triton as wm

    calls = []
    for mod, name in ((hm, "hidden_mix_triton"), (wm, "weight_mix_triton")):
        original = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    results = {}
    for side in ("torch", "triton"):
        monkeypatch.setenv("PEFT_CLM_KERNELS", side)
        with torch.no_grad():
            results[side] = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits
        model.base_model.clm_layer()._mixed_layers.clear()  # weights mode: mix again on the other side
    torch.testing.assert_close(results["triton"], results["torch"], atol=1e-5, rtol=1e-5)
    expected = {"weights": "weight_mix_triton", "hidden": "hidden_mix_triton", "logits": "hidden_mix_triton"}[mode]
    assert expected in calls  # the Triton side really ran


def test_dispatch(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("PEFT_CLM_KERNELS", "torch")
    assert kernel_backend(x) == "torch"
    monkeypatch.setenv("PEFT_CLM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="torch"):
        kernel_backend(x)
    monkeypatch.delenv("PEFT_CLM_KERNELS")
    assert kernel_backend(x) == ("triton" if x.is_cuda else "torch")


def test_numbers_go_to_the_kernel_as_arguments_and_only_per_sequence_alphas_make_a_table():
    """A number never builds a device tensor (on a GPU that copy synchronised with every kernel queued before it);
    one alpha per sequence makes one [k, batch] float32 table, numbers repeated in their rows."""
    from peft_clm.kernels.hidden_mix_triton import alpha_args

    table, scalars, rows_per_seq = alpha_args([0.5, -1.25], batch=2, rows=6, device=torch.device(DEVICE))
    assert table is None and scalars == (0.5, -1.25, 0.0, 0.0) and rows_per_seq == 6
    table, scalars, rows_per_seq = alpha_args([torch.tensor([0.5, 2.0]), 1.5], batch=2, rows=6,
                                              device=torch.device(DEVICE))
    assert rows_per_seq == 3 and table.dtype == torch.float32 and table.device.type == DEVICE
    torch.testing.assert_close(table.cpu(), torch.tensor([[0.5, 2.0], [1.5, 1.5]]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        alpha_args([torch.tensor([0.5, 2.0, 1.0])], batch=2, rows=6, device=torch.device(DEVICE))
