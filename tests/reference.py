"""Independent reference implementations of the CLM formulas, built on the plain base model with hooks."""

from __future__ import annotations

import contextlib
import copy

import torch

from peft_clm.transformers_compat import find_decoder_layers


@contextlib.contextmanager
def pre_layer(base_model, transform):
    """Replace the input x of decoder layer 0 of `base_model` by transform(x, args, kwargs)."""
    _, layers = find_decoder_layers(base_model)

    def hook(module, args, kwargs):
        return (transform(args[0], args[1:], kwargs), *args[1:]), kwargs

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def standalone_copy(module, slot: int):
    layer = copy.deepcopy(module)
    for m in layer.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            m.layer_idx = slot
    return layer


def hidden_reference_logits(base_model, clm_layers, alphas, ids, mask):
    """x + sum_i a_i (clm_i(x) - x) before layer 0, computed without peft_clm, no cache."""

    def transform(x, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "layer_past")}
        args = tuple(None if "Cache" in type(a).__name__ else a for a in args)
        out = x.clone()
        for layer, a in zip(clm_layers, alphas):
            y = layer(x, *args, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            a = a.view(-1, 1, 1) if isinstance(a, torch.Tensor) else a
            out = out + a * (y - x)
        return out

    with pre_layer(base_model, transform), torch.no_grad():
        return base_model(ids, attention_mask=mask, use_cache=False).logits
