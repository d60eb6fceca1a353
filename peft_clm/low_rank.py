"""The low-rank CLM layer (`ClmConfig(r=...)`): the inserted layer is still the identity-initialised copy of layer L,
but only rank-r factors of its linear modules are trained and saved; every other weight is the wrapped layer's.

Each linear module W of the copy runs as `W0 x + s * B (A x)` (`s = lora_alpha / r`), where W0 is the wrapped
layer's weight, and zero for the zeroed output projections, which so start at exactly zero and learn a rank-r
update. B starts at zero, so a fresh adapter is exactly the identity. Norms are the wrapped layer's unless
`train_norms`. The adapter file holds the factors (and trained norms) only.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from . import transformers_compat as compat
from .constants import is_in_modules


class LowRankFactor(nn.Module):
    """`A` [r, in] and `B` [out, r] of one linear module: its update is `s * B @ A`."""

    def __init__(self, in_features: int, out_features: int, r: int, dtype: torch.dtype, device, init_b: bool):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as LoRA does; B = 0 makes the update zero
            if init_b:  # a non-identity layer, for tests
                self.B.normal_(0.0, 0.02)


class LowRankFactors(nn.Module):
    """The trainable state of one low-rank adapter: a `LowRankFactor` per linear module of the copied layer (keys
    are module names with '.' written '__'), and with `train_norms` its own copies of the norm weights."""

    def __init__(self, base_layer: nn.Module, zero_modules: Sequence[str], r: int, scaling: float,
                 modules: Optional[Sequence[str]], train_norms: bool, init_weights: bool) -> None:
        super().__init__()
        self.scaling, self.zero_modules = scaling, tuple(zero_modules)
        factored, norms = self._plan(base_layer, self.zero_modules, modules, train_norms)
        linears = compat.linear_modules(base_layer)
        self.factors = nn.ModuleDict()
        for name in factored:
            module, in_features, out_features, _ = linears[name]
            self.factors[name.replace(".", "__")] = LowRankFactor(
                in_features, out_features, r, module.weight.dtype, module.weight.device, init_b=not init_weights
            )
        params = dict(base_layer.named_parameters())
        self.norms = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(params[n].detach().clone()) for n in norms})

    @staticmethod
    def _plan(base_layer: nn.Module, zero_modules: tuple[str, ...], modules: Optional[Sequence[str]],
              train_norms: bool) -> tuple[list[str], list[str]]:
        """(linear modules that get factors, parameters trained as norms), checked."""
        linears = compat.linear_modules(base_layer)
        names = list(linears) if modules is None else list(modules)
        unknown = [n for n in names if n not in linears]
        if unknown:
            raise ValueError(f"lowrank_modules {unknown} are not linear modules of the decoder layer; it has "
                             f"{sorted(linears)}.")
        missing = [z for z in zero_modules if z not in names]
        if missing:  # with its output projections at zero the layer could never leave the identity
            raise ValueError(f"lowrank_modules must include the zeroed modules {missing}, the only way the layer "
                             "departs from the identity.")
        norms = [n for n, _ in base_layer.named_parameters()
                 if train_norms and n.rpartition(".")[0] not in linears and not is_in_modules(n, zero_modules)]
        return names, norms

    @classmethod
    def state_shapes(cls, base_layer: nn.Module, zero_modules: tuple[str, ...], r: int,
                     modules: Optional[Sequence[str]], train_norms: bool) -> dict[str, tuple]:
        """The shapes of this state for a layer, by key inside the adapter, without building it."""
        factored, norms = cls._plan(base_layer, zero_modules, modules, train_norms)
        linears, params = compat.linear_modules(base_layer), dict(base_layer.named_parameters())
        shapes = {}
        for name in factored:
            _, in_features, out_features, _ = linears[name]
            shapes[f"factors.{name.replace('.', '__')}.A"] = (r, in_features)
            shapes[f"factors.{name.replace('.', '__')}.B"] = (out_features, r)
        shapes.update({f"norms.{n.replace('.', '__')}": tuple(params[n].shape) for n in norms})
        return shapes

    def effective_parameters(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter of the layer as it runs: `W0 + s * B @ A` (transposed for Conv1D weights), zero for the
        zeroed modules' parameters where no factor applies, the (trained) norms; differentiable in the factors."""
        linears = compat.linear_modules(base_layer)
        out = {}
        for pname, p in base_layer.named_parameters():
            out[pname] = torch.zeros_like(p) if is_in_modules(pname, self.zero_modules) else p
            key = pname.replace(".", "__")
            if key in self.norms:
                out[pname] = self.norms[key]
        for key, factor in self.factors.items():
            name = key.replace("__", ".")
            _, _, _, transposed = linears[name]
            delta = self.scaling * (factor.B @ factor.A)
            out[f"{name}.weight"] = out[f"{name}.weight"] + (delta.T if transposed else delta)
        return out


class LowRankLinear(nn.Module):
    """A linear module of the copied layer run as `W0 x + s * B (A x)`; `W0 x` is skipped for a zeroed module."""

    def __init__(self, base: nn.Module, factor: LowRankFactor, scaling: float, zeroed: bool) -> None:
        super().__init__()
        self.base, self.factor, self.scaling, self.zeroed = base, factor, scaling, zeroed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = nn.functional.linear(nn.functional.linear(x, self.factor.A), self.factor.B) * self.scaling
        return delta if self.zeroed else self.base(x) + delta


def build_runner(base_layer: nn.Module, factors: LowRankFactors, slot: int) -> nn.Module:
    """The decoder layer a low-rank adapter runs: the wrapped layer's structure, sharing its tensors and the
    factors (nothing is copied), with `LowRankLinear` modules and its own KV-cache slot. Not registered anywhere:
    derived state, cached by `ClmLayer.adapter_layer` under the identities of the tensors it shares."""
    memo = {id(t): t for t in itertools.chain(base_layer.parameters(), base_layer.buffers())}
    runner = copy.deepcopy(base_layer, memo)
    compat.set_layer_index(runner, slot)
    for key, factor in factors.factors.items():
        name = key.replace("__", ".")
        parent_name, _, attr = name.rpartition(".")
        parent = runner.get_submodule(parent_name)
        zeroed = is_in_modules(name, factors.zero_modules)
        setattr(parent, attr, LowRankLinear(getattr(parent, attr), factor, factors.scaling, zeroed))
    for pname, _ in base_layer.named_parameters():  # trained norms replace the wrapped layer's
        key = pname.replace(".", "__")
        if key in factors.norms:
            owner_name, _, attr = pname.rpartition(".")
            setattr(runner.get_submodule(owner_name), attr, factors.norms[key])
    return runner
