"""`ClmModel`: injects the CLM layer, dials alpha and the mode, merges and unloads, and checks what it loads."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import transformers_compat as compat
from .alpha import Alpha, active_terms, call_scope, check_mode_accepts, repeat_rows, resolve_alpha
from .config import INTERPOLATIONS, ClmConfig
from .constants import ZERO_MODULES
from .layer import ClmLayer
from .load_checks import check_adapter_tensors, check_load, check_shapes, checkpoint_prefix, layer_sketch
from .logits_mode import DualPath


logger = logging.getLogger(__name__)


class ClmModel(BaseTuner):
    """Controllable-alignment model: one identity-initialised decoder layer, dialled by `alpha`.

    Created by `peft.get_peft_model(model, ClmConfig(...))` once `peft_clm` is imported. All adapters of a model
    share one insertion point and one mode; each has its own alpha.

    Example:
        ```py
        >>> import peft_clm
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_clm.ClmConfig(interpolation="logits"))
        >>> model.set_alpha(0.5)                                   # one strength for everything
        >>> out = model.generate(**batch, clm_alpha=[0.0, 1.5])    # or one per sequence, for this call only
        ```
    """

    prefix: str = "clm_"
    tuner_layer_cls = ClmLayer
    target_module_mapping: dict = {}  # the target is found structurally, in _prepare_adapter_config

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self.dual_path: Optional[DualPath] = None
        self._layer_ref: list[ClmLayer] = []  # a list, so that the layer is not registered twice
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: ClmConfig, model_config: dict) -> ClmConfig:
        reason = compat.recurrent_reason(self.model)
        if reason:
            raise ValueError(f"CLM does not support {type(self.model).__name__}: {reason}, and the copied layer "
                             "would need a state slot of its own. CLM supports attention decoder models.")
        layers_name, layers = compat.find_decoder_layers(self.model)
        if peft_config.layer_index >= len(layers):
            raise ValueError(f"layer_index={peft_config.layer_index} but the model has {len(layers)} decoder layers.")
        position, existing = next(((i, m) for i, m in enumerate(layers) if isinstance(m, ClmLayer)), (None, None))
        if existing is not None and peft_config.layer_index != position:
            raise ValueError(f"the CLM adapters of this model sit before layer {position}; all share "
                             f"one insertion point, got layer_index={peft_config.layer_index}.")
        if peft_config.zero_modules is None:
            zero = ZERO_MODULES.get(model_config.get("model_type"))
            if zero is None:
                raise ValueError(
                    f"CLM does not know the architecture {model_config.get('model_type')!r}. Supported: "
                    f"{sorted(ZERO_MODULES)}. For another decoder-only model pass ClmConfig(zero_modules=[<attention "
                    "output projection>, <MLP down projection>]) named inside one decoder layer."
                )
            peft_config.zero_modules = list(zero)
        target = layers[peft_config.layer_index]
        if existing is not None:
            if existing.zero_modules != tuple(peft_config.zero_modules):
                raise ValueError("All CLM adapters of a model must zero the same modules.")
            if peft_config.interpolation != existing.interpolation:  # the mode has one owner: the model's layer
                logger.warning("adapter config asks for interpolation=%r; the model runs in %r mode, which the new "
                               "adapter adopts (set_interpolation() switches every adapter).",
                               peft_config.interpolation, existing.interpolation)
                peft_config.interpolation = existing.interpolation
            target = existing.base_layer
        for name in peft_config.zero_modules:
            try:
                module = target.get_submodule(name)
            except AttributeError:
                module = None
            if module is None or not list(module.parameters()):
                raise ValueError(f"zero_modules entry {name!r} is not a module with parameters of the decoder layer "
                                 f"{type(target).__name__}.")
        directory = peft_config.__dict__.pop("_loaded_from", None)
        if directory is not None:  # a load: everything the file brings is checked before the model changes
            check_load(directory, peft_config, target, self.model)
        elif not any(p.device.type == "meta" for p in target.parameters()):
            peft_config.base_fingerprint = layer_sketch(target)  # a new adapter: record the base it is made on
        peft_config.target_modules = [f"{layers_name}.{peft_config.layer_index}"]
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        new = not isinstance(target, ClmLayer)
        probe = self._probe(target) if peft_config.init_weights else None  # captured before anything changes
        if new:
            _, layers = compat.find_decoder_layers(self.model)
            layer = ClmLayer(target, adapter_name, peft_config, zero_modules=peft_config.zero_modules,
                             num_base_layers=len(layers))
        else:
            layer = target
            layer.update_layer(adapter_name, peft_config)
        adapter_on_meta = any(p.device.type == "meta" for p in layer.clm_layers[adapter_name].parameters())
        if probe is not None and not adapter_on_meta:  # meta: created empty for a load, nothing to run yet
            try:
                layer.check_identity(adapter_name, probe)
            except ValueError:
                if not new:
                    layer.delete_adapter(adapter_name)
                raise
        if new:
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            setattr(parent, target_name, layer)

    def _probe(self, target: nn.Module) -> Optional[tuple]:
        """The real inputs of the wrapped layer on a few tokens (any CLM adapter off while they are captured), to
        check that a fresh copy is the identity; None when the model cannot run such a probe here."""
        disabled = getattr(target, "_disable_adapters", None)
        if disabled is not None:
            target._disable_adapters = True
        try:
            return compat.capture_layer_inputs(self.model, target)
        except Exception as e:  # noqa: BLE001  a model that needs other inputs: no probe, say so
            logger.warning("could not probe that the new CLM layer is the identity (%s: %s); zero_modules are "
                           "trusted as given.", type(e).__name__, e)
            return None
        finally:
            if disabled is not None:
                target._disable_adapters = disabled

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        pass  # the CLM layer is a copy of a decoder layer and runs in the model's dtype, like ln_tuning's copies

    def _post_injection_hook(self, model: nn.Module, config: ClmConfig, adapter_name: str) -> None:
        if self.dual_path is None:
            self.dual_path = DualPath(self.model, self.clm_layer())
        if self.interpolation == "logits":
            self.dual_path.attach()

    def clm_layer(self) -> Optional[ClmLayer]:
        """The model's CLM layer (one per model; it holds every adapter)."""
        if not self._layer_ref:
            layer = next((m for m in self.model.modules() if isinstance(m, ClmLayer)), None)
            if layer is None:
                return None
            self._layer_ref = [layer]
        return self._layer_ref[0]

    # ------------------------------------------------------------------------------------------ alpha and mode
    def _unmerged_layer(self) -> ClmLayer:
        layer = self.clm_layer()
        if layer.merged:
            raise ValueError(
                f"the adapters {layer.merged_adapters} are merged at alpha {self.get_alpha()}; call unmerge_adapter() "
                "before changing alpha or the mode (then merge_adapter() again at the new setting)."
            )
        return layer

    def set_alpha(self, alpha: Alpha) -> None:
        """Set the alignment strength: a number, one number per sequence (hidden/logits), or a dict by adapter.

        0 is the base model, 1 the aligned model; values between interpolate, values outside extrapolate (|alpha| up
        to 1000). This is a run-time dial: the alpha saved with an adapter stays the one of its config.

        Example:
            ```py
            >>> model.set_alpha(0.5)
            >>> model.set_alpha({"concise": 1.0, "formal": -0.5})
            >>> model.set_alpha([0.0, 0.5, 1.5])   # one per sequence of the next batch
            ```
        """
        layer = self._unmerged_layer()
        layer.alpha.update(resolve_alpha(alpha, list(layer.clm_layers), layer.alpha, layer.interpolation))

    def get_alpha(self) -> dict:
        """The alpha of every adapter, as `set_alpha` left it."""
        return dict(self.clm_layer().alpha)

    @contextlib.contextmanager
    def alpha_context(self, alpha: Alpha) -> Iterator[None]:
        """Use `alpha` for the calls made inside the block, in this thread only (what a server needs).

        Example:
            ```py
            >>> with model.alpha_context([0.2, 1.0]):
            ...     out = model.generate(**batch)
            ```
        """
        layer = self._unmerged_layer()
        with call_scope(layer, resolve_alpha(alpha, list(layer.clm_layers), layer.alpha, layer.interpolation)):
            yield

    @property
    def interpolation(self) -> str:
        """The mode every adapter of this model runs in: 'logits', 'hidden' or 'weights'."""
        return self.clm_layer().interpolation

    def set_interpolation(self, mode: str) -> None:
        """Switch the mixing mode ('logits', 'hidden' or 'weights') of every adapter; the weights are the same in
        every mode. The adapters' configs follow, so a saved adapter records the mode it ran in."""
        if mode not in INTERPOLATIONS:
            raise ValueError(f"interpolation={mode!r} is not one of {INTERPOLATIONS}.")
        layer = self._unmerged_layer()
        if mode == "weights":
            try:
                check_mode_accepts(layer.alpha, mode)
            except ValueError as e:
                raise ValueError(f"{e} Set one number per adapter with set_alpha() first.") from None
        layer.interpolation = mode
        layer._mixed_layers.clear()
        for config in self.peft_config.values():
            config.interpolation = mode
        self.dual_path.attach() if mode == "logits" else self.dual_path.detach()

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate one adapter, or several at once (each dialled by its own alpha)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(self.peft_config)}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def _call(self, clm_alpha: Optional[Alpha], batch: Optional[int] = None, repeats: int = 1):
        """The call state of one forward or generate: `clm_alpha` (checked against the caller's `batch`, repeated
        for generate's beams or returned sequences), or a per-sequence `set_alpha` repeated the same way."""
        layer = self.clm_layer()
        if layer is None:
            return contextlib.nullcontext()
        if clm_alpha is None and not (repeats > 1 and any(isinstance(a, torch.Tensor) for a in layer.alpha.values())):
            return call_scope(layer)
        layer = self._unmerged_layer()
        source = layer.alpha if clm_alpha is None else clm_alpha
        values = resolve_alpha(source, list(layer.clm_layers), layer.alpha, layer.interpolation)
        active_terms(list(values.items()), batch)  # per-sequence counts checked against the caller's batch
        return call_scope(layer, repeat_rows(values, repeats))

    def forward(self, *args: Any, clm_alpha: Optional[Alpha] = None, **kwargs: Any):
        """The model's forward; `clm_alpha` overrides alpha for this call only."""
        with self._call(clm_alpha):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, clm_alpha: Optional[Alpha] = None, **kwargs: Any):
        """transformers' `generate`; `clm_alpha` (a number, one per sequence, or a dict) applies to this call only.

        A per-sequence alpha (here or from `set_alpha`) follows its sequence through beam search and
        `num_return_sequences`.
        """
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) else None
        with self._call(clm_alpha, batch, compat.generate_repeats(self.model, kwargs)):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ merge and unload
    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None) -> nn.Module:
        layer = self.clm_layer()
        if layer is None:
            return self.model
        layers_name, layers = compat.find_decoder_layers(self.model)
        index = next(i for i, m in enumerate(layers) if m is layer)
        if merge:
            new_layer = layer.build_merged_layer(adapter_names, safe_merge)  # raises, model untouched, if not exact
            modules = list(layers)
            modules[index] = layer.base_layer
            modules.insert(index, new_layer)
            for position, module in enumerate(modules):
                compat.set_layer_index(module, position)
            parent = self.model.get_submodule(layers_name.rpartition(".")[0])
            setattr(parent, layers_name.rpartition(".")[2], nn.ModuleList(modules))
            compat.insert_layer_in_config(self.model.config, index)
        else:
            layers[index] = layer.base_layer
        self._forget_layer()
        return self.model

    def _forget_layer(self) -> None:
        if self.dual_path is not None:
            self.dual_path.detach()
        self.dual_path = None
        self._layer_ref = []
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config

    def _rollback_adapter(self, adapter_name: str) -> None:
        """Undo the injection of `adapter_name` after a failed load, leaving the model as it was."""
        layer = self.clm_layer()
        if layer is None:
            return
        self.peft_config.pop(adapter_name, None)
        if len(layer.clm_layers) <= 1:
            _, layers = compat.find_decoder_layers(self.model)
            layers[next(i for i, m in enumerate(layers) if m is layer)] = layer.base_layer
            self._forget_layer()
        else:
            layer.delete_adapter(adapter_name)

    # ------------------------------------------------------------------------------------------ state dicts
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {k: v for k, v in selected.items() if ".merged_layer." not in k}  # derived, never saved

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # The adapter name sits in the middle of the key (clm_layers.<name>.self_attn...): drop it there, so that a
        # file saved under one adapter name loads under any other.
        return key.replace(f".clm_layers.{adapter_name}.", ".clm_layers.")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = model.base_model if isinstance(getattr(model, "base_model", None), ClmModel) else None
        try:
            if tuner is not None:
                check_adapter_tensors(state_dict, checkpoint_prefix(tuner.model, config.layer_index), "the adapter")
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            inside = f".clm_layers.{adapter_name}."
            expected = {k.partition(inside)[2]: tuple(v.shape) for k, v in model.state_dict().items() if inside in k}
            got = {k.partition(inside)[2]: tuple(v.shape) for k, v in remapped.items() if inside in k}
            check_shapes(expected, got, adapter_name)
        except ValueError:
            if tuner is not None:
                tuner._rollback_adapter(adapter_name)
            raise
        return remapped
