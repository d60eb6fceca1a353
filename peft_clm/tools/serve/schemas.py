"""Request bodies of the OpenAI-compatible endpoints, and their checks.

Fields the server does not implement are accepted only at their no-op values (e.g. `presence_penalty: 0`), and
unknown fields are refused, so that a typo such as `"alhpa"` is an error instead of silently the default alpha.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import ApiError


StrictInt = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # an int or a float, never a string or a bool

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_ROWS = 64  # sequences per request (prompts x n): a request's rows always share one batch


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    n: StrictInt = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = None
    user: Optional[str] = None
    # Accepted at their no-op values only.
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Any]] = None
    # peft-clm's own fields (sent with the openai client's `extra_body`).
    alpha: Any = None
    ignore_eos: bool = False

    def check(self, max_tokens_limit: int) -> None:
        """Range checks, each naming the accepted values (pydantic checked the types)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported by this server; send 0 or leave it out.", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server; leave it out.", param="logit_bias")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= max_tokens_limit:
            raise ApiError(400, f"max_tokens must be between 1 and {max_tokens_limit} (this server's "
                           f"--max-new-tokens-limit), got {self.max_tokens}.", param="max_tokens")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ApiError(400, f"temperature must be between 0 and 2 (0 = greedy), got {self.temperature}.",
                           param="temperature")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ApiError(400, f"top_p must be in (0, 1], got {self.top_p}.", param="top_p")
        if not 1 <= self.n <= MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}, got {self.n}.", param="n")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ApiError(400, f"seed must be a 64-bit integer, got {self.seed}.", param="seed")
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ApiError(400, f"stop takes a string or a list of up to {MAX_STOP} non-empty strings.", param="stop")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: a text prompt, a list of prompts, or token ids."""

    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    echo: bool = False
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[str] = None

    def check(self, max_tokens_limit: int) -> None:
        super().check(max_tokens_limit)
        if self.echo:
            raise ApiError(400, "echo is not supported by this server; leave it out.", param="echo")
        if self.logprobs is not None:
            raise ApiError(400, "logprobs are not supported by this server; leave them out.", param="logprobs")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported by this server; use n.", param="best_of")
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server; leave it out.", param="suffix")

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            out: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out:
            raise ApiError(400, "prompt is empty; send a string, a list of strings, or token ids.", param="prompt")
        if len(out) * self.n > MAX_ROWS:
            raise ApiError(400, f"{len(out)} prompts x n={self.n} is more than {MAX_ROWS} sequences per request; "
                           "split the request.", param="prompt")
        return out


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def as_template_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # Many chat templates know no "developer" role; it is the newer name of "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[Message]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[StrictInt] = None

    def check(self, max_tokens_limit: int) -> None:
        if self.max_completion_tokens is not None:  # the newer name of max_tokens
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ApiError(400, "max_tokens and max_completion_tokens differ; send one of them.",
                               param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        super().check(max_tokens_limit)
        if self.logprobs or self.top_logprobs:
            raise ApiError(400, "logprobs are not supported by this server; leave them out.", param="logprobs")
        if not self.messages:
            raise ApiError(400, "messages is empty; send at least one message.", param="messages")
