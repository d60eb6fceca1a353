"""Everything peft-clm relies on in transformers internals, one function per fact, each naming what it relies on.

A transformers upgrade means reading this file (checked against transformers 5.23).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from .constants import ATTENTION_LAYER_TYPES, RECURRENT_MODEL_TYPES


def text_config(config: Any) -> Any:
    """The text part of a config (`PretrainedConfig.get_text_config`; the config itself for text-only models)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, layers): the shallowest `nn.ModuleList` of `config.num_hidden_layers` modules.

    Relies on decoder-only models keeping their layers in one ModuleList of that length (`model.model.layers`,
    `transformer.h`, `gpt_neox.layers`, ...).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("CLM needs a transformers model (a module with a `config`).")
    n = getattr(text_config(config), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and n and len(m) == n]
    if not found:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__} (a ModuleList of num_hidden_layers={n} "
            "layers); CLM supports decoder-only transformers models."
        )
    return min(found, key=lambda item: item[0].count("."))


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that holds the decoder layers (e.g. `LlamaModel`): it builds the mask and rotary embeddings."""
    layers_name, _ = find_decoder_layers(model)
    return model.get_submodule(layers_name.rpartition(".")[0])


def recurrent_reason(model: nn.Module) -> Optional[str]:
    """Why the model's layers cannot be copied with a cache slot of their own (recurrent state), or None."""
    config = text_config(model.config)
    if config.model_type in RECURRENT_MODEL_TYPES:
        return f"{config.model_type} layers carry a recurrent state"
    types = set(getattr(config, "layer_types", None) or []) - ATTENTION_LAYER_TYPES
    if types:
        return f"its layers include {sorted(types)} (a recurrent state)"
    return None


def linear_modules(layer: nn.Module) -> dict[str, tuple[nn.Module, int, int, bool]]:
    """{name: (module, in_features, out_features, transposed)} of the linear modules of a decoder layer:
    `nn.Linear` (weight [out, in]) and transformers' `Conv1D` of GPT-2 (weight [in, out], so `transposed`)."""
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = (module, module.in_features, module.out_features, False)
        elif isinstance(module, Conv1D):
            found[name] = (module, module.weight.shape[0], module.weight.shape[1], True)
    return found


# ---------------------------------------------------------------------------------------------- KV-cache slots
def set_layer_index(module: nn.Module, index: int) -> None:
    """Give every submodule with an int `layer_idx` (the attention) the KV-cache slot `index`.

    Relies on attention modules reading and writing `past_key_values.layers[self.layer_idx]`.
    """
    for sub in module.modules():
        if isinstance(getattr(sub, "layer_idx", None), int):
            sub.layer_idx = index


def layer_index(module: nn.Module) -> int:
    """The KV-cache slot of a decoder layer (0 when it has none)."""
    return next((sub.layer_idx for sub in module.modules() if isinstance(getattr(sub, "layer_idx", None), int)), 0)


def find_cache(args: Sequence[Any], kwargs: dict) -> Optional[Cache]:
    """The KV cache passed to a decoder layer or model, if any (the self-attention part of an encoder-decoder one)."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, EncoderDecoderCache):
            return value.self_attention_cache
        if isinstance(value, Cache):
            return value
    return None


def slot_length(cache: Cache, index: int) -> int:
    """Tokens already in slot `index` of the cache (0 for a slot not created yet: caches may grow lazily)."""
    return cache.layers[index].get_seq_length() if index < len(cache.layers) else 0


def cache_rows(cache: Optional[Cache]) -> Optional[int]:
    """The batch rows the cache was built for (`keys` of its first filled slot), or None when nothing is in it."""
    if cache is None:
        return None
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() > 0:
            return keys.shape[0]
    return None


def ensure_cache_slots(cache: Optional[Cache], needed: int, template_index: int) -> None:
    """Make sure `cache` has `needed` slots, adding empty slots of the kind of slot `template_index`.

    A `DynamicCache` that generate() builds from the config holds exactly `num_hidden_layers` slots and does not
    grow (`layer_class_to_replicate` is None); the CLM layer's slots come after those. A cache that grows by itself
    is left alone.
    """
    if cache is None or getattr(cache, "layer_class_to_replicate", None) is not None or len(cache.layers) >= needed:
        return
    template = cache.layers[min(template_index, len(cache.layers) - 1)]
    if template.get_seq_length() > 0:
        raise RuntimeError(
            "This KV cache already holds tokens computed without the CLM layer; start generation with a new cache "
            "(or without one) while the adapter is active."
        )
    while len(cache.layers) < needed:
        cache.layers.append(copy.deepcopy(template))


def reorder_path_blocks(cache: Cache, beam_idx: torch.LongTensor) -> Cache:
    """Beam search's reorder (indices for B rows) applied to each path's block of a P*B-row cache."""
    n = beam_idx.numel()
    for layer in cache.layers:
        if layer.get_seq_length() == 0:
            continue
        paths = layer.keys.shape[0] // n
        idx = beam_idx if paths == 1 else torch.cat([beam_idx + p * n for p in range(paths)])
        layer.reorder_cache(idx)
    return cache


def install_beam_reorder(model: nn.Module, reorder: Optional[Callable[[Cache, torch.LongTensor], Cache]]) -> None:
    """Route beam search's cache reorder through `reorder` (None: back to the cache's own).

    Relies on `GenerationMixin._beam_search` calling `self._reorder_cache(cache, beam_idx)` when the model has one.
    """
    if reorder is None:
        model.__dict__.pop("_reorder_cache", None)
    else:
        model._reorder_cache = reorder


# ------------------------------------------------------------------------------------------ activation checkpointing
def checkpointing_setting(layer: nn.Module) -> tuple:
    """A decoder layer's activation-checkpointing setting: `GradientCheckpointingLayer.gradient_checkpointing` and
    the function `_gradient_checkpointing_func` it recomputes through."""
    function = getattr(layer, "_gradient_checkpointing_func", None)
    return (getattr(layer, "gradient_checkpointing", False), id(function))


def copy_checkpointing_setting(source: Optional[nn.Module], target: nn.Module) -> None:
    """Give every decoder layer inside `target` the activation-checkpointing setting of `source` (None: off)."""
    for module in target.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = bool(source is not None and getattr(source, "gradient_checkpointing", 0))
            if source is not None and hasattr(source, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = source._gradient_checkpointing_func


# ---------------------------------------------------------------------------------------------- generate
def generate_repeats(model: nn.Module, kwargs: dict) -> int:
    """How many times generate() repeats each input sequence in place: `num_beams` in beam search (the returned
    sequences are picked among the beams), else `num_return_sequences`."""
    config = kwargs.get("generation_config") or model.generation_config
    beams = int(kwargs.get("num_beams", config.num_beams) or 1)
    return beams if beams > 1 else int(kwargs.get("num_return_sequences", config.num_return_sequences) or 1)


# ---------------------------------------------------------------------------------------------- rows of a batch
def repeat_blocks(value: Any, times: int, batch: int) -> Any:
    """Repeat a per-sequence input `times` as whole blocks along the batch ([x; x; ...], one block per path):
    tensors with `batch` rows, and the dicts of masks per attention type that generate() passes with a static
    cache."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value] * times, dim=0)
    if isinstance(value, dict):
        return {k: repeat_blocks(v, times, batch) for k, v in value.items()}
    return value


def rows_block(value: Any, block: int, num_blocks: int, total: int) -> Any:
    """Block `block` of `num_blocks` equal blocks of a per-row value with `total` rows, or `m * total` rows laid out
    row-major (Bloom's alibi: batch x heads); tuples and dicts element-wise; anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] % total:
            return value
        size = value.shape[0] // num_blocks
        return value[block * size : (block + 1) * size]
    if isinstance(value, (tuple, list)):
        return type(value)(rows_block(v, block, num_blocks, total) for v in value)
    if isinstance(value, dict):
        return {k: rows_block(v, block, num_blocks, total) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------- outputs
@contextlib.contextmanager
def outputs_not_captured() -> Iterator[None]:
    """Run a block without recording `output_hidden_states` / `output_attentions`.

    Relies on `transformers.utils.output_capturing`: forward hooks on every module of a decoder-layer class append
    to the collector in `_active_collector`; the CLM layer's copies are of that class and would add entries.
    """
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older transformers without hook-based capture: nothing to hide
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)


def final_logit_softcapping(model: nn.Module) -> Optional[float]:
    """The cap of `tanh`-soft-capped logits (Gemma 2), which makes the LM head's output non-affine; None if none."""
    return getattr(text_config(model.config), "final_logit_softcapping", None)


def ask_for_output_object(module: nn.Module, kwargs: dict) -> tuple[dict, bool]:
    """(kwargs with `return_dict=True`, whether the caller asked for a tuple): outputs are mixed field by field, and
    `finish_output` makes the tuple at the end (`return_dict=False`, or the config's `return_dict`)."""
    wanted_tuple = kwargs.get("return_dict", getattr(module.config, "return_dict", True)) is False
    return {**kwargs, "return_dict": True}, wanted_tuple


def finish_output(output: Any, as_tuple: bool) -> Any:
    """A `ModelOutput` as the caller asked for it (`to_tuple()` drops the fields that are None)."""
    return output.to_tuple() if as_tuple else output


def with_causal_lm_loss(module: nn.Module, output: Any, labels: torch.Tensor, kwargs: dict) -> Any:
    """`output` with the model's own causal-LM loss (`PreTrainedModel.loss_function`) of its logits; rebuilt, so the
    loss comes first in its tuple as the model would put it."""
    extra = {"num_items_in_batch": kwargs["num_items_in_batch"]} if "num_items_in_batch" in kwargs else {}
    loss = module.loss_function(output.logits, labels, text_config(module.config).vocab_size, **extra)
    return type(output)(**{**dict(output.items()), "loss": loss})


def name_or_path(model: nn.Module) -> str:
    """Where a model was loaded from (`PreTrainedModel.name_or_path`; empty for a model built from a config)."""
    return str(getattr(model, "name_or_path", "") or "")


# ---------------------------------------------------------------------------------------------- merged config
def insert_layer_in_config(config: Any, index: int) -> None:
    """Account for one more decoder layer at `index`: `num_hidden_layers` and every per-layer config list
    (`layer_types`, sliding-window patterns), plus Qwen2's `max_window_layers` (a count of leading layers)."""
    config = text_config(config)
    old = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == old and not key.startswith("_"):
            new = list(value)
            new.insert(index, value[index])
            setattr(config, key, type(value)(new))
    max_window_layers = getattr(config, "max_window_layers", None)
    if isinstance(max_window_layers, int) and index < max_window_layers:
        config.max_window_layers = max_window_layers + 1
    config.num_hidden_layers = old + 1


def capture_layer_inputs(model: nn.Module, layer: nn.Module, num_tokens: int = 4) -> Optional[tuple]:
    """(args, kwargs) that `layer` receives in a forward of `model` on a few tokens; the forward stops there.

    Used to probe that a freshly copied layer is the identity, with the real mask and rotary embeddings. None
    when the model cannot run here (weights on the meta device).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.device.type == "meta":
        return None

    class _Stop(Exception):
        pass

    captured = {}

    def hook(module, args, kwargs):
        captured["call"] = (args, kwargs)
        raise _Stop

    ids = torch.arange(1, num_tokens + 1, device=weight.device).remainder(weight.shape[0])[None]
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured.get("call")
