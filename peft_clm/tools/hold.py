"""A distillation hold: train a knob on its pairs while its next-token distributions on other text stay the base's.

Held pairs ("generic over avoid" on other domains' questions) tell a knob which whole answer to prefer there; they
do not tell it to change nothing, and two logits-mode knobs trained that way pull each other's domains when added
(the domains experiment measured it: with the financial avoid knob at -1.5 the avoid-generic log-likelihood gap of
medical and legal questions fell by 1.2 nats/token). The hold term asks for "nothing" directly: the forward KL from
the base (the same model with the adapter off, DPO's reference) to the policy, averaged over the answer tokens of
hold rows, added to the DPO loss:

    loss = DPO loss + hold_weight * mean over answer tokens of KL(p_base(. | x, y<t) || p_policy(. | x, y<t))

In logits mode a KL of 0 means that the knob's logits there equal the base's up to one shift per position, which
softmax ignores: at any alpha, and summed with other knobs, it leaves those tokens where the base puts them.

Lifecycle of `HoldDPOTrainer`, a mixin put in front of TRL's `DPOTrainer` (or `AlphaPairDPOTrainer`) by
`hold_trainer`:

- construction: the hold rows (prompt/completion) are kept; each batch of `hold_batch_size` rows per process is
  tokenised when drawn, as `tools.preference` scores completions (chat template, the answer's tokens and
  end-of-sequence), right-padded;
- every `compute_loss`: TRL's loss on the batch of pairs, plus `hold_weight` times the KL on the next hold batch
  (a seeded shuffle, reshuffled on each pass), the policy at the model's current alpha (1 while training; each
  pair's own alpha is not applied to hold rows) and the reference with the adapter disabled, without gradients;
  the KL is logged as `hold/kl` beside TRL's metrics;
- under DDP each process holds its slice of a global batch of hold rows, and the KL is the mean over all
  processes' tokens (as one process with the whole batch); its forward passes go through the unwrapped model, so
  the gradients of both terms reach the parameters in the one backward and are reduced once.

Example:
    ```py
    >>> from trl import DPOTrainer
    >>> trainer = hold_trainer(DPOTrainer)(model=model, args=args, train_dataset=pairs, processing_class=tok,
    ...                                    peft_config=ClmConfig(), hold_rows=rows, hold_weight=1.0)
    ```
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .preference import _batches


def hold_rows_from(rows: Sequence[dict]) -> list[dict]:
    """Hold rows as prompt/completion: `messages` rows (as `tools.data.read_jsonl(..., "sft")` returns them) are
    split before their last message, which must be the assistant's.

    Example:
        ```py
        >>> hold_rows_from([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
        [{'prompt': [{'role': 'user', 'content': 'q'}], 'completion': 'a'}]
        ```
    """
    out = []
    for i, row in enumerate(rows):
        if "messages" in row:
            messages = row["messages"]
            if len(messages) < 2 or messages[-1].get("role") != "assistant":
                raise ValueError(
                    f"hold row {i}: a 'messages' row must end with the assistant's answer (the tokens "
                    "held) after at least one other message."
                )
            out.append({"prompt": messages[:-1], "completion": messages[-1]["content"]})
        else:
            out.append({"prompt": row["prompt"], "completion": row["completion"]})
    return out


def token_kl(model, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_model) of the next-token distribution before each target token (one value per token),
    differentiable in the model's trained parameters; the base is the model with its adapter disabled. `target`
    marks the tokens held (position t's distribution predicts token t + 1)."""
    predicts = target[:, 1:]
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits[:, :-1][predicts].float().log_softmax(-1)
    policy = model(input_ids=ids, attention_mask=mask).logits[:, :-1][predicts].float().log_softmax(-1)
    return (base.exp() * (base - policy)).sum(-1)


def hold_kl(model, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`token_kl` averaged over the target tokens: the hold term of one batch.

    Example:
        ```py
        >>> kl = hold_kl(peft_model, ids, mask, target)   # 0 for a freshly initialised CLM layer
        ```
    """
    return token_kl(model, ids, mask, target).mean()


class HoldDPOTrainer:
    """The hold term over a DPO trainer (see the module docstring): use `hold_trainer(DPOTrainer)`."""

    def __init__(
        self, *args: Any, hold_rows: Sequence[dict], hold_weight: float = 1.0, hold_batch_size: int = 4, **kwargs: Any
    ):
        if not hold_rows:
            raise ValueError("hold_rows is empty; give prompt/completion rows whose tokens the knob must leave alone.")
        if hold_batch_size < 1:
            raise ValueError(f"hold_batch_size={hold_batch_size!r} must be an integer >= 1.")
        if not (hold_weight > 0 and hold_weight < float("inf")):
            raise ValueError(f"hold_weight={hold_weight!r} must be a finite number > 0.")
        super().__init__(*args, **kwargs)
        self.hold_rows = hold_rows_from(hold_rows)
        self.hold_weight = float(hold_weight)
        self.hold_batch_size = int(hold_batch_size)
        step = self.hold_batch_size * self.accelerator.num_processes
        if len(self.hold_rows) < step:
            raise ValueError(
                f"{len(self.hold_rows)} hold rows are fewer than one batch of them ({step}: "
                "hold_batch_size times the processes); give more rows or a smaller batch."
            )
        self._hold_batches = self._cycle()

    def _cycle(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # every process shuffles alike and takes its slice of each global batch: N processes hold the same rows as
        # one process with an N times larger batch
        rng = random.Random(self.args.seed)
        size, rank = self.hold_batch_size, self.accelerator.process_index
        step = size * self.accelerator.num_processes
        while True:
            rows = list(self.hold_rows)
            rng.shuffle(rows)
            for start in range(0, len(rows) - step + 1, step):  # a last short batch is dropped, as a sampler would
                mine = rows[start + rank * size : start + (rank + 1) * size]
                yield next(
                    _batches(
                        self.processing_class,
                        [r["prompt"] for r in mine],
                        [r["completion"] for r in mine],
                        size,
                        self.args.max_length,
                        self.accelerator.device,
                    )
                )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        tokens = token_kl(self.accelerator.unwrap_model(model), *next(self._hold_batches))
        # the mean over every process's tokens: DDP averages the processes' gradients, hence the factor
        count = self.accelerator.reduce(torch.tensor(float(tokens.numel()), device=tokens.device), "sum")
        kl = tokens.sum() * self.accelerator.num_processes / count
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["hold/kl"].append(self.accelerator.reduce(kl.detach(), "mean").item())
        if return_outputs:
            loss, outputs = out
            return loss + self.hold_weight * kl, outputs
        return out + self.hold_weight * kl


def hold_trainer(trainer_class: type) -> type:
    """`trainer_class` (TRL's `DPOTrainer` or a subclass) with the hold term: it takes `hold_rows`, `hold_weight`
    and `hold_batch_size`."""
    return type(f"Hold{trainer_class.__name__}", (HoldDPOTrainer, trainer_class), {})
