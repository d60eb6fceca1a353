"""Checks of what an adapter load brings, all run before the model is changed: the weights file, the tensors' names,
dtypes, values and shapes, and the base model the adapter was made on (`ClmModel._prepare_adapter_config` calls
`check_load`). `check_shapes` also guards state dicts loaded by other routes, after injection (with a rollback)."""

from __future__ import annotations

import logging
import math
import os
import re

import torch
from torch import nn

from . import transformers_compat as compat
from .config import ClmConfig
from .low_rank import LowRankFactors


logger = logging.getLogger(__name__)


def checkpoint_prefix(model: nn.Module, layer_index: int) -> str:
    """Where a CLM adapter's tensors sit in its file: under the CLM layer of decoder layer `layer_index`."""
    layers_name, _ = compat.find_decoder_layers(model)
    return f"base_model.model.{layers_name}.{layer_index}.clm_layers."


def read_adapter_file(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of `directory/adapter_model.safetensors`; one clear error when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        others = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(directory, f))]
        hint = f" (found {others[0]}: only safetensors are read)" if others else ""
        raise FileNotFoundError(
            f"No adapter_model.safetensors in {directory}{hint}. (A config read from an adapter directory loads that "
            "adapter; to start a new adapter from its settings, build a new ClmConfig from them.)"
        )
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save the adapter.") from e


def check_adapter_tensors(tensors: dict, prefix: str, where: str) -> None:
    """Refuse an adapter whose tensors reach outside the CLM layer, are not floats, or are not finite."""
    if not any(".clm_layers." in k for k in tensors):
        raise ValueError(f"{where} holds no CLM layer tensors; it is not a CLM adapter.")
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


def expected_shapes(layer: nn.Module, zero_modules: tuple[str, ...], config: ClmConfig) -> dict[str, tuple]:
    """The state of one adapter of `config` on the wrapped `layer`, by key inside `clm_layers.<name>.`."""
    if config.r is None:
        return {name: tuple(p.shape) for name, p in layer.named_parameters()}
    return LowRankFactors.state_shapes(layer, zero_modules, config.r, config.lowrank_modules, config.train_norms)


def check_shapes(expected: dict[str, tuple], got: dict[str, tuple], adapter_name: str) -> None:
    """Refuse a state with missing, unexpected or other-shaped tensors (keys as in `expected`)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(got[k]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    detail = []
    if wrong:
        k = wrong[0]
        detail.append(f"{len(wrong)} tensor(s) of another shape, e.g. {k}: file {tuple(got[k])} vs model "
                      f"{tuple(expected[k])}")
    if missing:
        detail.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    raise ValueError(f"The CLM adapter {adapter_name!r} does not fit this model ({'; '.join(detail)}). It was saved "
                     "for a model of another architecture or size (or another rank); load it onto the base model it "
                     "was trained on. The model was left as it was.")


# ---------------------------------------------------------------------------------------------- the base
_SKETCH_SAMPLES = 1024
_SKETCH_TOLERANCE = 0.01  # relative to the sample's norm: float32/bfloat16/float16 copies of one checkpoint agree


def layer_sketch(layer: nn.Module) -> dict[str, list[float]]:
    """A cheap description of a layer's weights, to tell which base an adapter was made on: per parameter, the norm
    of a fixed strided sample of its values and their alternating-sign sum. Read on the device; agrees across
    dtypes within `_SKETCH_TOLERANCE`, while another checkpoint's weights differ by the order of the norm."""
    sketch = {}
    for name, p in layer.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SKETCH_SAMPLES)][:_SKETCH_SAMPLES].double()
        signs = torch.ones_like(sample)
        signs[1::2] = -1
        sketch[name] = [float(sample.norm()), float((sample * signs).sum())]
    return sketch


def _sketches_differ(saved: dict, current: dict) -> bool:
    if set(saved) != set(current):
        return True
    for name, (norm, alt) in saved.items():
        now_norm, now_alt = current[name]
        tolerance = _SKETCH_TOLERANCE * max(norm, now_norm) + 1e-6
        if not (math.isclose(norm, now_norm, abs_tol=tolerance) and math.isclose(alt, now_alt, abs_tol=tolerance)):
            return True
    return False


def check_base(config: ClmConfig, layer: nn.Module, model: nn.Module) -> None:
    """On load: refuse a low-rank adapter made on another base (its frozen weights are derived from this layer),
    warn for a full one (weights mode mixes towards this layer); adapters saved without a sketch compare names."""
    if any(p.device.type == "meta" for p in layer.parameters()):
        return
    if not isinstance(config.base_fingerprint, dict):  # saved before sketches existed: compare the base's name
        saved, current = config.base_model_name_or_path, compat.name_or_path(model)
        if saved and current and os.path.normpath(str(saved)) != os.path.normpath(current):
            logger.warning("this CLM adapter was trained on %r and is being loaded onto %r; its alpha 0 is this "
                           "model, and its alignment was learned on the other.", saved, current)
        return
    if not _sketches_differ(config.base_fingerprint, layer_sketch(layer)):
        return
    if config.r is not None:
        raise ValueError(
            "this low-rank CLM adapter was made on another base model: its frozen weights are derived from the base's "
            f"decoder layer {config.layer_index}, whose weights differ here. Load it onto the model it was trained on."
        )
    logger.warning("this CLM adapter was made on another base model (decoder layer %d differs); its alpha 0 is this "
                   "model, and its alignment was learned on the other.", config.layer_index)


def check_load(directory: str, config: ClmConfig, layer: nn.Module, model: nn.Module) -> None:
    """Everything a load from `directory` brings, checked before the model changes: a readable file of finite float
    tensors inside the CLM layer, of the shapes this model and config expect, made on this base."""
    tensors = read_adapter_file(directory)
    prefix = checkpoint_prefix(model, config.layer_index)
    check_adapter_tensors(tensors, prefix, os.path.join(directory, "adapter_model.safetensors"))
    expected = expected_shapes(layer, tuple(config.zero_modules), config)
    check_shapes(expected, {k.removeprefix(prefix): tuple(v.shape) for k, v in tensors.items()}, "from " + directory)
    check_base(config, layer, model)
