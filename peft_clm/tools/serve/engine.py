"""The model side of the server: loading the CLM model, encoding prompts, and one `generate()` call for a batch of
rows that each carry their own alpha, sampling settings, token budget and stop strings.

Everything that differs between rows is applied per row inside one `generate()` call:

- alpha: the per-row `clm_alpha` of the tuner (a list per adapter; weights mode takes one number, so the batcher
  only puts rows with equal alpha together there);
- sampling: `generate()` runs greedy, and `RowSampler` (a logits processor) draws each sampled row's token with its
  own temperature, top-p and `torch.Generator`, leaving only that token finite. A row's draw therefore depends on
  its own logits and seed alone, not on its neighbours, and greedy and sampled rows share the call;
- the end of each row: `RowTracker`, a stopping criterion returning one boolean per row, decodes each new token,
  releases text, and ends the row at EOS, a stop string, its max_tokens or when its client has gone. It is a
  stopping criterion rather than a `BaseStreamer` because `generate()` calls the criteria with the new token
  *before* it calls the streamer: deciding in a streamer would cost every finished row one more step.
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .detok import IncrementalDecoder
from .errors import ApiError
from .knobs import Knobs, RowAlpha


log = logging.getLogger("peft_clm.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class RowSpec:
    """One sequence to generate: its prompt, its alpha for every adapter, and how it is sampled and ended."""

    prompt_ids: list[int]
    alpha: RowAlpha
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class RowSink(Protocol):
    """Where one row's output goes (the batcher routes it to the waiting request)."""

    def text(self, delta: str) -> None: ...

    def finish(self, reason: str, completion_tokens: int, text: str) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass
class _RowState:
    spec: RowSpec
    sink: RowSink
    decoder: IncrementalDecoder
    tokens: int = 0
    done: bool = False
    generator: Optional[torch.Generator] = field(default=None, repr=False)

    def end(self, reason: str) -> None:
        if self.done:
            return
        rest = self.decoder.finish() if reason != "cancelled" else ""
        if rest:
            self.sink.text(rest)
        self.done = True
        self.sink.finish(reason, self.tokens, self.decoder.text)


class RowTracker(StoppingCriteria):
    """Per-row stopping criterion that also detokenizes and dispatches each row's new token (see the module doc)."""

    def __init__(self, rows: list[_RowState], eos_ids: set[int]) -> None:
        self.rows = rows
        self.eos_ids = eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, new):
            if row.done:
                continue
            if row.sink.cancelled():
                row.end("cancelled")
                continue
            row.tokens += 1  # counted like OpenAI's usage: every generated token, a final EOS included
            if token in self.eos_ids and not row.spec.ignore_eos:
                row.end("stop")
                continue
            delta = row.decoder.add(token)
            if delta:
                row.sink.text(delta)
            if row.decoder.stopped:
                row.end("stop")
            elif row.tokens >= row.spec.max_tokens:
                row.end("length")
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class RowSampler(LogitsProcessor):
    """Sample each sampled row with its own temperature, top-p and generator; greedy rows are left alone.

    The chosen token is kept and every other token set to -inf, so `generate()`'s greedy argmax picks it.
    """

    def __init__(self, rows: list[_RowState]) -> None:
        self.rows = rows
        self.sampled = [i for i, r in enumerate(rows) if r.spec.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        live = [i for i in self.sampled if not self.rows[i].done]
        if not live:
            return scores
        idx = torch.tensor(live, device=scores.device)
        temps = torch.tensor([self.rows[i].spec.temperature for i in live], device=scores.device)
        logits = scores[idx].float() / temps[:, None]
        probs = torch.softmax(logits, dim=-1)
        top_p = torch.tensor([self.rows[i].spec.top_p for i in live], device=scores.device)
        if bool((top_p < 1.0).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # drop a token when the ones above it already reach top_p; the most likely token always stays
            drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        out = scores.clone()
        for k, i in enumerate(live):
            token = torch.multinomial(probs[k], 1, generator=self.rows[i].generator)
            out[i] = float("-inf")
            out[i, token] = 0.0
        return out


class Engine:
    """A loaded CLM model and tokenizer, ready to answer batches of rows.

    Example:
        ```py
        >>> engine = Engine.load("smollm2", {"concise": "runs/concise"}, interpolation="logits")
        >>> ids = engine.encode_prompt("The capital of France is")
        >>> engine.run_batch([RowSpec(ids, {"concise": 0.5}, max_tokens=8)], [sink])
        ```
    """

    def __init__(self, peft_model, tokenizer, knobs: Knobs, context_length: Optional[int] = None,
                 router: Any = None) -> None:
        self.model = peft_model
        self.router = router  # a `PromptRouter` when knobs has a policy: routes requests that send no alpha
        if (router is None) != (knobs.policy is None):
            raise ValueError("a router and a policy go together: give both (--router DIR --policy FILE) or neither.")
        if router is not None:
            unknown = sorted(set(knobs.policy) - set(router.labels))
            if unknown:
                raise ValueError(f"the policy names route(s) {unknown} that the router never gives; its labels are "
                                 f"{router.labels}.")
        # routing runs off the event loop on one thread (`serve.routing`), with its own tokenizer (see
        # _decode_tokenizer)
        self._route_tokenizer = copy.deepcopy(tokenizer) if router is not None else None
        self.tokenizer = tokenizer  # encodes prompts on the event loop thread
        # The worker decodes with its own copy: a fast tokenizer is not safe to share between threads.
        self._decode_tokenizer = copy.deepcopy(tokenizer)
        self.knobs = knobs
        self.mode = peft_model.base_model.interpolation
        text_config = peft_model.config.get_text_config() if hasattr(peft_model.config, "get_text_config") else (
            peft_model.config)
        self.context_length = int(context_length or getattr(text_config, "max_position_embeddings", 0) or
                                  getattr(text_config, "n_positions", 0) or 2048)
        eos = peft_model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self.device = next(peft_model.parameters()).device

    @classmethod
    def load(cls, model: str, adapters: dict[str, str], interpolation: Optional[str] = None, alpha: float = 1.0,
             dtype: str = "float32", device: Optional[str] = None, base_id: Optional[str] = None,
             context_length: Optional[int] = None, router: Optional[str] = None,
             policy: Optional[str] = None) -> Engine:
        """Load MODEL (what `peft-clm train` accepts) and the named adapter directories, all active; with `router`
        (a `PromptRouter` directory) and `policy` (a JSON file {route: {adapter: alpha}}), requests to the base
        model that send no alpha are routed."""
        from peft import PeftModel

        import peft_clm  # noqa: F401  registers CLM with PEFT

        from ..loading import load_model

        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}.")
        if (router is None) != (policy is None):
            raise ValueError("--router and --policy go together: give both or neither.")
        routing, policy_table = None, None
        if router is not None:
            from ..router import PromptRouter

            routing = PromptRouter.load(router)
            try:
                policy_table = json.loads(Path(policy).read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"--policy {policy}: not a readable JSON file ({e}).") from None
        for name, path in adapters.items():
            if not (Path(path) / "adapter_config.json").is_file():
                raise FileNotFoundError(f"adapter {name!r}: no adapter_config.json in {path}.")
        base, tokenizer = load_model(model, dtype=DTYPES[dtype])
        names = list(adapters)
        peft_model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(adapters[name], adapter_name=name)
        peft_model.base_model.set_adapter(names)
        if interpolation:
            peft_model.set_interpolation(interpolation)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        peft_model = peft_model.to(device).eval()
        base_id = base_id or (model if model == "smollm2" else Path(model).name or model)
        if base_id in names:
            raise ValueError(f"the base model's name {base_id!r} is also an adapter's name; rename the adapter "
                             "(--adapter NAME=DIR) or the model (--served-model-name).")
        if routing is not None and peft_model.base_model.interpolation == "weights":
            raise ValueError("--router gives each prompt its own alphas, which weights mode (one mix of the layer's "
                             "parameters per batch) cannot apply; serve with --interpolation logits or hidden.")
        knobs = Knobs(names, default=alpha, mode=peft_model.base_model.interpolation, base_id=base_id,
                      policy=policy_table)
        if routing is not None:
            routing.check_model(peft_model)
        return cls(peft_model, tokenizer, knobs, context_length=context_length, router=routing)

    def routable_texts(self, prompts: Sequence[Any]) -> list[str]:
        """The text each prompt (text, token ids or chat messages) is routed on; `UnroutablePrompt` for one that has
        none. On the event loop thread, with the loop's tokenizer."""
        from ..router import UnroutablePrompt, prompt_text

        texts = [self.tokenizer.decode(p) if isinstance(p, list) and p and isinstance(p[0], int) else prompt_text(p)
                 for p in prompts]
        if any(not self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts):
            raise UnroutablePrompt("a prompt with no tokens cannot be routed.")
        return texts

    def route_texts(self, texts: Sequence[str]) -> list[str]:
        """Each text's route, on the base model, in one pass; runs on the routing thread (`serve.routing`)."""
        return self.router.route(self.model, self._route_tokenizer, list(texts))

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: Any) -> list[int]:
        """A completion prompt: text (tokenized with the model's special tokens) or a list of token ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        vocab = len(self.tokenizer)
        bad = [t for t in prompt if not 0 <= t < max(vocab, self.model.config.get_text_config().vocab_size)]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).",
                           param="prompt")
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages through the tokenizer's chat template, with the assistant turn opened."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template, so /v1/chat/completions cannot format "
                           "messages; send raw text to /v1/completions.", param="messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_length(self, prompt_ids: list[int], max_tokens: Optional[int], limit: int, param: str,
                     default: Optional[int] = None) -> int:
        """The row's token budget: `max_tokens`; when none was sent, `default` or else `limit`, cut to what the
        context leaves."""
        n = len(prompt_ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty; send at least one token of text.", param=param)
        if n >= self.context_length:
            raise ApiError(400, f"the prompt is {n} tokens long but this model's context is {self.context_length} "
                           "tokens (prompt + completion); shorten the prompt.", param=param,
                           code="context_length_exceeded")
        if max_tokens is None:
            return min(default or limit, self.context_length - n)
        if n + max_tokens > self.context_length:
            raise ApiError(400, f"this model's context is {self.context_length} tokens; the prompt takes {n} and "
                           f"max_tokens asks for {max_tokens}. Lower max_tokens to at most {self.context_length - n}.",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    # ------------------------------------------------------------------ generation
    def group_key(self, spec: RowSpec) -> Optional[tuple]:
        """Rows with different keys cannot share one `generate()` call: only the alpha in weights mode."""
        return tuple(sorted(spec.alpha.items())) if self.mode == "weights" else None

    def run_batch(self, specs: Sequence[RowSpec], sinks: Sequence[RowSink]) -> int:
        """Generate every row in one `generate()` call; output goes to each row's sink. Returns the decode steps."""
        rows = [_RowState(s, k, IncrementalDecoder(self._decode_tokenizer, s.stop)) for s, k in zip(specs, sinks)]
        for row in rows:
            if row.spec.temperature > 0:
                seed = row.spec.seed if row.spec.seed is not None else secrets.randbits(63)
                row.generator = torch.Generator(device=self.device).manual_seed(seed)
        width = max(len(s.prompt_ids) for s in specs)
        ids = torch.full((len(specs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(specs), width), dtype=torch.long)
        for i, s in enumerate(specs):  # left padding: every row's next token sits in the last column
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
        if self.mode == "weights":
            clm_alpha: Any = dict(specs[0].alpha)
        else:
            clm_alpha = {name: [s.alpha[name] for s in specs] for name in self.knobs.adapters}
        tracker = RowTracker(rows, self.eos_ids)
        processors = LogitsProcessorList([RowSampler(rows)] if any(s.temperature > 0 for s in specs) else [])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), clm_alpha=clm_alpha,
                max_new_tokens=max(s.max_tokens for s in specs), do_sample=False, num_beams=1,
                # EOS is handled per row by the tracker (a row may ask to ignore it); generate()'s own EOS
                # handling would end such a row.
                eos_token_id=None, pad_token_id=self.pad_id,
                logits_processor=processors, stopping_criteria=StoppingCriteriaList([tracker]),
            )
        for row in rows:  # every row ends by its own budget; this only guards against an early exit of generate()
            row.end("length")
        return out.shape[1] - width
