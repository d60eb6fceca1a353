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


COLUMN = "clm_alpha"


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
        super().__init__(*args, **kwargs)
        self.data_collator = _CollatorWithAlpha(self.data_collator)

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
