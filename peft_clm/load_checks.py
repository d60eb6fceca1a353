"""Checks of what an adapter load brings, run before anything is injected (or rolled back after): the weights file,
the tensors' names, dtypes and values, their shapes, and the base model the adapter was made on."""

from __future__ import annotations

import json
import logging
import os
import re
import struct

import torch
from torch import nn

from . import transformers_compat as compat
from .config import ClmConfig
from .layer import layer_fingerprint


logger = logging.getLogger("peft_clm.model")  # one logger for what a user sees while loading
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def checkpoint_prefix(model: nn.Module, layer_index: int) -> str:
    layers_name, _ = compat.find_decoder_layers(model)
    return f"base_model.model.{layers_name}.{layer_index}.clm_layers."


def check_adapter_tensors(tensors: dict, prefix: str, where: str) -> None:
    """Refuse an adapter whose tensors reach outside the CLM layer, are not floats, or are not finite."""
    outside = sorted(k for k in tensors if not k.startswith(prefix))
    if outside:
        other = re.search(r"\.(\d+)\.clm_layers\.", outside[0])
        if other and all(".clm_layers." in k for k in outside):
            raise ValueError(f"{where} holds a CLM layer for decoder layer {other.group(1)}, but its config says "
                             f"layer_index={prefix.split('.')[-3]}; the config or the weights were edited.")
        raise ValueError(f"{where} holds {len(outside)} tensor(s) outside the CLM layer (e.g. {outside[0]!r}); "
                         f"an adapter may only hold tensors under {prefix!r}. Nothing was loaded.")
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"{where}: tensor {key!r} has dtype {value.dtype}; CLM adapters hold float tensors only.")
        if not torch.isfinite(value).all():
            raise ValueError(f"{where}: tensor {key!r} holds NaN or infinite values. Nothing was loaded.")


def check_adapter_file(directory: str, prefix: str) -> None:
    """Raise a clear error unless `directory` holds a readable `adapter_model.safetensors` of finite float tensors,
    all inside the CLM layer (`prefix`). Read before injection, so a bad file never changes the model."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        others = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(directory, f))]
        hint = f" (found {others[0]}: only safetensors are read)" if others else ""
        raise FileNotFoundError(f"No adapter_model.safetensors in {directory}{hint}.")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, struct.error, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save the adapter.") from e
    bad = {k: d for k, d in dtypes.items() if d not in _FLOAT_DTYPES}
    if bad:
        key = next(iter(bad))
        raise ValueError(f"{path}: tensor {key!r} has dtype {bad[key]}; CLM adapters hold float tensors only.")
    if not any(".clm_layers." in k for k in tensors):
        raise ValueError(f"{path} holds no CLM layer tensors; it is not a CLM adapter.")
    check_adapter_tensors(tensors, prefix, path)


def check_shapes(model: nn.Module, adapter_name: str, remapped: dict) -> None:
    expected = {k: v for k, v in model.state_dict().items() if f".clm_layers.{adapter_name}." in k}
    strip = lambda k: k.removeprefix("base_model.model.")  # noqa: E731
    got = {strip(k): v for k, v in remapped.items()}
    want = {strip(k): v for k, v in expected.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(k for k in set(got) - set(want) if ".clm_layers." in k)
    wrong = sorted(k for k in set(want) & set(got) if tuple(got[k].shape) != tuple(want[k].shape))
    if not (missing or unexpected or wrong):
        return
    detail = []
    if wrong:
        k = wrong[0]
        detail.append(f"{len(wrong)} tensor(s) of another shape, e.g. {k}: file {tuple(got[k].shape)} vs model "
                      f"{tuple(want[k].shape)}")
    if missing:
        detail.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    raise ValueError(f"The CLM adapter {adapter_name!r} does not fit this model ({'; '.join(detail)}). It was saved "
                     "for a model of another architecture or size; load it onto the base model it was trained on. "
                     "The model was left as it was.")


def check_base(config: ClmConfig, layer: nn.Module) -> None:
    """Record which base layer an adapter is made on, or check it on load: refused for a low-rank adapter (its
    weights are derived from that layer), warned for a full one (weights mode mixes towards the base's layer)."""
    if any(p.device.type == "meta" for p in layer.parameters()):
        return
    current = layer_fingerprint(layer)
    if config.base_fingerprint is None:
        config.base_fingerprint = current
    elif config.base_fingerprint != current:
        if config.r is not None:
            raise ValueError(
                "this low-rank CLM adapter was made on another base model: its frozen weights are derived from the "
                f"base's decoder layer {config.layer_index}, whose weights differ here (fingerprint "
                f"{current} vs {config.base_fingerprint}). Load it onto the model it was trained on."
            )
        logger.warning("this CLM adapter was made on another base model (decoder layer %d differs); its alpha 0 is "
                       "this model, and its alignment was learned on the other.", config.layer_index)


def warn_other_base(config: ClmConfig, model: nn.Module) -> None:
    saved, current = config.base_model_name_or_path, getattr(model, "name_or_path", "")
    if saved and current and os.path.normpath(str(saved)) != os.path.normpath(str(current)):
        logger.warning("this CLM adapter was trained on %r and is being loaded onto %r; its alpha 0 is this model, "
                       "and its alignment was learned on the other.", saved, current)
