"""Configuration of a CLM adapter (controllable-alignment layer)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .alpha import check_alpha


INTERPOLATIONS = ("logits", "hidden", "weights")


@dataclass
class ClmConfig(PeftConfig):
    """Configuration of a [`ClmModel`]: one identity-initialised decoder layer inserted before a decoder layer.

    Only the inserted layer is trained; at inference `alpha` dials the learned alignment: 0 is the base model,
    1 the aligned model, values between interpolate and values outside extrapolate.

    Args:
        interpolation: How alpha mixes the aligned and the unaligned model.
            `"logits"` (paper-exact, arXiv 2503.04346): `(1-a) * logits(base) + a * logits(aligned)`, both paths in
            one batched pass.
            `"hidden"`: `x + a * (layer(x) - x)` right after the new layer, one pass.
            `"weights"`: the new layer runs with parameters `w0 + a * (w - w0)`, `w0` being its identity
            initialisation; zero overhead and mergeable at any alpha.
            The mode is an inference choice: the weights are the same in every mode.
        alpha: The default strength of this adapter, used when it is loaded; `set_alpha` dials it at run time
            without changing this saved default.
        layer_index: The new layer is inserted before decoder layer `layer_index` and initialised from it.
        init_weights: `True` (default): a copy of decoder layer `layer_index` whose attention output projection
            and MLP down projection are zeroed, so with the residual stream it is exactly the identity.
            `False`: the same copy with small random output projections, a non-identity layer for tests.
        zero_modules: Names, inside the decoder layer, of the attention output projection and MLP down projection.
            Inferred for known architectures; set it to use CLM with another architecture.
        r: With a rank, the inserted layer is still the identity-initialised copy of layer `layer_index`, but only
            rank-r factors of its linear modules are trained and saved (`W0 + s * B @ A`; the zeroed projections
            learn `s * B @ A` from zero); its other weights are derived from the base model when it loads, so the
            adapter file is a small fraction of a full layer. `None` (default): the full layer.
        lora_alpha: The factors' scale is `lora_alpha / r` (default `r`: a scale of 1). Not the knob's alpha.
        lowrank_modules: Linear modules that get factors (default: every linear module of the layer; must include
            the zeroed ones).
        train_norms: Low-rank only: train the layer's norm weights too (default: frozen, the base model's).
        base_fingerprint: A sketch of the wrapped layer's weights (`load_checks.layer_sketch`: per parameter, the
            norm and alternating sum of a strided sample), set when the adapter is created. Loading onto
            another base is refused for a low-rank adapter (its weights are derived from the base) and warned for
            a full one.

    Example:
        ```py
        >>> import peft_clm
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_clm.ClmConfig(interpolation="hidden"))
        >>> model.set_alpha(0.5)
        ```
    """

    interpolation: Literal["logits", "hidden", "weights"] = field(
        default="logits", metadata={"help": "How alpha mixes: 'logits', 'hidden' or 'weights'."}
    )
    alpha: float = field(default=1.0, metadata={"help": "Default alignment strength of this adapter."})
    layer_index: int = field(default=0, metadata={"help": "Insert the new layer before this decoder layer."})
    init_weights: bool = field(default=True, metadata={"help": "True: exact identity init; False: random outputs."})
    zero_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Attention-output and MLP-down projection names inside a decoder layer (auto for known models)."
        },
    )
    r: Optional[int] = field(
        default=None, metadata={"help": "Rank of a low-rank CLM layer; None trains (and saves) the full layer."}
    )
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": "Low-rank updates are scaled by lora_alpha / r (default: r, a scale of 1)."}
    )
    lowrank_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Linear modules of the layer with low-rank factors (default: all of them)."}
    )
    train_norms: bool = field(default=False, metadata={"help": "Low-rank: train the layer's norms too."})
    base_fingerprint: Optional[dict] = field(
        default=None, metadata={"help": "Set at injection: a sketch of the wrapped layer, checked when loading."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Set automatically to the decoder layer at `layer_index`; leave unset."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.CLM
        if self.task_type is None:  # CLM is for causal LMs; this gives PeftModelForCausalLM (generate, labels)
            self.task_type = "CAUSAL_LM"
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r} is not one of {INTERPOLATIONS}.")
        self.alpha = check_alpha(self.alpha, "alpha", rows=False)
        if isinstance(self.layer_index, bool) or not isinstance(self.layer_index, int) or self.layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative int, got {self.layer_index!r}.")
        if self.zero_modules is not None:
            names = self.zero_modules
            if (
                isinstance(names, str)
                or not isinstance(names, (list, tuple))
                or not names
                or not all(isinstance(n, str) and n.strip() for n in names)
                or len(set(names)) != len(names)
            ):
                raise ValueError(
                    "zero_modules must be a non-empty list of distinct module names inside one decoder layer (the "
                    f"attention output projection and the MLP down projection), got {names!r}."
                )
            self.zero_modules = list(names)
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise ValueError(f"r must be a positive int (the rank) or None (the full layer), got {self.r!r}.")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool) or not isinstance(
                self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}.")
        if self.r is None and (self.lora_alpha is not None or self.lowrank_modules is not None or self.train_norms):
            raise ValueError("lora_alpha, lowrank_modules and train_norms apply to a low-rank layer: set r too.")
        if self.lowrank_modules is not None:
            names = self.lowrank_modules
            if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names or not all(
                isinstance(n, str) and n.strip() for n in names
            ):
                raise ValueError(f"lowrank_modules must be a non-empty list of module names, got {names!r}.")
            self.lowrank_modules = list(names)

    @property
    def scaling(self) -> float:
        """The factors' scale, `lora_alpha / r` (low-rank layers only)."""
        return (self.lora_alpha if self.lora_alpha is not None else self.r) / self.r

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config, remembering the directory it came from (not saved), so that the adapter's weights file
        can be checked before anything is injected into a model (`ClmModel.inject_adapter`)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(directory):
            config._loaded_from = directory
        return config
