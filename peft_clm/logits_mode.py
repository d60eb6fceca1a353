"""Logits mode, the paper-exact mix of CLM (arXiv 2503.04346): `(1 - a) logits(base) + a logits(aligned)`.

The unaligned path is the original model; an aligned path is the adapter's layer followed by all original layers.
With k adapters the mix is `base + sum_i a_i (aligned_i - base)` over k + 1 paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from . import transformers_compat as compat
from .alpha import AlphaValue, Terms, call_state, pop_frame, push_frame, update_frame
from .constants import MODEL_ROW_KWARGS
from .kernels import hidden_mix


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one forward lays out its paths: block j of `batch` rows runs `paths[j]`, an adapter name, or None for
    the unaligned path (always last). `alphas` are the aligned paths' strengths."""

    paths: tuple[Optional[str], ...]
    batch: int
    alphas: tuple[AlphaValue, ...]

    @property
    def num_paths(self) -> int:
        return len(self.paths)


def plan_paths(terms: Terms, batch: int) -> Plan:
    """Only the paths alpha needs: the unaligned path alone at alpha 0, one aligned path alone at alpha 1."""
    if terms.identity:
        return Plan((None,), batch, ())
    if terms.single:
        return Plan((terms.single,), batch, ())
    return Plan((*terms.names, None), batch, terms.alphas)


def mix_paths(t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """`base + sum_i a_i (path_i - base)` of a tensor holding the paths as blocks of `plan.batch` rows."""
    B, k = plan.batch, plan.num_paths - 1
    return hidden_mix(t[k * B :], [t[j * B : (j + 1) * B] for j in range(k)], list(plan.alphas))


def mix_output(output: Any, plan: Plan) -> Any:
    """Every tensor of a model output with one block of rows per path, mixed back to `plan.batch` rows (the last
    hidden state or logits, and each entry of hidden_states and attentions); the KV cache keeps its paths."""
    rows = plan.num_paths * plan.batch

    def mix(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return mix_paths(value, plan)
        if isinstance(value, tuple):
            return tuple(mix(v) for v in value)
        return value

    for key, value in list(output.items()):
        if key != "past_key_values":
            output[key] = mix(value)
    return output


class DualPath:
    """Runs logits mode: every path as one batch of P*B rows through the shared layers, so each weight is read once
    per step, mixed back to B rows at the end.

    Lifecycle. `attach()` registers four hooks and a beam-search reorder; `detach()` removes them (ClmModel calls
    them when the model enters or leaves logits mode). In one forward of the model, with a plan per call kept in the
    call state of this thread (`alpha.CallState`):

    1. plan (`_repeat_inputs`, decoder pre-hook): which paths alpha needs (`plan_paths`): adapters with a non-zero
       alpha, then the unaligned path; one path when alpha is 0, or 1 for one adapter.
    2. repeat inputs (same hook): input ids or embeddings, the attention mask (a tensor, or a dict per attention
       type with a static cache) and position ids are repeated once per path, so that the mask, the rotary
       embeddings and the KV cache the decoder builds cover every path.
    3. split rows per path (`ClmLayer`): block j runs adapter j's layer; the unaligned block skips it.
    4. mix (`_mix_outputs`, decoder post-hook): last hidden state, hidden states and attentions back to B rows. The
       LM head then runs once on B rows, exactly: it is affine and the mixing weights sum to one. Soft-capped
       logits (Gemma 2) are not affine in the hidden state: there the decoder hands its P*B rows on, and
    5. loss (`_hold_labels` / `_mix_logits`, top-model pre- and post-hooks) mixes the capped logits and computes
       the loss on them, with the labels held back from the model's own loss.
    6. clear: the post-hooks run also when the forward raises an exception, and pop the frames the pre-hooks
       pushed; `ClmModel.forward`/`generate` restore the call state they started with in any case (a
       KeyboardInterrupt, which torch's hooks do not see, included).

    Beam search reorders the cache with indices for B rows; `attach()` makes generate() reorder each path's block.
    """

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model = model
        self.layer = layer
        self.decoder = compat.decoder_of(model)
        self._handles: list = []

    def attach(self) -> None:
        if self._handles:
            return
        self._handles = [
            self.decoder.register_forward_pre_hook(self._repeat_inputs, with_kwargs=True),
            self.decoder.register_forward_hook(self._mix_outputs, with_kwargs=True, always_call=True),
        ]
        if self.model is not self.decoder and compat.final_logit_softcapping(self.model) is not None:
            self._handles += [
                self.model.register_forward_pre_hook(self._hold_labels, with_kwargs=True),
                self.model.register_forward_hook(self._mix_logits, with_kwargs=True, always_call=True),
            ]
        compat.install_beam_reorder(self.model, compat.reorder_path_blocks)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        compat.install_beam_reorder(self.model, None)

    # ------------------------------------------------------------------------------------------ decoder hooks
    def _repeat_inputs(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.layer.logits_active:
            return None
        rows_from = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None), None)
        if rows_from is None and args and isinstance(args[0], torch.Tensor):
            rows_from = args[0]
        if rows_from is None:
            raise ValueError("logits mode needs input_ids or inputs_embeds.")
        batch = rows_from.shape[0]
        plan = plan_paths(self.layer.terms(rows=batch), batch)
        if plan.num_paths == 1:
            push_frame(self.layer, "decoder", plan=plan, return_tuple=False)
            return None
        kwargs, as_tuple = compat.ask_for_output_object(module, kwargs)  # mixed field by field below
        push_frame(self.layer, "decoder", plan=plan, return_tuple=as_tuple)
        args = tuple(compat.repeat_blocks(a, plan.num_paths, batch) for a in args)
        kwargs = {k: compat.repeat_blocks(v, plan.num_paths, batch) if k in MODEL_ROW_KWARGS else v
                  for k, v in kwargs.items()}
        return args, kwargs

    def _mix_outputs(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        frame = pop_frame(self.layer, "decoder")
        if frame is None or output is None or frame.plan.num_paths == 1:
            return None
        outer = call_state(self.layer)
        if outer.pushed_by == "top" and outer.mix_after_head:
            update_frame(self.layer, outer, plan=frame.plan)  # soft-capped: the top model mixes the logits
        else:
            output = mix_output(output, frame.plan)
        return compat.finish_output(output, frame.return_tuple)

    # ------------------------------------------------------------------------------------------ top-model hooks
    def _hold_labels(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.layer.logits_active:
            return None
        terms = self.layer.terms()
        if terms.identity or terms.single:
            return None  # one path: the model's own logits and loss are exact
        kwargs, as_tuple = compat.ask_for_output_object(module, kwargs)
        labels = kwargs.pop("labels", None)
        push_frame(self.layer, "top", mix_after_head=True, labels=labels, return_tuple=as_tuple)
        return args, kwargs

    def _mix_logits(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        frame = pop_frame(self.layer, "top")
        if frame is None or output is None:
            return None
        if frame.plan is not None and frame.plan.num_paths > 1:
            if getattr(output, "logits", None) is None:
                raise RuntimeError(
                    "logits mode with soft-capped logits mixes the logits, but this forward returned none (e.g. a "
                    "fused LM head that returns log-probabilities); use alpha 0 or 1 here, or interpolation='hidden'."
                )
            output = mix_output(output, frame.plan)
        if frame.labels is not None:
            output = compat.with_causal_lm_loss(module, output, frame.labels, kwargs)
        return compat.finish_output(output, frame.return_tuple)
