"""DPO pairs that each name the alpha their policy is scored at: training both ends of one knob.

A CLM knob is trained at alpha 1, and alpha < 0 is expected to reverse what it learnt. In logits mode alpha -1 is
`2 * base - aligned` at the logits, which need not reverse a preference between whole answers (the domains
experiment measured it: a knob trained for expert over generic and generic over avoid lowers the avoid answers at
alpha -1 as it does at +1). A DPO row with `"alpha": -1` is instead scored with the policy at alpha -1, so the
negative end of the knob learns its own preference: e.g. expert over generic at +1 and avoid over generic at -1,
from one adapter. The reference is alpha 0 (the adapter off) for every row, as in plain CLM training.

Lifecycle of `AlphaPairDPOTrainer`, a thin subclass of TRL's `DPOTrainer`:

- construction: the dataset's `clm_alpha` column (`train()` fills it from the rows' `alpha`, 1 where a row has
  none) is kept through TRL's column filter, and the default collator is wrapped so that each batch carries
  `clm_alpha`, one value per sequence in TRL's [chosen..., rejected...] layout;
- every loss computation pops `clm_alpha` from the batch and runs TRL's loss inside the model's
  `alpha_context`: the policy forward uses each row's alpha, the reference forward (adapter disabled) is the base
  whatever the context says;
- nothing outlives the call: the context is this thread's and is restored on the way out.

Logits and hidden modes take one alpha per sequence; weights mode does not, so `train()` refuses the combination.
A negative alpha means something different in each mode (`2 * base - aligned` at the logits in logits mode, at the
layer's output in hidden mode), so the negative end is learnt for the mode it was trained in. In logits mode a batch
with any row not at 1 runs both paths (about twice the activations of an all-+1 batch); models whose final logits
are soft-capped (Gemma-2) mix after TRL's fused head, which cannot be done, so they train such data in hidden mode.

Example (a JSONL file of DPO rows):
    ```
    {"prompt": "...", "chosen": "<expert answer>", "rejected": "<generic answer>", "alpha": 1}
    {"prompt": "...", "chosen": "<avoid answer>", "rejected": "<generic answer>", "alpha": -1}
    ```
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

from .. import transformers_compat as compat


COLUMN = "clm_alpha"


def mirrored_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair at alpha +1 and its mirror (chosen and rejected swapped) at alpha -1, for a knob whose negative end
    should be trained, not only extrapolated (e.g. a concise knob that should write the longer answers fluently at
    alpha < 0). Rows that already carry an `alpha` are refused: mirroring them twice has no one meaning.

    Example:
        ```py
        >>> [(r["chosen"], r["alpha"]) for r in mirrored_pairs([{"prompt": "q", "chosen": "a", "rejected": "b"}])]
        [('a', 1.0), ('b', -1.0)]
        ```
    """
    out = []
    for i, row in enumerate(rows):
        if "alpha" in row:
            raise ValueError(f"row {i} already has an 'alpha' ({row['alpha']!r}); mirror rows without one.")
        out.append({**row, "alpha": 1.0})
        out.append({**row, "chosen": row["rejected"], "rejected": row["chosen"], "alpha": -1.0})
    return out


class _CollatorWithAlpha:
    """TRL's preference collator, plus `clm_alpha`: each example's alpha, once for its chosen and once for its
    rejected sequence."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        alphas = [float(e[COLUMN]) for e in examples]
        batch = self.collator([{k: v for k, v in e.items() if k != COLUMN} for e in examples])
        batch[COLUMN] = torch.tensor(alphas + alphas, dtype=torch.float32)
        return batch


class AlphaPairDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, with the policy of each pair scored at the pair's own alpha (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        dataset = kwargs.get("train_dataset")
        if dataset is not None and COLUMN not in dataset.column_names:
            raise ValueError(
                f"AlphaPairDPOTrainer needs a {COLUMN!r} column (each pair's alpha); the dataset has "
                f"{dataset.column_names}."
            )
        super().__init__(*args, **kwargs)
        clm = self.accelerator.unwrap_model(self.model)
        layer = getattr(getattr(clm, "base_model", None), "clm_layer", None)
        if layer is None:
            raise ValueError(
                "AlphaPairDPOTrainer trains a CLM adapter (give peft_config=ClmConfig(...) or a CLM "
                f"PeftModel); got {type(clm).__name__}."
            )
        if layer().interpolation == "logits" and compat.final_logit_softcapping(clm.base_model.model) is not None:
            raise ValueError(
                "this model soft-caps its final logits, so logits mode mixes them after the head, which "
                "TRL's fused head does not allow: train pairs with their own alpha in 'hidden' mode."
            )
        self.data_collator = _CollatorWithAlpha(self.data_collator)

    def compute_ref_log_probs(self, model, inputs):
        # the reference is alpha 0 whatever the pair's alpha: the column is not a model input
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != COLUMN})

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, COLUMN]

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        alpha = inputs.pop(COLUMN)
        clm = self.accelerator.unwrap_model(model).base_model
        with clm.alpha_context(alpha.tolist()):
            return super()._compute_loss(model, inputs, return_outputs)
