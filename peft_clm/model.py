"""`ClmModel`: injects the CLM layer, dials alpha, runs the logits-mode paths and merges."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import INTERPOLATIONS, ClmConfig
from .kernels import dual_norm_mix, hidden_mix
from contextvars import ContextVar

from .layer import _CALL_ALPHA, _PLAN, AlphaValue, ClmLayer, find_cache

# Inside one decoder layer: the attention output projection and the MLP down projection, zeroed so that the copy
# is exactly the identity through the residual stream.
TRANSFORMERS_MODELS_TO_CLM_ZERO_MODULES: dict[str, list[str]] = {
    **{
        t: ["self_attn.o_proj", "mlp.down_proj"]
        for t in (
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
            "granite", "smollm3", "stablelm", "helium", "glm", "cohere",
        )
    },
    "starcoder2": ["self_attn.o_proj", "mlp.c_proj"],
    "phi": ["self_attn.dense", "mlp.fc2"],
    "gpt_neox": ["attention.dense", "mlp.dense_4h_to_h"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
}

# Where the decoder's final norm output goes straight out (no reshape by batch size after it), the logits-mode
# paths are mixed right at the final norm, with the fused norm+mix kernel; elsewhere at the LM head's input.
_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_norm")

# Inputs of the decoder stack with one row per sequence: in logits mode they are repeated once per path.
_BATCHED_MODEL_KWARGS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")

Alpha = Union[float, int, Sequence[float], torch.Tensor, Mapping[str, Any]]

# Labels held back from a soft-capped model's forward in logits mode, so the loss is computed on mixed logits.
_LABELS: ContextVar[dict] = ContextVar("peft_clm_labels", default={})


def _find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("CLM needs a transformers model (a module with a `config`).")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text_config, "num_hidden_layers", None)
    found = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and n is not None and len(m) == n
    ]
    if not found:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__} (a ModuleList of num_hidden_layers={n} "
            "layers); CLM supports decoder-only transformers models."
        )
    return min(found, key=lambda item: item[0].count("."))


def _normalize_alpha_value(value: Any, what: str) -> AlphaValue:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a finite number or one number per sequence, got {value!r}.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be finite, got {value!r}.")
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return _normalize_alpha_value(value.item(), what)
    if isinstance(value, (list, tuple, torch.Tensor)):
        try:
            t = torch.as_tensor(value, dtype=torch.float32, device="cpu").detach().clone()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} must be a number or a 1-D list of numbers, got {value!r}.") from e
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{what} per sequence must be a non-empty 1-D list, got shape {tuple(t.shape)}.")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what} must be finite, got {value!r}.")
        return t
    raise ValueError(f"{what} must be a number, one number per sequence, or a dict of them; got {type(value).__name__}.")


class ClmModel(BaseTuner):
    """Controllable-alignment model: one identity-initialised decoder layer, dialled by `alpha`.

    Created by `peft.get_peft_model(model, ClmConfig(...))` once `peft_clm` is imported.

    Example:
        ```py
        >>> import peft_clm
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_clm.ClmConfig(interpolation="logits"))
        >>> model.set_alpha(0.5)                           # one strength for everything
        >>> out = model.generate(**batch, clm_alpha=[0.0, 1.5])  # or one per sequence, per call
        ```
    """

    prefix: str = "clm_"
    tuner_layer_cls = ClmLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_CLM_ZERO_MODULES

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._clm_hooks: list = []
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: ClmConfig, model_config: dict) -> ClmConfig:
        layers_name, layers = _find_decoder_layers(self.model)
        if peft_config.layer_index >= len(layers):
            raise ValueError(f"layer_index={peft_config.layer_index} but the model has {len(layers)} decoder layers.")
        if peft_config.zero_modules is None:
            model_type = model_config.get("model_type")
            zero = TRANSFORMERS_MODELS_TO_CLM_ZERO_MODULES.get(model_type)
            if zero is None:
                raise ValueError(
                    f"CLM does not know the architecture {model_type!r}. Supported: "
                    f"{sorted(TRANSFORMERS_MODELS_TO_CLM_ZERO_MODULES)}. For another decoder-only model pass "
                    "ClmConfig(zero_modules=[<attention output projection>, <MLP down projection>]) named inside "
                    "one decoder layer."
                )
            peft_config.zero_modules = list(zero)
        layer = layers[peft_config.layer_index]
        if isinstance(layer, ClmLayer):
            existing = layer
            if existing.zero_modules != tuple(peft_config.zero_modules):
                raise ValueError("All CLM adapters of a model must zero the same modules.")
            layer = layer.base_layer
        for name in peft_config.zero_modules:
            try:
                layer.get_submodule(name)
            except AttributeError as e:
                raise ValueError(
                    f"zero_modules entry {name!r} is not a module of the decoder layer {type(layer).__name__}."
                ) from e
        peft_config.target_modules = [f"{layers_name}.{peft_config.layer_index}"]
        for other_name, other in self.peft_config.items():
            if other is not peft_config and getattr(other, "layer_index", None) != peft_config.layer_index:
                raise ValueError(
                    f"adapter {other_name!r} sits before layer {other.layer_index}; all CLM adapters of a model share "
                    f"one insertion point, got layer_index={peft_config.layer_index}."
                )
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, ClmLayer):
            target.update_layer(adapter_name, peft_config)
            return
        _, layers = _find_decoder_layers(self.model)
        new_module = ClmLayer(
            target, adapter_name, peft_config, zero_modules=peft_config.zero_modules, num_base_layers=len(layers)
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # The CLM layer is a copy of a decoder layer and runs in the model's dtype, like ln_tuning's copies.
        pass

    def _post_injection_hook(self, model: nn.Module, config: ClmConfig, adapter_name: str) -> None:
        if not self._clm_hooks:
            self._register_hooks()

    def clm_layer(self) -> Optional[ClmLayer]:
        """The (single) CLM layer of the model (looked up once: the hooks call this on every forward)."""
        cached = self.__dict__.get("_clm_layer_cache")
        if cached:
            return cached[0]
        layer = next((m for m in self.model.modules() if isinstance(m, ClmLayer)), None)
        if layer is not None:
            self.__dict__["_clm_layer_cache"] = [layer]
        return layer

    # ------------------------------------------------------------------ alpha and mode
    def _normalize_alpha(self, alpha: Alpha, allow_rows: bool) -> dict[str, AlphaValue]:
        layer = self.clm_layer()
        names = list(layer.clm_layers.keys())
        if isinstance(alpha, Mapping):
            unknown = [k for k in alpha if k not in names]
            if unknown:
                raise ValueError(f"alpha names unknown adapter(s) {unknown}; the adapters are {names}.")
            out = dict(layer.alpha)
            out.update({k: _normalize_alpha_value(v, f"alpha[{k!r}]") for k, v in alpha.items()})
        else:
            value = _normalize_alpha_value(alpha, "alpha")
            out = {n: value for n in names}
        if not allow_rows and any(isinstance(v, torch.Tensor) for v in out.values()):
            raise ValueError(
                "per-sequence alpha applies in interpolation='hidden' or 'logits'; weights mode mixes parameters, "
                "so one number applies to the whole batch."
            )
        return out

    def set_alpha(self, alpha: Alpha) -> None:
        """Set the alignment strength: a number, one number per sequence (hidden/logits modes), or a dict by adapter.

        0 is the base model, 1 the aligned model; values between interpolate, values outside extrapolate.

        Example:
            ```py
            >>> model.set_alpha(0.5)
            >>> model.set_alpha({"concise": 1.0, "formal": -0.5})
            >>> model.set_alpha([0.0, 0.5, 1.5])   # one per sequence of the next batch
            ```
        """
        layer = self.clm_layer()
        new = self._normalize_alpha(alpha, allow_rows=layer.interpolation != "weights")
        layer.alpha.update(new)  # validated in full above: nothing is half-applied
        for name, value in new.items():
            if isinstance(value, float):
                self.peft_config[name].alpha = value

    def get_alpha(self) -> dict[str, AlphaValue]:
        """The alpha of every adapter, as `set_alpha` left it."""
        return dict(self.clm_layer().alpha)

    @contextlib.contextmanager
    def alpha_context(self, alpha: Alpha) -> Iterator[None]:
        """Use `alpha` for the calls made inside the block, in this thread only (for servers).

        Example:
            ```py
            >>> with model.alpha_context([0.2, 1.0]):
            ...     out = model.generate(**batch)
            ```
        """
        layer = self.clm_layer()
        value = self._normalize_alpha(alpha, allow_rows=layer.interpolation != "weights")
        token = _CALL_ALPHA.set({**_CALL_ALPHA.get(), id(layer): value})
        try:
            yield
        finally:
            _CALL_ALPHA.reset(token)

    @property
    def interpolation(self) -> str:
        """The mixing mode every adapter of this model runs in: 'logits', 'hidden' or 'weights'."""
        return self.clm_layer().interpolation

    def set_interpolation(self, mode: str) -> None:
        """Switch the mixing mode ('logits', 'hidden' or 'weights'); the adapter weights are the same in every mode."""
        if mode not in INTERPOLATIONS:
            raise ValueError(f"interpolation={mode!r} is not one of {INTERPOLATIONS}.")
        layer = self.clm_layer()
        if mode == "weights" and any(isinstance(a, torch.Tensor) for a in layer.alpha.values()):
            raise ValueError("weights mode takes one alpha per adapter; set a number with set_alpha() first.")
        layer.interpolation = mode
        layer._weights_cache = None
        for config in self.peft_config.values():
            config.interpolation = mode

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate one adapter, or several at once (each dialled by its own alpha)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(self.peft_config)}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def _with_call_alpha(self, clm_alpha: Optional[Alpha]):
        return contextlib.nullcontext() if clm_alpha is None else self.alpha_context(clm_alpha)

    def forward(self, *args: Any, clm_alpha: Optional[Alpha] = None, **kwargs: Any):
        """The model's forward; `clm_alpha` overrides alpha for this call only."""
        with self._with_call_alpha(clm_alpha):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, clm_alpha: Optional[Alpha] = None, **kwargs: Any):
        """transformers' `generate`; `clm_alpha` (a number, one per sequence, or a dict) applies to this call only.

        A per-sequence alpha follows its sequence through beam search and `num_return_sequences`.
        """
        if clm_alpha is not None:
            gen_config = kwargs.get("generation_config") or self.model.generation_config
            # generate() repeats each sequence in place: num_beams times in beam search (the returned sequences are
            # picked among the beams), else num_return_sequences times.
            num_beams = int(kwargs.get("num_beams", gen_config.num_beams) or 1)
            repeats = num_beams if num_beams > 1 else int(
                kwargs.get("num_return_sequences", gen_config.num_return_sequences) or 1
            )
            clm_alpha = self._repeat_rows(clm_alpha, repeats)
        with self._with_call_alpha(clm_alpha):
            return self.model.generate(*args, **kwargs)

    @staticmethod
    def _repeat_rows(alpha: Alpha, repeats: int) -> Alpha:
        # generate() repeats each sequence `repeats` times in place (beams, return sequences); alpha must follow.
        if repeats == 1:
            return alpha
        if isinstance(alpha, Mapping):
            return {k: ClmModel._repeat_rows(v, repeats) for k, v in alpha.items()}
        if isinstance(alpha, (list, tuple)) or (isinstance(alpha, torch.Tensor) and alpha.dim() == 1):
            return torch.as_tensor(alpha, dtype=torch.float32).repeat_interleave(repeats)
        return alpha

    # ------------------------------------------------------------------ logits mode: both paths in one batch
    def _register_hooks(self) -> None:
        layers_name, _ = _find_decoder_layers(self.model)
        decoder = self.model.get_submodule(layers_name.rpartition(".")[0])
        head = self.model.get_output_embeddings()
        if head is None:
            return  # no LM head: logits mode cannot run, hidden and weights modes still do
        self._clm_hooks = [
            self.model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True),
            self.model.register_forward_hook(self._top_post_hook, with_kwargs=True, always_call=True),
            decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True),
            head.register_forward_pre_hook(self._head_pre_hook),
        ]
        norm = next((getattr(decoder, n) for n in _FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)),
                    None)
        if norm is not None and self._softcap is None:
            self._clm_final_norm = [norm]  # a list, so that the norm is not registered twice
            norm.forward = self._final_norm_forward(norm, norm.forward)

    def _final_norm_forward(self, norm: nn.Module, original):
        def forward(hidden_states, *args, **kwargs):
            layer = self.clm_layer()
            plan = layer.current_plan() if layer is not None else None
            if (args or kwargs or plan is None or plan.num_paths == 1
                    or hidden_states.shape[0] != plan.num_paths * plan.batch):
                return original(hidden_states, *args, **kwargs)
            # Norm every path and mix them in one pass; the LM head then runs on B rows. Exact: the head is
            # affine and the mixing weights sum to one.
            return dual_norm_mix(hidden_states, norm, plan.alphas, plan.num_paths, norm_forward=original)

        return forward

    def _remove_hooks(self) -> None:
        for handle in self._clm_hooks:
            handle.remove()
        self._clm_hooks = []
        for norm in getattr(self, "_clm_final_norm", []):
            del norm.forward  # back to the class's forward
        self._clm_final_norm = []

    @property
    def _softcap(self) -> Optional[float]:
        return getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)

    def _set_plan(self, layer: ClmLayer, plan) -> None:
        plans = dict(_PLAN.get())
        if plan is None:
            plans.pop(id(layer), None)
        else:
            plans[id(layer)] = plan
        _PLAN.set(plans)

    def _top_pre_hook(self, module, args, kwargs):
        layer = self.clm_layer()
        if layer is None or not layer.logits_active:
            return None
        self._set_plan(layer, None)  # never reuse a plan from an earlier call
        if self._softcap is not None and kwargs.get("labels") is not None:
            # Soft-capped logits are mixed after the cap, so the loss is computed after the mix, in the post-hook.
            kwargs = dict(kwargs)
            _LABELS.set({**_LABELS.get(), id(layer): kwargs.pop("labels")})
            return args, kwargs
        return None

    def _top_post_hook(self, module, args, kwargs, output):
        layer = self.clm_layer()
        if layer is None:
            return None
        plan = layer.current_plan()
        self._set_plan(layer, None)
        stash = dict(_LABELS.get())
        labels = stash.pop(id(layer), None)
        _LABELS.set(stash)
        if self._softcap is None or getattr(output, "logits", None) is None:
            return None
        if plan is not None and plan.num_paths > 1:
            # Soft-capping is not linear: mix the real (capped) logits of the paths.
            output.logits = self._mix_paths(output.logits, plan)
        if labels is not None:
            extra = {"num_items_in_batch": kwargs["num_items_in_batch"]} if "num_items_in_batch" in kwargs else {}
            vocab_size = module.config.get_text_config().vocab_size
            output.loss = module.loss_function(output.logits, labels, vocab_size, **extra)
        return output

    def _decoder_pre_hook(self, module, args, kwargs):
        layer = self.clm_layer()
        if layer is None or not layer.logits_active:
            return None
        rows_from = kwargs.get("input_ids")
        if rows_from is None:
            rows_from = kwargs.get("inputs_embeds")
        if rows_from is None and args and isinstance(args[0], torch.Tensor):
            rows_from = args[0]
        if rows_from is None:
            raise ValueError("logits mode needs input_ids or inputs_embeds.")
        batch = rows_from.shape[0]
        cache = find_cache(args, kwargs)
        cache_rows = 0
        if cache is not None and cache.get_seq_length() > 0:
            cache_rows = next(l.keys.shape[0] for l in cache.layers if l.get_seq_length() > 0)
        plan = layer.plan_paths(batch, cache_rows)
        self._set_plan(layer, plan)
        if plan.num_paths == 1:
            return None
        # Run the paths as one batch of P*B rows, so that each shared weight is read once per step; the mask,
        # positions and KV cache then cover every path because the model builds them from these inputs.
        repeat = plan.num_paths

        def rep(t):
            return torch.cat([t] * repeat, dim=0) if isinstance(t, torch.Tensor) and t.shape[0] == batch else t

        args = tuple(rep(a) for a in args)
        kwargs = {k: (rep(v) if k in _BATCHED_MODEL_KWARGS else v) for k, v in kwargs.items()}
        if cache is not None and not getattr(cache, "_clm_paths_reorder", False):
            _patch_reorder(cache)
        return args, kwargs

    def _head_pre_hook(self, module, args):
        layer = self.clm_layer()
        plan = layer.current_plan() if layer is not None else None
        if plan is None or plan.num_paths == 1 or self._softcap is not None:
            return None
        hidden = args[0]
        if hidden.shape[0] != plan.num_paths * plan.batch:
            return None
        # The head is affine and the mixing weights sum to one, so mixing the final-norm outputs and applying the
        # head once gives exactly the mix of the paths' logits, for B rows instead of P*B (a bias is fine too).
        return (self._mix_paths(hidden, plan), *args[1:])

    @staticmethod
    def _mix_paths(t: torch.Tensor, plan) -> torch.Tensor:
        B, k = plan.batch, plan.num_paths - 1
        base = t[k * B : (k + 1) * B]
        return hidden_mix(base, [t[j * B : (j + 1) * B] for j in range(k)], plan.alphas)

    # ------------------------------------------------------------------ merge and unload
    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ) -> nn.Module:
        layer = self.clm_layer()
        if layer is None:
            return self.model
        layers_name, layers = _find_decoder_layers(self.model)
        index = next(i for i, m in enumerate(layers) if m is layer)
        if merge:
            new_layer = layer.build_merged_layer(adapter_names)  # raises, model untouched, when not exact
            if safe_merge and not all(torch.isfinite(p).all() for p in new_layer.parameters()):
                raise ValueError("NaNs or infs found in the merged CLM layer.")
            modules = list(layers)
            modules[index] = layer.base_layer
            modules.insert(index, new_layer)
            for position, module in enumerate(modules):
                for sub in module.modules():
                    if isinstance(getattr(sub, "layer_idx", None), int):
                        sub.layer_idx = position
            parent = self.model.get_submodule(layers_name.rpartition(".")[0])
            setattr(parent, layers_name.rpartition(".")[2], nn.ModuleList(modules))
            _insert_layer_in_config(self.model.config, index)
        else:
            layers[index] = layer.base_layer
        self.__dict__.pop("_clm_layer_cache", None)
        self._remove_hooks()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def _rollback_adapter(self, adapter_name: str) -> None:
        """Undo the injection of `adapter_name` after a failed load, leaving the model as it was."""
        layer = self.clm_layer()
        if layer is None:
            return
        if len(layer.clm_layers) <= 1:
            layers_name, layers = _find_decoder_layers(self.model)
            index = next(i for i, m in enumerate(layers) if m is layer)
            layers[index] = layer.base_layer
            self.__dict__.pop("_clm_layer_cache", None)
            self._remove_hooks()
            if hasattr(self.model, "peft_config"):
                del self.model.peft_config
        else:
            self.peft_config.pop(adapter_name, None)
            layer.delete_adapter(adapter_name)

    # ------------------------------------------------------------------ state dicts
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # The adapter name sits in the middle of the key (clm_layers.<name>.self_attn...): drop it there, so that
        # a file saved under one adapter name loads under any other.
        return key.replace(f".clm_layers.{adapter_name}.", ".clm_layers.")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {k: v for k, v in model.state_dict().items() if f".clm_layers.{adapter_name}." in k}
        strip = lambda k: k.removeprefix("base_model.model.")  # noqa: E731
        got = {strip(k): v for k, v in remapped.items()}
        want = {strip(k): v for k, v in expected.items()}
        missing = sorted(set(want) - set(got))
        unexpected = sorted(k for k in set(got) - set(want) if ".clm_layers." in k)
        wrong = sorted(k for k in set(want) & set(got) if tuple(got[k].shape) != tuple(want[k].shape))
        if missing or unexpected or wrong:
            tuner = getattr(model, "base_model", model)
            if isinstance(tuner, ClmModel):
                tuner._rollback_adapter(adapter_name)
            detail = []
            if wrong:
                k = wrong[0]
                detail.append(
                    f"{len(wrong)} tensor(s) of another shape, e.g. {k}: file {tuple(got[k].shape)} vs model "
                    f"{tuple(want[k].shape)}"
                )
            if missing:
                detail.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
            if unexpected:
                detail.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
            raise ValueError(
                f"The CLM adapter {adapter_name!r} does not fit this model ({'; '.join(detail)}). It was saved for a "
                "model of another architecture or size; load it onto the base model it was trained on. The model "
                "was left as it was."
            )
        return remapped


def _patch_reorder(cache) -> None:
    """Make beam search's `reorder_cache(beam_idx)` (indices for B rows) reorder every path of a P*B-row cache."""

    def reorder_cache(beam_idx: torch.LongTensor) -> None:
        n = beam_idx.numel()
        for layer in cache.layers:
            if layer.get_seq_length() == 0:
                continue
            paths = layer.keys.shape[0] // n
            idx = beam_idx if paths == 1 else torch.cat([beam_idx + p * n for p in range(paths)])
            layer.reorder_cache(idx)

    cache.reorder_cache = reorder_cache
    cache._clm_paths_reorder = True


def _insert_layer_in_config(config, index: int) -> None:
    """Account for one more decoder layer at `index`: the layer count and every per-layer list."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    old = text_config.num_hidden_layers
    for key, value in list(vars(text_config).items()):
        if isinstance(value, (list, tuple)) and len(value) == old and not key.startswith("_"):
            new = list(value)
            new.insert(index, value[index])
            setattr(text_config, key, type(value)(new))
    mwl = getattr(text_config, "max_window_layers", None)
    if isinstance(mwl, int) and index < mwl:
        text_config.max_window_layers = mwl + 1
    text_config.num_hidden_layers = old + 1
