"""A distillation hold: train a knob on its pairs while its next-token distributions on other text stay the base's.

Held pairs ("generic over avoid" on other domains' questions) tell a knob which whole answer to prefer there; they
do not tell it to change nothing, and logits-mode knobs trained that way push each other's domains when added (the
domains experiment measured it: with the financial avoid knob at 1.5 the avoid-generic log-likelihood gap of medical
and legal questions fell by 1.1-1.2 nats/token). The hold term asks for "nothing" directly: the forward KL from the
base (the model with its adapter disabled: DPO's reference for a new adapter) to the policy, averaged over the answer
tokens of hold rows, added to the DPO loss:

    loss = DPO loss + hold_weight * mean over answer tokens of KL(p_base(. | x, y<t) || p_policy(. | x, y<t))

In logits mode a KL of 0 means that the knob's logits there equal the base's up to one shift per position, which
softmax ignores: at any alpha, and summed with other knobs, it leaves those tokens where the base puts them. In
hidden mode the hold is at alpha 1 only. What a KL near 0 on the hold rows does for *other* questions of the same
domains is an empirical matter: the README's domains experiment measures it.

Lifecycle of `HoldTermMixin`, put in front of TRL's `DPOTrainer` (or `AlphaPairDPOTrainer`) by `hold_trainer`:

- construction: the hold rows (prompt/completion, or messages ending with the assistant's answer) are checked and
  kept;
- every training `compute_loss` (one per micro-batch): TRL's loss on the pairs, plus `hold_weight` times the KL on
  hold batch number `global_step * gradient_accumulation_steps + micro-step` of a fixed sequence (pass p over the
  rows is the p-th seeded reshuffle; the last short batch of a pass is dropped), so a run resumed from a checkpoint
  holds the batches an uninterrupted run would. The batch is tokenised when drawn, as `tools.preference` scores
  completions (chat template, the answer's tokens and end-of-sequence), right-padded. The policy runs at the model's
  current alpha (1 while training; a pair's own alpha does not apply to hold rows), the reference with the adapter
  disabled and without gradients; the KL is logged as `hold/kl` beside TRL's metrics;
- evaluation (`compute_loss` while the model is not training) is TRL's loss alone: the hold is a training term;
- under DDP each process holds its slice of a global batch of hold rows, and the KL is the mean over all
  processes' tokens (as one process with the whole batch); its forward passes go through the unwrapped model, so
  the gradients of both terms reach the parameters in the one backward and are reduced once.

Example:
    ```py
    >>> from trl import DPOTrainer
    >>> trainer = hold_trainer(DPOTrainer)(model=model, args=args, train_dataset=pairs, processing_class=tok,
    ...                                    peft_config=ClmConfig(), hold_rows=rows, hold_weight=10.0)
    ```
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from .preference import completion_batches


def hold_rows_from(rows: Sequence[dict]) -> list[dict]:
    """Hold rows as prompt/completion: `messages` rows (as `tools.data.read_jsonl(..., "sft")` returns them) are
    split before their last message, which must be the assistant's. Errors name the row (1-based).

    Example:
        ```py
        >>> hold_rows_from([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
        [{'prompt': [{'role': 'user', 'content': 'q'}], 'completion': 'a'}]
        ```
    """
    out = []
    for i, row in enumerate(rows, 1):
        if "messages" in row:
            messages = row["messages"]
            if len(messages) < 2 or messages[-1].get("role") != "assistant":
                raise ValueError(
                    f"hold row {i}: a 'messages' row must end with the assistant's answer (the tokens held) after at "
                    "least one other message."
                )
            out.append({"prompt": messages[:-1], "completion": messages[-1]["content"]})
        else:
            out.append({"prompt": row["prompt"], "completion": row["completion"]})
    return out


def check_hold(rows: Sequence[dict], weight: Any, batch_size: Any, processes: int = 1) -> list[dict]:
    """The hold rows as prompt/completion, after checking the weight, the batch size and that the rows fill one
    global batch (`batch_size` rows per process); one error naming what is wrong."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight < math.inf):
        raise ValueError(f"hold_weight={weight!r} must be a finite number > 0.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"hold_batch_size={batch_size!r} must be an integer >= 1.")
    if len(rows) < batch_size * processes:
        raise ValueError(
            f"{len(rows)} hold rows are fewer than one batch of them ({batch_size} per process x {processes} "
            "processes, the pairs' batch size); give more rows or a smaller batch."
        )
    return hold_rows_from(rows)


def token_kl(model, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_model) of the next-token distribution before each target token (one value per token),
    differentiable in the model's trained parameters; the base is the model with its adapter disabled. `target`
    marks the tokens held (position t's distribution predicts token t + 1)."""
    predicts = target[:, 1:]
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    base = base[:, :-1][predicts].float().log_softmax(-1)
    policy = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][predicts].float()
    policy = policy.log_softmax(-1)
    return (base.exp() * (base - policy)).sum(-1)


def hold_kl(model, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`token_kl` averaged over the target tokens: the hold term of one batch.

    Example:
        ```py
        >>> kl = hold_kl(peft_model, ids, mask, target)   # 0 for a freshly initialised CLM layer
        ```
    """
    return token_kl(model, ids, mask, target).mean()


class HoldTermMixin:
    """The hold term over a DPO trainer (see the module docstring); `hold_trainer(DPOTrainer)` makes the class."""

    def __init__(
        self, *args: Any, hold_rows: Sequence[dict], hold_weight: float = 1.0, hold_batch_size: int = 4, **kwargs: Any
    ):
        check_hold(hold_rows, hold_weight, hold_batch_size)  # before the model is wrapped
        super().__init__(*args, **kwargs)
        self.hold_rows = check_hold(hold_rows, hold_weight, hold_batch_size, self.accelerator.num_processes)
        self.hold_weight = float(hold_weight)
        self.hold_batch_size = hold_batch_size
        self._hold_pass: tuple[int, list[dict]] = (-1, [])
        self._hold_index: int | None = None  # the next micro-batch's hold batch; set at the first training call

    def _hold_rows_at(self, index: int) -> list[dict]:
        """This process's rows of global hold batch `index`: every process shuffles alike and takes its slice."""
        size, rank = self.hold_batch_size, self.accelerator.process_index
        step = size * self.accelerator.num_processes
        per_pass = len(self.hold_rows) // step
        number, start = divmod(index, per_pass)
        if self._hold_pass[0] != number:  # pass p shuffles the rows with the (p+1)-th draw of one seeded generator
            rng = random.Random(self.args.seed)
            for _ in range(number):
                rng.shuffle(list(self.hold_rows))
            rows = list(self.hold_rows)
            rng.shuffle(rows)
            self._hold_pass = (number, rows)
        first = start * step + rank * size
        return self._hold_pass[1][first : first + size]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.model.training:
            return out
        if self._hold_index is None:  # a resumed run starts where the uninterrupted one would be
            self._hold_index = self.state.global_step * self.args.gradient_accumulation_steps
        rows = self._hold_rows_at(self._hold_index)
        self._hold_index += 1
        ids, mask, target = next(
            completion_batches(
                self.processing_class,
                [r["prompt"] for r in rows],
                [r["completion"] for r in rows],
                len(rows),
                self.args.max_length,
                self.accelerator.device,
            )
        )
        tokens = token_kl(self.accelerator.unwrap_model(model), ids, mask, target)
        # the mean over every process's tokens: DDP averages the processes' gradients, hence the factor
        count = self.accelerator.reduce(torch.tensor(float(tokens.numel()), device=tokens.device), "sum")
        kl = tokens.sum() * self.accelerator.num_processes / count
        self._metrics["train"]["hold/kl"].append(self.accelerator.reduce(kl.detach(), "mean").item())
        if return_outputs:
            loss, outputs = out
            return loss + self.hold_weight * kl, outputs
        return out + self.hold_weight * kl


def hold_trainer(trainer_class: type) -> type:
    """`trainer_class` (TRL's `DPOTrainer` or a subclass) with the hold term: it takes `hold_rows`, `hold_weight`
    and `hold_batch_size`."""
    return type(f"Hold{trainer_class.__name__}", (HoldTermMixin, trainer_class), {})
