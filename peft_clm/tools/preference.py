"""Preference metrics of a CLM model on prompt/chosen/rejected pairs: DPO loss, reward accuracy, margins.

The implicit reward of a completion is `beta * (log p_alpha(y|x) - log p_0(y|x))`; the reference p_0 is the same
model at alpha 0 (adapter off), as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F


def _as_text(tokenizer, prompt, completion) -> tuple[str, str]:
    if isinstance(prompt, list):  # conversational
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        completion_text = completion[-1]["content"] if isinstance(completion, list) else completion
        return prompt_text, completion_text
    return prompt, completion


def _pair_ids(tokenizer, prompt, completion, max_length: Optional[int], eos: bool = True) -> tuple[list[int], int]:
    p, c = _as_text(tokenizer, prompt, completion)
    p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] if c else []
    if eos and tokenizer.eos_token_id is not None:
        c_ids = c_ids + [tokenizer.eos_token_id]
    ids = (p_ids + c_ids)[-max_length:] if max_length else p_ids + c_ids  # keep the answer's end
    return ids, min(len(c_ids), len(ids))


def completion_batches(tokenizer, prompts, completions, batch_size, max_length, device, eos: bool = True):
    """Right-padded batches (ids, attention mask, target) of prompt + completion sequences; `target` marks the
    completion's tokens (and the end-of-sequence token with `eos`). A sequence longer than `max_length` (None: no
    limit) loses its first tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompts), batch_size):
        items = [_pair_ids(tokenizer, p, c, max_length, eos) for p, c in
                 zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for i, (seq, n_completion) in enumerate(items):  # right padding
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            target[i, len(seq) - n_completion : len(seq)] = True
        yield ids.to(device), mask.to(device), target.to(device)


def _completion_logprob(logits: torch.Tensor, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * target[:, 1:]).sum(-1).cpu()


@torch.no_grad()
def sequence_logprobs_at(model, tokenizer, prompts: Sequence, completions: Sequence, alphas: Sequence,
                         batch_size: int = 8, max_length: int = 256) -> torch.Tensor:
    """[len(alphas), N] sums of log p(completion | prompt) at each alpha.

    In logits mode with one adapter the logits at any alpha are the lerp of the logits at 0 and 1, so two
    forward passes serve every alpha (exact up to rounding); other modes run one pass per alpha.
    """
    device = next(model.parameters()).device
    layer = (
        model.base_model.clm_layer()
        if hasattr(model, "base_model") and hasattr(model.base_model, "clm_layer")
        else None
    )
    lerp = (
        layer is not None
        and layer.interpolation == "logits"
        and len(layer.active_adapters) == 1
        and all(isinstance(a, (int, float)) for a in alphas)
        and len(alphas) > 2
    )
    out = [[] for _ in alphas]
    for ids, mask, target in completion_batches(tokenizer, prompts, completions, batch_size, max_length, device):
        if lerp:
            z0 = model(input_ids=ids, attention_mask=mask, clm_alpha=0.0).logits.float()
            z1 = model(input_ids=ids, attention_mask=mask, clm_alpha=1.0).logits.float()
            for j, a in enumerate(alphas):
                out[j].append(_completion_logprob(torch.lerp(z0, z1, float(a)), ids, target))
            continue
        for j, a in enumerate(alphas):
            kwargs = {} if a is None else {"clm_alpha": a}
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
            out[j].append(_completion_logprob(logits, ids, target))
    return torch.stack([torch.cat(o) for o in out])


@torch.no_grad()
def answer_nll(model, tokenizer, prompts: Sequence, answers: Sequence[str], batch_size: int = 8,
               max_length: int = 1024) -> list[float]:
    """Mean per-token negative log-likelihood of each answer, given its prompt (chat-formatted as when it was
    generated), under the base model: a CLM model at alpha 0 (`clm_alpha=0.0`: in logits mode only the base path
    runs), another PEFT model with its adapters disabled, a plain model as it is (so call it with any steering
    hook removed). Batched; an empty answer gives nan.

    High values mean text the base model finds unlikely: the fluency cost of pushing a knob.

    Example:
        ```py
        >>> answer_nll(model, tokenizer, ["Explain tides."], ["Tides are caused by the moon."])
        [2.31]
        ```
    """
    from contextlib import nullcontext

    from .generation import chat_text

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers.")
    device = next(model.parameters()).device
    clm = hasattr(model, "base_model") and hasattr(model.base_model, "clm_layer")
    kwargs = {"clm_alpha": 0.0} if clm else {}
    context = model.disable_adapter() if not clm and hasattr(model, "disable_adapter") else nullcontext()
    texts = [chat_text(tokenizer, p) for p in prompts]
    out: list[float] = []
    with context:
        batches = completion_batches(tokenizer, texts, list(answers), batch_size, max_length, device, eos=False)
        for ids, mask, target in batches:
            logp = _completion_logprob(model(input_ids=ids, attention_mask=mask, **kwargs).logits, ids, target)
            counts = target[:, 1:].sum(-1).cpu()
            out += [float(-lp / n) if n else float("nan") for lp, n in zip(logp, counts)]
    return out


def preference_logprobs(
    model, tokenizer, rows: Sequence[dict], alpha=1.0, batch_size: int = 8, max_length: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(chosen|prompt), log p(rejected|prompt)) per pair at `alpha`."""
    c, r = preference_logprobs_at(model, tokenizer, rows, [alpha], batch_size, max_length)
    return c[0], r[0]


def preference_logprobs_at(
    model, tokenizer, rows: Sequence[dict], alphas: Sequence, batch_size: int = 8, max_length: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """([len(alphas), N] chosen, [len(alphas), N] rejected) log-probs per pair at each alpha."""
    prompts = [r["prompt"] for r in rows]
    kw = {"batch_size": batch_size, "max_length": max_length}
    return (
        sequence_logprobs_at(model, tokenizer, prompts, [r["chosen"] for r in rows], alphas, **kw),
        sequence_logprobs_at(model, tokenizer, prompts, [r["rejected"] for r in rows], alphas, **kw),
    )


def metrics_from_logprobs(policy: tuple, reference: tuple, beta: float = 0.1) -> dict:
    """DPO loss, reward accuracy and margins from policy and reference log-probs of (chosen, rejected)."""
    reward_c = beta * (policy[0] - reference[0])
    reward_r = beta * (policy[1] - reference[1])
    margin = reward_c - reward_r
    return {
        "dpo_loss": float(-F.logsigmoid(margin).mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "mean_margin": float(margin.mean()),
        "mean_reward_chosen": float(reward_c.mean()),
        "mean_reward_rejected": float(reward_r.mean()),
        "n": int(margin.numel()),
    }


def preference_metrics(
    model,
    tokenizer,
    rows: Sequence[dict],
    beta: float = 0.1,
    alpha: float = 1.0,
    batch_size: int = 8,
    max_length: int = 256,
    reference: Optional[tuple] = None,
) -> dict:
    """DPO loss, reward accuracy and mean reward margin of a CLM model at `alpha` against alpha 0.

    A row with an `"alpha"` field (a pair for one end of the knob, `tools.alpha_pairs`) is scored at
    `alpha * row["alpha"]`, so at alpha 1 every pair is scored where it was trained. `reference` (log-probs at
    alpha 0 from `preference_logprobs`) saves recomputing them across alphas.

    Example:
        ```py
        >>> preference_metrics(model, tokenizer, heldout_rows)["reward_accuracy"]
        ```
    """
    kw = {"batch_size": batch_size, "max_length": max_length}
    if reference is None:
        reference = preference_logprobs(model, tokenizer, rows, alpha=0.0, **kw)
    if alpha == 0:
        return metrics_from_logprobs(reference, reference, beta)
    ends = [float(r.get("alpha", 1.0)) for r in rows]
    policy = (torch.empty_like(reference[0]), torch.empty_like(reference[1]))
    for end in sorted(set(ends)):  # one pass per distinct end
        idx = [i for i, e in enumerate(ends) if e == end]
        chosen, rejected = preference_logprobs(model, tokenizer, [rows[i] for i in idx], alpha=alpha * end, **kw)
        policy[0][idx], policy[1][idx] = chosen, rejected
    return metrics_from_logprobs(policy, reference, beta)


def preference_metrics_baseline(
    model,
    tokenizer,
    rows: Sequence[dict],
    beta: float = 0.1,
    reference_model=None,
    batch_size: int = 8,
    max_length: int = 256,
) -> dict:
    """Preference metrics of a non-CLM policy (LoRA, full fine-tuning) against its reference: `reference_model`,
    or for a PEFT model the same model with its adapters disabled."""
    kw = {"batch_size": batch_size, "max_length": max_length}
    policy = preference_logprobs(model, tokenizer, rows, alpha=None, **kw)
    if reference_model is not None:
        reference = preference_logprobs(reference_model, tokenizer, rows, alpha=None, **kw)
    else:
        with model.disable_adapter():
            reference = preference_logprobs(model, tokenizer, rows, alpha=None, **kw)
    return metrics_from_logprobs(policy, reference, beta)
