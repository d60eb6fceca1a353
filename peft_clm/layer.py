"""`ClmLayer`: wraps decoder layer L; each adapter owns an identity-initialised copy of it that runs before it."""

from __future__ import annotations

import collections
import copy
import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import transformers_compat as compat
from .alpha import AlphaValue, Terms, active_terms, call_state
from .config import ClmConfig
from .constants import LAYER_ROW_KWARGS, is_in_modules
from .kernels import hidden_mix, weight_mix
from .low_rank import LowRankFactors, build_runner


class CacheGuard:
    """Keeps a KV cache to the setting that filled it: the alphas (hidden and weights modes), the set of paths
    (logits mode), merged or adapters off. Continuing a cache under another setting would give wrong tokens.

    Lifecycle: a call whose cache is empty at the wrapped layer's slot (a new, reset or fully cropped cache) records
    its setting; later calls with that cache must bring the same setting, or raise; a cache that already holds tokens
    but was never seen here was filled without the CLM layer, and is refused. Caches are held by weak reference, so
    they go when generation drops them; `copy.deepcopy` and pickling start the copy empty.
    """

    def __init__(self) -> None:
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def check(self, cache: Any, filled: bool, setting: tuple) -> None:
        if cache is None:
            return
        if not filled:
            self._seen[cache] = setting
            return
        seen = self._seen.get(cache)
        if seen is None:
            raise ValueError(
                "This KV cache already holds tokens computed without the CLM layer; start generation with a new cache "
                "(or without one) while the adapter is active."
            )
        if seen != setting:
            raise ValueError(
                f"alpha changed between calls sharing one KV cache (the cache was filled with {seen}, this call runs "
                f"{setting}). Keep alpha, the mode and the adapters fixed for a generation, or start a new cache."
            )

    def __deepcopy__(self, memo: dict) -> CacheGuard:
        return CacheGuard()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class DerivedLayers:
    """Decoder layers derived from the registered state, never registered themselves: weights mode's inference
    layers (a plain copy holding `w0 + sum_i a_i (w_i - w0)` in tensors of its own, per recent adapters and alphas)
    and the runners of low-rank adapters (`low_rank.build_runner`).

    Lifecycle: `get` builds an entry the first time its key is asked for (under a lock, so two threads never build
    or evict at once) and keeps the `size` most recent. An entry is never written after it is built, so a thread
    can run one while another builds the next, and the trained weights are only ever read. A key holds every input
    tensor's identity (and, for weights mode's mixed values, its version counter and storage), the train/eval mode
    and the activation-checkpointing setting, so an optimiser step, a `load_state_dict`, `.train()` or a new
    checkpointing setting makes a new entry; writes through `.data` bypass version counters (call `clear()` after
    them), and `ClmLayer.delete_adapter` clears both caches. `copy.deepcopy` and pickling start the copy empty, so a
    copy's entries are built from its own tensors.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: collections.OrderedDict[tuple, nn.Module] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, build: Callable[[], nn.Module]) -> nn.Module:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            layer = build()
            self._entries[key] = layer
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return layer

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __deepcopy__(self, memo: dict) -> DerivedLayers:
        return DerivedLayers(self.size)

    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])


class ClmLayer(nn.Module, BaseTunerLayer):
    """Wraps decoder layer `layer_index`; adapter `name` owns a copy of it, `clm_layers[name]`, that runs first.

    The modes, with several active adapters: `x + sum_i a_i (clm_i(x) - x)` (hidden), a layer with parameters
    `w0 + sum_i a_i (w_i - w0)` (weights), and `base + sum_i a_i (aligned_i - base)` over whole paths (logits, laid
    out by `logits_mode.DualPath`; this layer runs each aligned path's copy on its block of rows).
    """

    adapter_layer_names = ("clm_layers",)
    other_param_names = ("alpha", "cache_slot")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: ClmConfig, *, zero_modules: Sequence[str],
        num_base_layers: int,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.clm_layers = nn.ModuleDict({})
        self.register_module("merged_layer", None)  # registered, so .to(), state_dict() and deepcopy see it
        self.alpha: dict[str, AlphaValue] = {}
        self.cache_slot: dict[str, int] = {}
        self.zero_modules = tuple(zero_modules)
        self.num_base_layers = num_base_layers
        self.interpolation = config.interpolation  # the one owner of the mode; ClmModel.set_interpolation sets it
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._mixed_layers = DerivedLayers(size=2)  # one layer of weights each: keep few
        self._runners = DerivedLayers(size=64)  # no weights of their own: views of the factors and the base
        self._cache_guard = CacheGuard()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self.train(base_layer.training)  # a new module starts in training mode; this one follows what it wraps

    # ------------------------------------------------------------------------------------------ parameters
    def update_layer(self, adapter_name: str, config: ClmConfig, **kwargs: Any) -> None:
        """Add adapter `adapter_name`: a copy of the wrapped layer with the `zero_modules` zeroed (the identity),
        or, with `init_weights=False`, given small random values (a non-identity layer, for tests)."""
        if config.r is not None:  # only the factors are state of the adapter; the runner is derived from them
            layer = LowRankFactors(self.base_layer, self.zero_modules, config.r, config.scaling,
                                   config.lowrank_modules, config.train_norms, config.init_weights)
        else:
            layer = copy.deepcopy(self.base_layer)
            with torch.no_grad():
                for p in self._zeroed_parameters(layer):
                    p.zero_() if config.init_weights else p.normal_(0.0, 0.02)
        used = set(self.cache_slot.values())
        slot = next(i for i in itertools.count(self.num_base_layers) if i not in used)
        compat.set_layer_index(layer, slot)  # a full copy carries layer L's slot; give it one of its own
        layer.requires_grad_(True)
        self.clm_layers[adapter_name] = layer
        self.alpha[adapter_name] = config.alpha
        self.cache_slot[adapter_name] = slot
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _zeroed_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return [p for name in self.zero_modules for p in layer.get_submodule(name).parameters()]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter, and every layer derived from it."""
        super().delete_adapter(adapter_name)
        self._mixed_layers.clear()
        self._runners.clear()

    def adapter_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """`w_i`: every parameter of one adapter's layer as it runs, by name inside the decoder layer (a low-rank
        adapter's are derived from the wrapped layer and its factors, differentiably)."""
        adapter = self.clm_layers[adapter_name]
        if isinstance(adapter, LowRankFactors):
            return adapter.effective_parameters(self.base_layer)
        return dict(adapter.named_parameters())

    def adapter_layer(self, adapter_name: str) -> nn.Module:
        """The decoder layer adapter `adapter_name` runs: its full copy, or the runner of its low-rank factors."""
        adapter = self.clm_layers[adapter_name]
        if not isinstance(adapter, LowRankFactors):
            return adapter
        slot = self.cache_slot[adapter_name]
        shared = itertools.chain(adapter.parameters(), self.base_layer.parameters(), self.base_layer.buffers())
        key = (adapter_name, slot, self.training, compat.checkpointing_setting(self.base_layer),
               tuple(id(t) for t in shared))
        return self._runners.get(key, lambda: self._derived(build_runner(self.base_layer, adapter, slot)))

    def _derived(self, layer: nn.Module, checkpointing: bool = True) -> nn.Module:
        """A derived layer in this layer's train/eval mode, and with its activation-checkpointing setting (or none)."""
        compat.copy_checkpointing_setting(self.base_layer if checkpointing else None, layer)
        return layer.train(self.training)

    def identity_parameters(self) -> dict[str, torch.Tensor]:
        """`w0`: the identity initialisation (the wrapped layer's parameters with the zeroed modules at zero),
        derived from the frozen wrapped layer so nothing is stored twice."""
        return {n: torch.zeros_like(p) if is_in_modules(n, self.zero_modules) else p
                for n, p in self.base_layer.named_parameters()}

    def mixed_parameters(self, names: Sequence[str], alphas: Sequence[float], out: bool = False) -> dict:
        """`w0 + sum_i alphas[i] (w_i - w0)` for every parameter: differentiable, or (`out=True`) written into new
        tensors without autograd."""
        w0 = self.identity_parameters()
        ws = [self.adapter_parameters(n) for n in names]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not out):
            return {k: weight_mix(w0[k], [w[k] for w in ws], alphas, out=torch.empty_like(w0[k]) if out else None)
                    for k in w0}

    def check_identity(self, adapter_name: str, call: tuple) -> None:
        """Raise unless adapter `adapter_name`'s layer returns its input exactly on a probe `call` (args, kwargs)."""
        args, kwargs = call
        x = args[0]
        with torch.no_grad():
            y = self._run(self.adapter_layer(adapter_name), self.cache_slot[adapter_name], x, args[1:], kwargs)
        if not torch.equal(y, x):
            raise ValueError(
                f"zero_modules={list(self.zero_modules)} do not make the copied layer the identity (its output "
                f"differs from its input by up to {float((y - x).abs().max()):.3g}). Name the attention output "
                "projection and the MLP down projection inside one decoder layer."
            )

    def _plain_copy(self, slot: int) -> nn.Module:
        """A copy of the wrapped layer's structure that shares its tensors (no new memory), with its own cache slot,
        in this layer's train/eval mode and without activation checkpointing (a checkpointed recompute would run
        without the parameters a functional call gives it)."""
        memo = {id(t): t for t in itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())}
        layer = copy.deepcopy(self.base_layer, memo)
        compat.set_layer_index(layer, slot)
        return self._derived(layer, checkpointing=False)

    def _layer_with(self, params: dict[str, torch.Tensor], slot: int) -> nn.Module:
        """A plain decoder layer holding `params` (no autograd), running in KV-cache slot `slot`."""
        layer = self._plain_copy(slot)
        for name, value in params.items():
            owner, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(owner), attr, nn.Parameter(value.detach(), requires_grad=False))
        return layer

    # ------------------------------------------------------------------------------------------ alpha
    def terms(self, rows: Optional[int] = None) -> Terms:
        """The active adapters that contribute to this call, with their alphas (a `clm_alpha=` override first)."""
        source = call_state(self).alpha or self.alpha
        return active_terms([(n, source[n]) for n in self.active_adapters], rows)

    @property
    def logits_active(self) -> bool:
        """Whether this call runs logits mode's paths (not merged, not disabled, some adapter active)."""
        return (self.interpolation == "logits" and not self.disable_adapters and not self.merged
                and bool(self.active_adapters))

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the active adapters' layer(s) on `hidden_states` as the mode says, then the wrapped layer.

        With adapters disabled or none active this is the wrapped layer alone, exactly.
        """
        cache = compat.find_cache(args, kwargs)
        if self.disable_adapters or not self.active_adapters:
            self._check_cache(cache, ("off",))
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.merged:
            self._check_cache(cache, ("merged", tuple(self.merged_adapters)))
            slot = self.cache_slot[self.merged_adapters[0]]
            h = self._run(self.merged_layer, slot, hidden_states, args, kwargs)
        elif self.interpolation == "logits":
            h = self._forward_logits(hidden_states, args, kwargs, cache)
        else:
            terms = self.terms(rows=hidden_states.shape[0])
            alphas = tuple(tuple(a.tolist()) if isinstance(a, torch.Tensor) else a for a in terms.alphas)
            self._check_cache(cache, (self.interpolation, terms.names, alphas))
            if self.interpolation == "hidden":
                h = self._forward_hidden(hidden_states, args, kwargs, terms)
            else:
                h = self._forward_weights(hidden_states, args, kwargs, terms)
        return self.base_layer(h, *args, **kwargs)

    def _check_cache(self, cache: Any, setting: tuple) -> None:
        if cache is not None:  # the wrapped layer's slot: this forward has not written it yet
            self._cache_guard.check(cache, compat.slot_length(cache, compat.layer_index(self.base_layer)) > 0, setting)

    def _run(self, module: nn.Module, slot: int, x: torch.Tensor, args: Sequence, kwargs: dict,
             params: Optional[dict] = None) -> torch.Tensor:
        """Run a layer in KV-cache slot `slot`, unrecorded by output capture; with `params`, as a functional call."""
        compat.ensure_cache_slots(compat.find_cache(args, kwargs), slot + 1, compat.layer_index(self.base_layer))
        with compat.outputs_not_captured():  # hidden_states/attentions keep the base model's count
            if params is None:
                out = module(x, *args, **kwargs)
            else:
                out = torch.func.functional_call(module, params, (x, *args), kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _forward_hidden(self, x: torch.Tensor, args, kwargs, terms: Terms) -> torch.Tensor:
        if terms.identity:
            return x
        ys = [self._run(self.adapter_layer(n), self.cache_slot[n], x, args, kwargs) for n in terms.names]
        return ys[0] if terms.single else hidden_mix(x, ys, list(terms.alphas))

    def _forward_weights(self, x: torch.Tensor, args, kwargs, terms: Terms) -> torch.Tensor:
        if terms.identity:
            return x  # w0 is exactly the identity
        slot = self.cache_slot[terms.names[0]]
        if terms.single:
            return self._run(self.adapter_layer(terms.single), slot, x, args, kwargs)
        names, alphas = list(terms.names), [float(a) for a in terms.alphas]
        trained = [p for n in names for p in self.clm_layers[n].parameters()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in trained):  # training: differentiable mix
            return self._run(self._plain_copy(slot), slot, x, args, kwargs, self.mixed_parameters(names, alphas))
        tensors = itertools.chain(trained, self.base_layer.parameters())
        key = (tuple(names), tuple(alphas), slot, self.training,
               tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors))
        layer = self._mixed_layers.get(key, lambda: self._layer_with(self.mixed_parameters(names, alphas, True), slot))
        return self._run(layer, slot, x, args, kwargs)

    def _forward_logits(self, x: torch.Tensor, args, kwargs, cache: Any) -> torch.Tensor:
        plan = call_state(self).plan
        if plan is None:
            raise RuntimeError(
                "logits mode runs through the model's forward, which lays out the paths; this layer was called on "
                "its own. Call the model, or use interpolation='hidden'."
            )
        self._check_cache(cache, ("logits", plan.paths))  # first: a cache filled elsewhere is named as such
        rows = compat.cache_rows(cache)
        if rows is not None and rows != plan.num_paths * plan.batch:
            raise ValueError(
                f"alpha changed between calls sharing one KV cache: it holds {rows} rows, from a call with another "
                f"set of paths; this call runs {plan.num_paths} path(s) x {plan.batch} sequences. Start a new cache "
                "when alpha changes."
            )
        if x.shape[0] != plan.num_paths * plan.batch:
            raise RuntimeError(f"logits mode expected {plan.num_paths * plan.batch} rows, got {x.shape[0]}.")
        if plan.paths == (None,):
            return x
        if plan.num_paths == 1:
            name = plan.paths[0]
            return self._run(self.adapter_layer(name), self.cache_slot[name], x, args, kwargs)
        total, blocks = x.shape[0], []
        for j, name in enumerate(plan.paths[:-1]):  # aligned paths: this adapter's copy on its block of rows
            block_args = compat.rows_block(tuple(args), j, plan.num_paths, total)
            block_kwargs = {k: compat.rows_block(v, j, plan.num_paths, total) if k in LAYER_ROW_KWARGS else v
                            for k, v in kwargs.items()}
            rows = slice(j * plan.batch, (j + 1) * plan.batch)
            layer, slot = self.adapter_layer(name), self.cache_slot[name]
            blocks.append(self._run(layer, slot, x[rows], block_args, block_kwargs))
        blocks.append(x[(plan.num_paths - 1) * plan.batch :])  # the unaligned path enters the original layers as is
        return torch.cat(blocks, dim=0)

    # ------------------------------------------------------------------------------------------ merging
    def build_merged_layer(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> nn.Module:
        """One plain decoder layer equal to what the adapters compute at their current alpha.

        Exact in weights mode at any alpha, and in hidden/logits modes where no adapter contributes (alpha 0) or one
        adapter runs alone at alpha 1; anything else raises, saying what to do instead. `safe_merge` refuses
        non-finite weights.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        unknown = [n for n in names if n not in self.clm_layers]
        if unknown or not names:
            raise ValueError(f"Unknown adapter(s) {unknown or names}; available: {sorted(self.clm_layers)}.")
        if any(isinstance(self.alpha[n], torch.Tensor) for n in names):
            raise ValueError("A per-sequence alpha cannot be merged into one model; set one number with set_alpha().")
        terms = active_terms([(n, self.alpha[n]) for n in names])
        slot = self.cache_slot[names[0]]
        if self.interpolation == "weights" or terms.identity:
            params = self.mixed_parameters(list(terms.names), [float(a) for a in terms.alphas], out=True)
        elif terms.single:
            params = {k: v.detach().clone() for k, v in self.adapter_parameters(terms.single).items()}
        else:
            raise ValueError(
                f"{self.interpolation} mode at alpha={dict(zip(terms.names, terms.alphas))} mixes outputs, which no "
                "single layer reproduces; merge with set_interpolation('weights') (exact at any alpha, with slightly "
                "different outputs), or at alpha 0 or 1 with one adapter, or keep the adapter unmerged."
            )
        if safe_merge and not all(torch.isfinite(p).all() for p in params.values()):
            raise ValueError(f"NaNs or infs found while merging adapter(s) {names}.")
        return self._layer_with(params, slot)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Replace the adapters' computation by one plain layer (`merged_layer`, a registered module) at the
        current alpha; `unmerge()` drops it. See `build_merged_layer` for when this is exact."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self.merged_layer = self.build_merged_layer(adapter_names, safe_merge)
        self.merged_adapters = list(adapter_names)

    def unmerge(self) -> None:
        """Back to the unmerged adapters (the merged layer is dropped; the adapters were never changed)."""
        self.merged_layer = None
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "clm." + super().__repr__()
