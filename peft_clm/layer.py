"""The CLM layer: wraps one decoder layer and runs identity-initialised copies of it before it."""

from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from .config import ClmConfig
from .kernels import hidden_mix, weight_mix

AlphaValue = Union[float, torch.Tensor]  # a number, or a 1-D CPU float tensor with one value per sequence

# Per-call state lives in context variables keyed by the layer's id, so that two threads generating with one
# model at different strengths never see each other's alpha (a server passes alpha per call).
_CALL_ALPHA: ContextVar[dict] = ContextVar("peft_clm_call_alpha", default={})
_PLAN: ContextVar[dict] = ContextVar("peft_clm_logits_plan", default={})

# Keyword arguments of a decoder layer that carry one row per sequence and so must follow a batch slice.
_BATCHED_LAYER_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "encoder_attention_mask")


@dataclass
class LogitsPlan:
    """How one forward in `logits` mode lays out its paths: block j of `batch` rows runs path `paths[j]`.

    `paths` holds adapter names (aligned paths) and `None` (the unaligned path, always last when present).
    `alphas` are the strengths of the aligned paths when the paths are mixed.
    """

    paths: list[Optional[str]]
    batch: int
    alphas: list[AlphaValue]

    @property
    def num_paths(self) -> int:
        return len(self.paths)


def _is_const(a: AlphaValue, value: float) -> bool:
    if isinstance(a, torch.Tensor):
        return bool((a == value).all())
    return a == value


def _check_rows(a: AlphaValue, rows: int) -> None:
    if isinstance(a, torch.Tensor) and a.shape[0] != rows:
        raise ValueError(
            f"alpha has {a.shape[0]} values (one per sequence) but the batch has {rows} rows; pass one alpha per "
            "sequence, or a single number."
        )


def find_cache(args: Sequence[Any], kwargs: dict) -> Optional[Cache]:
    """The KV cache passed to a decoder layer or model, if any (its self-attention part for encoder-decoder caches)."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, EncoderDecoderCache):
            return value.self_attention_cache
        if isinstance(value, Cache):
            return value
    return None


def _slice_rows(value: Any, rows: slice, total: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_rows(v, rows, total) for v in value)
    return value


class ClmLayer(nn.Module, BaseTunerLayer):
    """Wraps decoder layer `layer_index`; each adapter owns a copy of it (`clm_layers[name]`) that runs first.

    With several active adapters the modes generalise to `x + sum_i a_i (clm_i(x) - x)` (hidden),
    `w0 + sum_i a_i (w_i - w0)` (weights) and `base + sum_i a_i (aligned_i - base)` (logits).
    """

    adapter_layer_names = ("clm_layers",)
    other_param_names = ("alpha", "cache_slot")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: ClmConfig,
        *,
        zero_modules: Sequence[str],
        num_base_layers: int,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.clm_layers = nn.ModuleDict({})
        self.alpha: dict[str, AlphaValue] = {}
        self.cache_slot: dict[str, int] = {}
        self.zero_modules = tuple(zero_modules)
        self.num_base_layers = num_base_layers
        self.interpolation = config.interpolation
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merged_layer: list[nn.Module] = []  # a list so that it is not registered as a submodule
        self._weights_cache: Optional[tuple[Any, dict[str, torch.Tensor]]] = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ------------------------------------------------------------------ parameters
    def update_layer(self, adapter_name: str, config: ClmConfig, **kwargs: Any) -> None:
        layer = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            for p in self._zeroed_parameters(layer):
                if config.init_weights:
                    p.zero_()
                else:  # a non-identity layer, for tests
                    p.normal_(0.0, 0.02)
        used = set(self.cache_slot.values())
        slot = next(i for i in range(self.num_base_layers, self.num_base_layers + len(used) + 1) if i not in used)
        # The copy carries layer 0's `layer_idx`: give its attention a KV-cache slot of its own.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = slot
        layer.requires_grad_(True)
        self.clm_layers[adapter_name] = layer
        self.alpha[adapter_name] = config.alpha
        self.cache_slot[adapter_name] = slot
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _zeroed_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return [p for name in self.zero_modules for p in layer.get_submodule(name).parameters()]

    def _is_zeroed(self, param_name: str) -> bool:
        return any(param_name.startswith(name + ".") for name in self.zero_modules)

    def adapter_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The trained parameters of one adapter's layer, by name inside the decoder layer."""
        return dict(self.clm_layers[adapter_name].named_parameters())

    def identity_parameters(self) -> dict[str, torch.Tensor]:
        """`w0`: the identity initialisation, i.e. the wrapped layer's parameters with the output projections zeroed.

        Derived from the frozen wrapped layer, so nothing is stored twice.
        """
        out = {}
        for name, p in self.base_layer.named_parameters():
            out[name] = torch.zeros_like(p) if self._is_zeroed(name) else p
        return out

    def mixed_parameters(self, names: Sequence[str], alphas: Sequence[float]) -> dict[str, torch.Tensor]:
        """`w0 + sum_i alphas[i] * (w_i - w0)` for every parameter of the layer; differentiable."""
        w0 = self.identity_parameters()
        ws = [self.adapter_parameters(n) for n in names]
        return {k: weight_mix(w0[k], [w[k] for w in ws], alphas) for k in w0}

    # ------------------------------------------------------------------ alpha
    def resolved_alphas(self, adapter_names: Optional[Sequence[str]] = None) -> list[tuple[str, AlphaValue]]:
        """(name, alpha) of the active adapters, the per-call alpha taking precedence over `set_alpha`'s."""
        override = _CALL_ALPHA.get().get(id(self))
        source = self.alpha if override is None else override
        names = self.active_adapters if adapter_names is None else adapter_names
        return [(n, source[n]) for n in names]

    def plan_paths(self, batch: int, cache_rows: int = 0) -> LogitsPlan:
        """Which paths a `logits`-mode forward of `batch` sequences runs; only the ones alpha needs."""
        pairs = self.resolved_alphas()
        for _, a in pairs:
            _check_rows(a, batch)
        nonzero = [(n, a) for n, a in pairs if not _is_const(a, 0.0)]
        if not nonzero:  # alpha 0 everywhere: the unaligned path alone is the result
            paths: list[Optional[str]] = [None]
        elif len(nonzero) == 1 and _is_const(nonzero[0][1], 1.0):  # alpha 1: the aligned path alone
            paths = [nonzero[0][0]]
        else:
            paths = [n for n, _ in nonzero] + [None]
        if cache_rows and cache_rows != len(paths) * batch:
            raise ValueError(
                f"the KV cache holds {cache_rows} rows but alpha now needs {len(paths)} path(s) x {batch} sequences; "
                "alpha changed between calls sharing one cache. Keep alpha fixed for a generation, or start a new cache."
            )
        return LogitsPlan(paths=paths, batch=batch, alphas=[a for _, a in nonzero])

    def current_plan(self) -> Optional[LogitsPlan]:
        return _PLAN.get().get(id(self))

    @property
    def logits_active(self) -> bool:
        return (
            self.interpolation == "logits" and not self.disable_adapters and not self.merged and bool(self.active_adapters)
        )

    # ------------------------------------------------------------------ forward
    def _ensure_cache_slots(self, cache: Optional[Cache], names: Sequence[str]) -> None:
        if cache is None or getattr(cache, "layer_class_to_replicate", None) is not None:
            return  # no cache, or one that grows by itself
        needed = max(self.cache_slot[n] for n in names) + 1
        layers = cache.layers
        if len(layers) >= needed:
            return
        template = layers[min(self.layer_index_in_cache, len(layers) - 1)]
        if template.get_seq_length() > 0:
            raise RuntimeError(
                "This KV cache already holds tokens computed without the CLM layer; start generation with a new "
                "cache (or without one) while the adapter is active."
            )
        # A cache built by generate() holds exactly num_hidden_layers slots: add slots of the same kind.
        while len(layers) < needed:
            layers.append(copy.deepcopy(template))

    @property
    def layer_index_in_cache(self) -> int:
        # The wrapped layer's own slot, i.e. the kind of slot (full or sliding) the copy needs.
        for module in self.base_layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                return module.layer_idx
        return 0

    def _run(self, module: nn.Module, slot_names: Sequence[str], x: torch.Tensor, args, kwargs) -> torch.Tensor:
        self._ensure_cache_slots(find_cache(args, kwargs), slot_names)
        out = module(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _forward_hidden(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        pairs = self.resolved_alphas()
        for _, a in pairs:
            _check_rows(a, x.shape[0])
        pairs = [(n, a) for n, a in pairs if not _is_const(a, 0.0)]
        if not pairs:
            return x  # the identity, exactly
        ys = [self._run(self.clm_layers[n], [n], x, args, kwargs) for n, _ in pairs]
        if len(pairs) == 1 and _is_const(pairs[0][1], 1.0):
            return ys[0]
        return hidden_mix(x, ys, [a for _, a in pairs])

    def _weights_key(self, names: Sequence[str], alphas: Sequence[float]) -> tuple:
        params = [p for n in names for p in self.clm_layers[n].parameters()] + list(self.base_layer.parameters())
        return (tuple(names), tuple(alphas), tuple((id(p), p._version, p.device, p.dtype) for p in params))

    def _mixed_for_inference(self, names: Sequence[str], alphas: Sequence[float]) -> dict[str, torch.Tensor]:
        key = self._weights_key(names, alphas)
        if self._weights_cache is not None and self._weights_cache[0] == key:
            return self._weights_cache[1]
        w0 = self.identity_parameters()
        ws = [self.adapter_parameters(n) for n in names]
        old = self._weights_cache[1] if self._weights_cache is not None else {}
        mixed = {}
        with torch.no_grad():
            for k, base in w0.items():
                buf = old.get(k)
                if buf is None or buf.shape != base.shape or buf.dtype != base.dtype or buf.device != base.device:
                    buf = torch.empty_like(base)
                # written in place into the working weights, only when alpha or a weight changed
                mixed[k] = weight_mix(base, [w[k] for w in ws], alphas, out=buf)
        self._weights_cache = (key, mixed)
        return mixed

    def _forward_weights(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        pairs = self.resolved_alphas()
        if any(isinstance(a, torch.Tensor) for _, a in pairs):
            raise ValueError(
                "weights mode mixes parameters, so one alpha applies to the whole batch; per-sequence alpha needs "
                "interpolation='hidden' or 'logits'."
            )
        pairs = [(n, float(a)) for n, a in pairs if a != 0.0]
        if not pairs:
            return x  # w0 is exactly the identity
        names = [n for n, _ in pairs]
        if len(pairs) == 1 and pairs[0][1] == 1.0:
            return self._run(self.clm_layers[names[0]], names, x, args, kwargs)
        alphas = [a for _, a in pairs]
        needs_grad = torch.is_grad_enabled() and any(
            p.requires_grad for n in names for p in self.clm_layers[n].parameters()
        )
        params = self.mixed_parameters(names, alphas) if needs_grad else self._mixed_for_inference(names, alphas)
        template = self.clm_layers[names[0]]
        self._ensure_cache_slots(find_cache(args, kwargs), names[:1])
        # Activation checkpointing would recompute the layer in backward outside functional_call, i.e. with the
        # adapter's own weights instead of the mix: run this one layer without it.
        checkpointing = getattr(template, "gradient_checkpointing", False)
        template.gradient_checkpointing = False
        try:
            out = torch.func.functional_call(template, params, (x, *args), kwargs)
        finally:
            template.gradient_checkpointing = checkpointing
        return out[0] if isinstance(out, tuple) else out

    def _forward_logits(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        plan = self.current_plan()
        if plan is None:
            raise RuntimeError(
                "logits mode runs through the model's forward (which lays out the paths); this layer was called "
                "on its own. Call the model, or use interpolation='hidden'."
            )
        B, paths = plan.batch, plan.paths
        if x.shape[0] != plan.num_paths * B:
            raise RuntimeError(f"logits mode expected {plan.num_paths * B} rows, got {x.shape[0]}.")
        if paths == [None]:
            return x
        if len(paths) == 1:
            return self._run(self.clm_layers[paths[0]], paths, x, args, kwargs)
        total = x.shape[0]
        blocks = []
        for j, name in enumerate(paths[:-1]):
            rows = slice(j * B, (j + 1) * B)
            sub_args = _slice_rows(tuple(args), rows, total)
            sub_kwargs = {
                k: (_slice_rows(v, rows, total) if k in _BATCHED_LAYER_KWARGS else v) for k, v in kwargs.items()
            }
            blocks.append(self._run(self.clm_layers[name], [name], x[rows], sub_args, sub_kwargs))
        blocks.append(x[len(paths[:-1]) * B :])  # the unaligned path enters the original layers unchanged
        return torch.cat(blocks, dim=0)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.merged:
            h = self._run(self._merged_layer[0], self.merged_adapters[:1], hidden_states, args, kwargs)
        elif self.interpolation == "hidden":
            h = self._forward_hidden(hidden_states, args, kwargs)
        elif self.interpolation == "weights":
            h = self._forward_weights(hidden_states, args, kwargs)
        else:
            h = self._forward_logits(hidden_states, args, kwargs)
        return self.base_layer(h, *args, **kwargs)

    # ------------------------------------------------------------------ merging
    def build_merged_layer(self, adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        """One plain decoder layer equal to what the active adapters compute at their current alpha.

        Exact in `weights` mode at any alpha, and in `hidden`/`logits` modes where alpha is 0 (the identity) or one
        adapter is at 1; anything else raises, saying what to do instead.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        unknown = [n for n in names if n not in self.clm_layers]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(self.clm_layers)}.")
        if not names:
            raise ValueError("No adapter to merge.")
        pairs = [(n, self.alpha[n]) for n in names]
        if any(isinstance(a, torch.Tensor) for _, a in pairs):
            raise ValueError("A per-sequence alpha cannot be merged into one model; set one number with set_alpha().")
        nonzero = [(n, float(a)) for n, a in pairs if a != 0.0]
        layer = copy.deepcopy(self.clm_layers[names[0]])
        if self.interpolation == "weights" or not nonzero:
            params = self.mixed_parameters([n for n, _ in nonzero], [a for _, a in nonzero])
        elif len(nonzero) == 1 and nonzero[0][1] == 1.0:
            params = self.adapter_parameters(nonzero[0][0])
        else:
            raise ValueError(
                f"{self.interpolation} mode at alpha={dict(nonzero)} mixes outputs, which no single layer reproduces; "
                "merge with set_interpolation('weights') (exact at any alpha, with slightly different outputs), or at "
                "alpha 0 or 1 with one adapter, or keep the adapter unmerged."
            )
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(params[name])
        layer.requires_grad_(False)
        return layer

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        layer = self.build_merged_layer(adapter_names)
        if safe_merge and not all(torch.isfinite(p).all() for p in layer.parameters()):
            raise ValueError(f"NaNs or infs found while merging adapter(s) {adapter_names}.")
        self._merged_layer = [layer]
        self.merged_adapters = list(adapter_names)

    def unmerge(self) -> None:
        self._merged_layer = []
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "clm." + super().__repr__()
