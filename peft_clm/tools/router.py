"""Routing prompts to knob settings: each request gets the alphas of what it is about.

One global setting of several knobs moves every prompt, and knobs for different topics interfere (the domains
experiment: a legal knob pulls medical answers off their level). A router reads each prompt's topic and gives each
row its own alphas, which logits and hidden modes apply per sequence (`clm_alpha={adapter: [one per row]}`, as the
server does per request), so a medical question gets the medical setting and nothing else.

- `PromptRouter.fit(model, tokenizer, prompts, labels)`: a multinomial logistic regression on the base model's own
  hidden states: per prompt, the mean over its tokens (the first left out: it is the attention sink and carries no
  topic) at a few layers, standardised. The features come with every CLM adapter at alpha 0 for that call (the
  base model, exactly), so routing a prompt never depends on the alphas it is about to get, and it is safe beside
  generations on other threads (a server's).
- `route` (labels), `probabilities`; `save(directory)` / `PromptRouter.load(directory)`: `router.safetensors` (the
  weights and the standardisation) and `router_config.json` (labels, layers, the model it was fitted on), written
  to a temporary directory and renamed.
- `policy_alphas(routes, policy)`: the per-row `clm_alpha` dict from a policy {label: {adapter: alpha}}; a label
  the policy leaves out gets every knob at 0 (the base model).
- `routing_report` (accuracy and confusion), for `peft-clm router fit` (which reads its prompts with
  `tools.data.read_labelled`).

Example:
    ```py
    >>> router = PromptRouter.fit(model, tokenizer, train_prompts, train_domains)
    >>> routes = router.route(model, tokenizer, prompts)                 # e.g. ["medical", "general"]
    >>> alpha = policy_alphas(routes, {"medical": {"medical_avoid": 1.0}, "financial": {"financial_expert": 1.5}})
    >>> model.generate(**batch, clm_alpha=alpha)                          # each row at its own route's alphas
    ```
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..alpha import check_alpha


Prompt = Union[str, Sequence[Mapping[str, str]]]
CONFIG_NAME, WEIGHTS_NAME = "router_config.json", "router.safetensors"


class UnroutablePrompt(ValueError):
    """A prompt the router cannot read (no text, no user message): the request's fault, not the server's."""


def prompt_text(prompt: Prompt) -> str:
    """The text a prompt is routed on: a string as it is, a chat (list of messages) by its last user message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        users = [m.get("content") for m in prompt if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise UnroutablePrompt(f"a prompt is a string or a list of chat messages with a user message; got "
                           f"{prompt!r:.120}.")


def default_layers(num_hidden_layers: int) -> list[int]:
    """Five evenly spaced hidden states, the last included (index 0 is the embeddings; fewer where the model has
    fewer layers): topic shows at every depth, and several layers route more reliably than any one (measured on
    SmolLM2, README)."""
    return sorted({max(1, round(num_hidden_layers * (k + 1) / 5)) for k in range(5)})


def _base_call(model) -> dict:
    """Forward keywords that make this call the base model's: every CLM adapter at alpha 0 (the identity, exactly),
    set for this call only (`peft_clm.alpha.CallState`), so that routing on one thread never changes what a
    generation on another sees, as switching the adapters off would."""
    base = getattr(model, "base_model", None)
    return {"clm_alpha": 0.0} if base is not None and hasattr(base, "clm_layer") else {}


@torch.no_grad()
def prompt_features(
    model, tokenizer, prompts: Sequence[Prompt], layers: Sequence[int], batch_size: int = 16, max_length: int = 512
) -> torch.Tensor:
    """[N, len(layers) * hidden] float32: per prompt, the mean hidden state over its tokens after the first, at each
    of `layers` (indices into `output_hidden_states`, 0 the embeddings), every CLM adapter at alpha 0 for the call."""
    if not prompts:
        raise ValueError("no prompts to route; give at least one.")
    texts = [prompt_text(p) for p in prompts]
    n_states = model.config.num_hidden_layers + 1
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_states]
    if not layers or bad:
        raise ValueError(f"layers must be hidden-state indices 0..{n_states - 1} (0: the embeddings); got "
                         f"{list(layers)}.")
    ids = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    empty = [texts[i] for i, x in enumerate(ids) if not x]
    if empty:
        raise UnroutablePrompt(f"prompts with no tokens cannot be routed: {empty[:3]!r}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if model.training:
        raise ValueError("route with the model in eval mode (model.eval()): dropout would make routing random.")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(map(len, chunk))
        batch = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, x in enumerate(chunk):
            batch[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        pool = mask.clone().float()
        pool[:, 0] = (mask.sum(1) == 1).float()  # the first token only where it is the whole prompt
        hidden = model(input_ids=batch.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                       use_cache=False, **_base_call(model)).hidden_states
        pool = pool.to(device)[..., None]
        out.append(torch.cat([(hidden[i].float() * pool).sum(1) / pool.sum(1) for i in layers], -1).cpu())
    return torch.cat(out)


class PromptRouter:
    """Labels prompts (domains, topics) from the base model's hidden states; see the module docstring.

    Holds `labels`, `layers`, the standardisation (`mean`, `scale`) and the regression (`weight` [F, C], `bias`
    [C]); `model_info` records the model it was fitted on, checked when it routes.
    """

    def __init__(self, labels: Sequence[str], layers: Sequence[int], mean: torch.Tensor, scale: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor, model_info: Optional[Mapping[str, Any]] = None):
        self.labels, self.layers = list(labels), [int(i) for i in layers]
        self.mean, self.scale, self.weight, self.bias = mean, scale, weight, bias
        self.model_info = dict(model_info or {})
        self._checked: weakref.WeakSet = weakref.WeakSet()  # models `check_model` has passed
        features, classes = weight.shape
        if (classes != len(self.labels) or bias.shape != (classes,) or mean.shape != (features,)
                or scale.shape != (features,)):
            raise ValueError(f"router tensors do not fit together: weight {tuple(weight.shape)}, bias "
                             f"{tuple(bias.shape)}, mean {tuple(mean.shape)}, scale {tuple(scale.shape)} for "
                             f"{len(self.labels)} labels.")

    @classmethod
    def fit(cls, model, tokenizer, prompts: Sequence[Prompt], labels: Sequence[str],
            layers: Optional[Sequence[int]] = None, weight_decay: float = 1e-2,
            batch_size: int = 16) -> "PromptRouter":
        """Fit on labelled prompts (at least two labels, each with at least two prompts)."""
        if len(prompts) != len(labels):
            raise ValueError(f"give one label per prompt; got {len(prompts)} prompts and {len(labels)} labels.")
        names = sorted(set(labels))
        few = [n for n in names if list(labels).count(n) < 2]
        if len(names) < 2 or few:
            raise ValueError(f"a router needs at least two labels with at least two prompts each; got "
                             f"{ {n: list(labels).count(n) for n in names} }.")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be a number >= 0; got {weight_decay!r}.")
        layers = default_layers(model.config.num_hidden_layers) if layers is None else list(layers)
        x = prompt_features(model, tokenizer, prompts, layers, batch_size)
        mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
        y = torch.tensor([names.index(lb) for lb in labels])
        weight, bias = _logistic_regression((x - mean) / scale, y, len(names), weight_decay)
        return cls(names, layers, mean, scale, weight, bias, _model_info(model))

    def probabilities(self, model, tokenizer, prompts: Sequence[Prompt], batch_size: int = 16) -> torch.Tensor:
        """[N, len(labels)]: each prompt's probability of each label (`check_model` the first time a model is seen)."""
        if model not in self._checked:  # the embedding norm reads every embedding: once, not on every pass
            self.check_model(model)
            self._checked.add(model)
        x = prompt_features(model, tokenizer, prompts, self.layers, batch_size)
        return torch.softmax(((x - self.mean) / self.scale) @ self.weight + self.bias, -1)

    def route(self, model, tokenizer, prompts: Sequence[Prompt], batch_size: int = 16) -> list[str]:
        """Each prompt's most probable label."""
        return [self.labels[i] for i in self.probabilities(model, tokenizer, prompts, batch_size).argmax(-1)]

    def save(self, directory: Union[str, Path]) -> None:
        """Write `router.safetensors` and `router_config.json` to `directory` (whole or not at all)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp", dir=directory.parent))
        try:
            tensors = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
            config = {"labels": self.labels, "layers": self.layers, "model": self.model_info}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            check_router_dir(directory)
            if directory.exists():
                shutil.rmtree(directory)
            tmp.replace(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "PromptRouter":
        """Read a router written by `save`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a saved router: {missing} missing (PromptRouter.save writes "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}).")
        config = json.loads((directory / CONFIG_NAME).read_text())
        t = load_file(str(directory / WEIGHTS_NAME))
        missing = [k for k in ("labels", "layers", "model") if k not in config] + [
            k for k in ("mean", "scale", "weight", "bias") if k not in t]
        if missing:
            raise ValueError(f"{directory} is a damaged router: {missing} missing; fit and save it again.")
        return cls(config["labels"], config["layers"], t["mean"], t["scale"], t["weight"], t["bias"],
                   config["model"])

    def check_model(self, model) -> None:
        """Refuse a model other than the one this router was fitted on (its type and sizes; the name may differ)."""
        have = _model_info(model)
        differ = {k: (v, have.get(k)) for k, v in self.model_info.items()
                  if k not in ("name", "embedding_norm") and have.get(k) != v}
        fitted, given = self.model_info.get("embedding_norm"), have["embedding_norm"]
        if fitted is not None and abs(given - fitted) > 1e-3 * abs(fitted):  # other weights; dtypes differ less
            differ["embedding_norm"] = (fitted, given)
        if differ:
            raise ValueError(f"this router was fitted on another model ({self.model_info.get('name')}); "
                             f"differs in {', '.join(f'{k}: fitted {a}, given {b}' for k, (a, b) in differ.items())}.")


def routing_report(routes: Sequence[str], labels: Sequence[str]) -> dict:
    """How routes match true labels: {"accuracy", "confusion": {true: {route: count}}}.

    >>> routing_report(["a", "b", "b"], ["a", "b", "a"])["accuracy"]
    0.6666666666666666
    """
    names = sorted(set(labels) | set(routes))
    confusion = {t: {r: sum(1 for x, y in zip(labels, routes) if x == t and y == r) for r in names} for t in names}
    return {"accuracy": sum(x == y for x, y in zip(labels, routes)) / len(labels), "confusion": confusion}


def check_router_dir(directory: Union[str, Path]) -> None:
    """A router is saved to a new directory, or over a saved router (replaced whole), never over anything else."""
    directory = Path(directory)
    if directory.exists() and (
        not directory.is_dir() or {p.name for p in directory.iterdir()} - {CONFIG_NAME, WEIGHTS_NAME}
    ):
        raise FileExistsError(f"{directory} exists and is not a saved router; give a new directory.")


def _model_info(model) -> dict:
    """What a router's features depend on: the model's type and sizes, and the norm of its input embeddings (another
    checkpoint of the same shape has another norm)."""
    config = model.config
    return {"name": getattr(config, "name_or_path", None), "model_type": getattr(config, "model_type", None),
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "embedding_norm": float(model.get_input_embeddings().weight.detach().float().norm())}


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float):
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS (deterministic: zeros to start)."""
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return weight.detach(), bias.detach()


def check_policy(policy: Any, adapters: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    """A policy {label: {adapter: alpha}}, checked (every alpha by `peft_clm.alpha.check_alpha`; with `adapters`,
    every adapter among them) and returned with float alphas; raises one ValueError naming what was wrong."""
    if not isinstance(policy, Mapping) or not all(
        isinstance(label, str) and isinstance(row, Mapping) and all(isinstance(a, str) for a in row)
        for label, row in policy.items()
    ):
        raise ValueError(f'a policy is {{label: {{adapter: alpha}}}}, e.g. {{"medical": {{"medical_avoid": 1.0}}}}; '
                         f"got {policy!r:.200}.")
    named = sorted({a for row in policy.values() for a in row})
    if adapters is not None and set(named) - set(adapters):
        raise ValueError(f"the policy names adapter(s) {sorted(set(named) - set(adapters))}, which are not among "
                         f"{list(adapters)}.")
    return {label: {a: check_alpha(v, what=f"policy[{label!r}][{a!r}]", rows=False) for a, v in row.items()}
            for label, row in policy.items()}


def policy_alphas(routes: Sequence[str], policy: Mapping[str, Mapping[str, float]],
                  adapters: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """The `clm_alpha` of a batch: {adapter: one alpha per row}, each row at its route's alphas in `policy`, every
    adapter the policy (or `adapters`) names at 0 where the row's route does not set it.

    >>> policy_alphas(["medical", "general"], {"medical": {"med": 1.0}})
    {'med': tensor([1., 0.])}
    """
    policy = check_policy(policy, adapters)
    names = list(dict.fromkeys([*(adapters or []), *(a for row in policy.values() for a in row)]))
    rows = [route_alphas(route, policy, names) for route in routes]
    return {n: torch.tensor([row[n] for row in rows], dtype=torch.float32) for n in names}


def route_alphas(route: str, policy: Mapping[str, Mapping[str, float]], adapters: Sequence[str]) -> dict[str, float]:
    """One route's {adapter: alpha} under a checked policy: the policy's alpha where it sets one, else 0 (a route
    the policy leaves out is the base model).

    >>> route_alphas("general", {"medical": {"med": 1.0}}, ["med"])
    {'med': 0.0}
    """
    return {n: float(policy.get(route, {}).get(n, 0.0)) for n in adapters}
