"""Answering prompts with a (CLM) model: chat formatting, the context-length check, and greedy answers at many
alphas in shared batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from tqdm.auto import tqdm


def chat_text(tokenizer, prompt: Any) -> str:
    """The model's input text for a prompt (a string, or a list of chat messages), with the generation prompt."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return messages[-1]["content"]


def context_length(model) -> Optional[int]:
    """The number of positions the model takes (`max_position_embeddings` or `n_positions`), if it says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_lengths(model, tokenizer, texts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Token ids of each text; raises (refuses, never truncates) when a prompt and its answer budget exceed the
    model's context, naming the prompt and the limits."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    limit = context_length(model)
    if limit is not None:
        for i, seq in enumerate(ids):
            if len(seq) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i + 1} has {len(seq)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                    f"model's context of {limit} tokens. Shorten it (prompts are refused, not truncated)."
                )
    return ids


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence, alphas: Sequence, max_new_tokens: int = 64,
                     batch_size: int = 16, per_sequence: Optional[bool] = None, progress: bool = True) -> dict:
    """Greedy answers to every prompt at every alpha: {index of the alpha: [answer, ...]}.

    In hidden and logits modes the (prompt, alpha) pairs share batches, each row with its own alpha. An alpha is a
    number, or a dict {adapter: number} for several active adapters; a plain (non-CLM) model takes `alphas=[None]`.
    Prompts longer than the model's context (with the answer budget) are refused before anything runs.

    Example:
        ```py
        >>> answers = generate_answers(model, tokenizer, ["Explain tides."], [0.0, 1.0], max_new_tokens=32)
        >>> answers[1][0]   # the answer at alpha 1.0
        ```
    """
    tokenizer.padding_side = "left"
    clm = hasattr(model.base_model, "clm_layer")
    if not clm and any(a is not None for a in alphas):
        raise ValueError("alphas need a CLM model; a plain model takes alphas=[None].")
    if per_sequence is None:  # per-row alphas need hidden or logits mode; a plain model has no alpha at all
        per_sequence = clm and model.base_model.interpolation != "weights"
    texts = [chat_text(tokenizer, p) for p in prompts]
    check_prompt_lengths(model, tokenizer, texts, max_new_tokens)
    jobs = [(j, i) for j in range(len(alphas)) for i in range(len(texts))]
    answers = {j: [None] * len(texts) for j in range(len(alphas))}
    if per_sequence:
        groups = [jobs[s : s + batch_size] for s in range(0, len(jobs), batch_size)]
    else:
        groups = [[(j, i) for i in range(s, min(s + batch_size, len(texts)))] for j in range(len(alphas))
                  for s in range(0, len(texts), batch_size)]
    for group in tqdm(groups, desc="generating", unit="batch", disable=not progress or len(groups) < 2):
        batch = tokenizer([texts[i] for _, i in group], return_tensors="pt", padding=True).to(model.device)
        if not clm:
            kwargs = {}
        elif not per_sequence:
            kwargs = {"clm_alpha": alphas[group[0][0]]}
        elif isinstance(alphas[group[0][0]], dict):
            kwargs = {"clm_alpha": {k: [alphas[j][k] for j, _ in group] for k in alphas[group[0][0]]}}
        else:
            kwargs = {"clm_alpha": [alphas[j] for j, _ in group]}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        for (j, i), seq in zip(group, out):
            answers[j][i] = tokenizer.decode(seq[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return answers
