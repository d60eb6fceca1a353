"""`peft-clm serve`: the real server in a subprocess on a free localhost port, spoken to with the `openai` client.

A tiny random Llama with two CLM adapters ("concise", "formal") and a real tokenizer (saved files, with a chat
template) is written to a temp dir; four servers start at once (logits, hidden and weights modes, and a small one
with a queue of 2 for the queue, disconnect and shutdown tests) and are shared by the tests.

Exactness. "A request's greedy output equals `generate(..., clm_alpha=its alpha)` run alone" is checked token for
token against solo `generate()` calls in this process. Batching with left padding changes float rounding a little
(other GEMM shapes, other padding), and a tiny random model's logits are nearly flat, so in float32 a near-tie
could flip a token between the solo and the batched run (float32 happened to pass too when tried, but nothing
guarantees it). The tiny model and the server therefore run in float64 (`--dtype float64`): rounding differences
are then around 1e-16, far below any logit gap, and the assertion stays exact equality, not a tolerance.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import perturb, save_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_clm import ClmConfig


ADAPTERS = ("concise", "formal")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}answer :{% endif %}")
PROMPTS = [
    "tell me about the sea ?", "why is the sky blue ?", "what is a cat ?", "hello dear friend , how are you ?",
    "tell me about one tree and two birds .", "can you answer the question ?", "where is the moon ?",
    "please reply with a short sentence about the river .",
]
EOS = 1
TOPIC_WORDS = {"sea": "sea sky sun moon river tree bird".split(),
               "talk": "hello dear sir madam friend please thank".split()}
POLICY = {"sea": {"concise": 1.5}, "talk": {"formal": -1.0, "concise": 0.5}}  # a route left out: the base model
ROUTED = {"sea": {"concise": 1.5, "formal": 0.0}, "talk": {"concise": 0.5, "formal": -1.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny_model_dir(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "model")
    for seed, name in enumerate(ADAPTERS):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"), ClmConfig())
        perturb(model, seed=seed, scale=0.3)  # a trained layer stand-in that moves the outputs a lot
        model.save_pretrained(root / name)
    # a router between two topics, fitted on the base model, and a policy for the routed server
    from peft_clm.tools.router import PromptRouter

    g = torch.Generator().manual_seed(0)
    topics = {label: [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=g).tolist())
                      for _ in range(12)] for label, words in TOPIC_WORDS.items()}
    base = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    PromptRouter.fit(base, tokenizer, [p for ps in topics.values() for p in ps],
                     [label for label, ps in topics.items() for _ in ps]).save(root / "router")
    (root / "policy.json").write_text(json.dumps(POLICY))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m peft_clm serve` process, its log file, and clients for it."""

    def __init__(self, root: Path, name: str, *args: str) -> None:
        self.root, self.name, self.args = root, name, args
        self.proc = None
        self.start()

    def start(self) -> None:
        self.port = _free_port()
        self.log_path = self.root / f"server_{self.name}_{self.port}.log"
        cmd = [sys.executable, "-m", "peft_clm", "serve", "--model", str(self.root / "model"),
               *[a for n in ADAPTERS for a in ("--adapter", f"{n}={self.root / n}")], "--port", str(self.port),
               "--dtype", "float64", "--threads", "1", "--log-level", "debug", *self.args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.ready = False

    def wait_ready(self, timeout: float = 180.0) -> Server:
        if self.proc.poll() is not None:  # stopped by an earlier test (the shutdown test): start a new one
            self.start()
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.proc.poll() is not None:
                pytest.fail(f"server {self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self.ready = httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            if not self.ready:
                assert time.monotonic() < deadline, f"server {self.name} did not start:\n{self.log()[-3000:]}"
                time.sleep(0.2)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", **kwargs)

    def log(self) -> str:
        return self.log_path.read_text()

    def batches(self, since: int = 0) -> list[tuple[int, int, int]]:
        """(rows, requests, distinct alphas) of each batch the server logged after character `since`."""
        pattern = r"batch \d+: (\d+) rows from (\d+) request\(s\), (\d+) distinct alpha"
        return [tuple(map(int, m)) for m in re.findall(pattern, self.log()[since:])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


@pytest.fixture(scope="module")
def servers(tiny):
    # Started together: each spends most of its start-up importing torch and transformers.
    started = {
        "logits": Server(tiny, "logits", "--interpolation", "logits"),
        "hidden": Server(tiny, "hidden", "--interpolation", "hidden"),
        "weights": Server(tiny, "weights", "--interpolation", "weights"),
        "small": Server(tiny, "small", "--interpolation", "hidden", "--max-queue", "2",
                        "--max-new-tokens-limit", "1800"),
        "routed": Server(tiny, "routed", "--interpolation", "logits", "--router", str(tiny / "router"),
                         "--policy", str(tiny / "policy.json")),
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def logits(servers):
    return servers["logits"].wait_ready()


@pytest.fixture(scope="module")
def hidden(servers):
    return servers["hidden"].wait_ready()


@pytest.fixture(scope="module")
def weights(servers):
    return servers["weights"].wait_ready()


@pytest.fixture()
def small(servers):
    return servers["small"].wait_ready()


@pytest.fixture(scope="module")
def routed(servers):
    return servers["routed"].wait_ready()


class Reference:
    """Solo `generate()` in this process, one request at a time: what every served answer must equal."""

    def __init__(self, root: Path, mode: str) -> None:
        torch.set_num_threads(1)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "model")
        base = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float64)
        model = PeftModel.from_pretrained(base, root / ADAPTERS[0], adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            model.load_adapter(root / name, adapter_name=name)
        model.base_model.set_adapter(list(ADAPTERS))
        model.set_interpolation(mode)
        self.model = model.eval()
        self.cache: dict = {}
        self.lock = threading.Lock()

    def prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def tokens(self, prompt: str, alpha: dict, max_tokens: int, chat: bool = False) -> list[int]:
        key = (prompt, tuple(sorted(alpha.items())), chat)
        with self.lock:
            cached = self.cache.get(key)
            if cached is None or (len(cached) < max_tokens and EOS not in cached):
                ids = torch.tensor([self.prompt_ids(prompt, chat)])
                with torch.inference_mode():
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                              max_new_tokens=max_tokens, clm_alpha=dict(alpha))
                cached = out[0, ids.shape[1]:].tolist()
                self.cache[key] = cached
        # Greedy decoding with a smaller budget is a prefix of the same decoding with a larger one.
        cut = cached[:max_tokens]
        return cut[: cut.index(EOS) + 1] if EOS in cut else cut

    def answer(self, prompt: str, alpha: dict, max_tokens: int, chat: bool = False) -> tuple[str, str, int]:
        """(text, finish_reason, completion_tokens) of the solo greedy run."""
        toks = self.tokens(prompt, alpha, max_tokens, chat)
        ended = bool(toks) and toks[-1] == EOS
        text = self.tokenizer.decode(toks[:-1] if ended else toks, skip_special_tokens=True)
        return text, "stop" if ended else "length", len(toks)


@pytest.fixture(scope="module")
def ref_logits(tiny):
    return Reference(tiny, "logits")


@pytest.fixture(scope="module")
def ref_hidden(tiny):
    return Reference(tiny, "hidden")


def both(a: float) -> dict:
    return {n: a for n in ADAPTERS}


def _stream_text(stream) -> tuple[dict, dict, object]:
    """Texts and finish reasons by choice index, and the usage, from a stream of chunks."""
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


# ---------------------------------------------------------------------------------------------------- basics
def test_models_and_health(logits):
    client = logits.client()
    assert [m.id for m in client.models.list()] == ["model", "concise", "formal"]
    health = httpx.get(logits.url + "/health").json()
    assert health["status"] == "ok" and health["interpolation"] == "logits" and health["adapters"] == list(ADAPTERS)


def test_completion_matches_solo_generate_and_counts_usage(logits, ref_logits):
    client = logits.client()
    for prompt, alpha in [(PROMPTS[0], 0.0), (PROMPTS[1], 0.7), (PROMPTS[2], 1.5), (PROMPTS[3], -0.5)]:
        r = client.completions.create(model="model", prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"alpha": alpha})
        text, finish, n = ref_logits.answer(prompt, both(alpha), 10)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish)
        assert r.usage.prompt_tokens == len(ref_logits.prompt_ids(prompt, False))
        assert r.usage.completion_tokens == n and r.usage.total_tokens == n + r.usage.prompt_tokens
        assert r.model_extra["alpha"] == both(alpha)
    # No max_tokens: 16, OpenAI's default for completions.
    r = client.completions.create(model="model", prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    # No alpha: the server's default (--alpha, 1.0) for every knob.
    r = client.completions.create(model="model", prompt=PROMPTS[4], max_tokens=8, temperature=0)
    assert r.choices[0].text == ref_logits.answer(PROMPTS[4], both(1.0), 8)[0] and r.model_extra["alpha"] == both(1.0)


def test_chat_streaming_and_not_agree_with_solo(logits, ref_logits):
    client = logits.client()
    messages = [{"role": "user", "content": PROMPTS[5]}]
    text, finish, n = ref_logits.answer(PROMPTS[5], both(0.5), 12, chat=True)
    r = client.chat.completions.create(model="model", messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"alpha": 0.5})
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, finish, n)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    stream = client.chat.completions.create(model="model", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, extra_body={"alpha": 0.5})
    texts, reasons, usage = _stream_text(stream)
    assert texts == {0: text} and reasons == {0: finish} and usage.completion_tokens == n
    # With include_usage the usage comes in a last chunk without choices, as OpenAI sends it.
    chunks = list(client.chat.completions.create(model="model", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"alpha": 0.5}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_with_one_alpha_per_choice(logits, ref_logits):
    client = logits.client()
    alphas = [0.0, 0.6, 1.2]
    stream = client.completions.create(model="model", prompt=PROMPTS[6], max_tokens=9, temperature=0, n=3,
                                       stream=True, extra_body={"alpha": alphas})
    texts, reasons, usage = _stream_text(stream)
    expected = [ref_logits.answer(PROMPTS[6], both(a), 9) for a in alphas]
    assert [texts[i] for i in range(3)] == [e[0] for e in expected]
    assert [reasons[i] for i in range(3)] == [e[1] for e in expected]
    assert usage.completion_tokens == sum(e[2] for e in expected)
    assert usage.prompt_tokens == len(ref_logits.prompt_ids(PROMPTS[6], False))  # once, not once per choice


def test_several_knobs_and_model_per_adapter(logits, ref_logits):
    client = logits.client()
    mix = {"concise": 1.0, "formal": -0.5}
    r = client.completions.create(model="model", prompt=PROMPTS[7], max_tokens=10, temperature=0,
                                  extra_body={"alpha": mix})
    assert r.choices[0].text == ref_logits.answer(PROMPTS[7], mix, 10)[0] and r.model_extra["alpha"] == mix
    # A knob left out of the dict keeps the default (1.0).
    r = client.completions.create(model="model", prompt=PROMPTS[7], max_tokens=10, temperature=0,
                                  extra_body={"alpha": {"formal": 0.25}})
    assert r.choices[0].text == ref_logits.answer(PROMPTS[7], {"concise": 1.0, "formal": 0.25}, 10)[0]
    # model = an adapter: that knob alone, the others off.
    r = client.chat.completions.create(model="formal", messages=[{"role": "user", "content": PROMPTS[0]}],
                                       max_tokens=10, temperature=0, extra_body={"alpha": 1.3})
    alone = {"concise": 0.0, "formal": 1.3}
    assert r.choices[0].message.content == ref_logits.answer(PROMPTS[0], alone, 10, chat=True)[0]
    assert r.model_extra["alpha"] == alone and r.model == "formal"
    distinct = {ref_logits.answer(PROMPTS[7], a, 10)[0] for a in (mix, both(0.0), both(1.0), alone)}
    assert len(distinct) >= 3  # the knobs really move the output, so the equalities above can fail


def test_requests_without_alpha_are_routed_and_get_their_routes_alphas(routed, ref_logits):
    client = routed.client()
    sea, talk = "sea sky sun moon river tree", "hello dear sir madam friend please"
    for prompt, route in ((sea, "sea"), (talk, "talk")):
        r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=10, temperature=0)
        assert r.model_extra["route"] == route and r.model_extra["alpha"] == ROUTED[route]
        assert r.choices[0].message.content == ref_logits.answer(prompt, ROUTED[route], 10, chat=True)[0]
    # one completion request with two prompts: each at its own route's alphas
    r = client.completions.create(model="model", prompt=[sea, talk], max_tokens=10, temperature=0)
    assert r.model_extra["route"] == ["sea", "talk"] and r.model_extra["alpha"] == [ROUTED["sea"], ROUTED["talk"]]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        ref_logits.answer(p, ROUTED[route], 10)[0] for p, route in ((sea, "sea"), (talk, "talk"))]
    # an alpha sent, or a request to one adapter, is not routed
    r = client.completions.create(model="model", prompt=sea, max_tokens=10, temperature=0, extra_body={"alpha": 0.0})
    assert "route" not in r.model_extra and r.choices[0].text == ref_logits.answer(sea, both(0.0), 10)[0]
    r = client.completions.create(model="formal", prompt=sea, max_tokens=10, temperature=0)
    assert "route" not in r.model_extra and r.model_extra["alpha"] == {"concise": 0.0, "formal": 1.0}
    assert ref_logits.answer(sea, ROUTED["sea"], 10)[0] != ref_logits.answer(sea, ROUTED["talk"], 10)[0]
    assert "route=sea" in routed.log() and "routing requests that send no alpha" in routed.log()
    # n choices of one routed prompt share its route
    r = client.completions.create(model="model", prompt=talk, max_tokens=6, temperature=0, n=2)
    assert r.model_extra["route"] == ["talk"] and r.model_extra["alpha"] == [ROUTED["talk"]] * 2
    # a chat without a user message cannot be routed: 400, and the server keeps serving
    with pytest.raises(openai.BadRequestError, match="could not be routed"):
        client.chat.completions.create(model="model", messages=[{"role": "system", "content": sea}], max_tokens=4)


def test_routed_and_unrouted_requests_at_once_each_equal_their_solo_generate(routed, ref_logits):
    """Routing runs on its own thread while the worker generates: concurrent requests, routed or sent an alpha,
    each get what they would alone."""
    client = routed.client()
    words = TOPIC_WORDS["sea"] + TOPIC_WORDS["talk"]
    jobs = []
    for k in range(12):
        prompt = " ".join(words[(k * 5 + i) % 7 + (7 if k % 2 else 0)] for i in range(6))
        jobs.append((prompt, None if k % 3 else {"concise": 0.25 * k, "formal": 0.0}))

    def ask(job):
        prompt, alpha = job
        extra = {} if alpha is None else {"extra_body": {"alpha": alpha}}
        r = client.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0, **extra)
        return r.choices[0].text, r.model_extra.get("route"), r.model_extra["alpha"]

    since = len(routed.log())
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    passes = [int(m) for m in re.findall(r"routing pass: \d+ prompt\(s\) from (\d+) request", routed.log()[since:])]
    assert sum(passes) == 8 and max(passes) > 1  # the 8 routed requests, some of them routed together
    for (prompt, alpha), (text, route, applied) in zip(jobs, answers):
        if alpha is None:
            assert route == [("talk" if prompt.split()[0] in TOPIC_WORDS["talk"] else "sea")]
            assert applied == ROUTED[route[0]]
        else:
            assert route is None and applied == alpha
        assert text == ref_logits.answer(prompt, applied, 8)[0]


def test_stop_strings_cut_the_text_streamed_or_not(hidden, ref_hidden):
    client = hidden.client()
    full, _, _ = ref_hidden.answer(PROMPTS[1], both(0.8), 16)
    words = full.split(" ")
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])  # two words in the middle: the stop string spans two tokens
    expected = full[: full.index(stop)]
    r = client.completions.create(model="model", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop, "zzz"],
                                  extra_body={"alpha": 0.8})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    texts, reasons, _ = _stream_text(client.completions.create(
        model="model", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"alpha": 0.8}))
    assert (texts[0], reasons[0]) == (expected, "stop")


def test_seeded_sampling_does_not_depend_on_the_batch(hidden):
    client = hidden.client()

    def sample(seed, n=1, alpha=0.9, prompt=PROMPTS[2]):
        r = client.completions.create(model="model", prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.95,
                                      seed=seed, n=n, extra_body={"alpha": alpha})
        return [c.text for c in r.choices]

    alone = sample(1234)
    since = len(hidden.log())
    with ThreadPoolExecutor(6) as pool:  # the same request among others, sampled and greedy, at other alphas
        futures = [pool.submit(sample, 1234)] + [pool.submit(sample, s, 1, a, PROMPTS[s % 8]) for s, a in
                                                  zip(range(5), (0.0, 0.3, 1.0, 1.5, -0.5))]
        together = futures[0].result()
        [f.result() for f in futures[1:]]
    assert together == alone
    assert max(rows for rows, _, _ in hidden.batches(since)) > 1  # it did share a batch
    # Choice k of a request draws from seed + k, so the first of n=2 is the n=1 answer.
    pair = sample(1234, n=2)
    assert pair[0] == alone[0] and pair[1] == sample(1235)[0]
    assert len({sample(s)[0] for s in range(4)}) > 1  # different seeds, different samples


# ---------------------------------------------------------------------------------------------------- errors
BAD_BODIES = [
    ({"alpha": "high"}, "alpha must be a number"),
    ({"alpha": True}, "alpha must be a number"),
    ({"alpha": {"concise": "1"}}, "alpha['concise'] must be a number"),
    ({"alpha": {"nope": 1.0}}, "unknown adapter"),
    ({"alpha": [0.5, 1.0]}, "one alpha per sequence"),
    ({"max_tokens": 0}, "max_tokens must be between 1 and 1024"),
    ({"max_tokens": 5000}, "max_tokens must be between 1 and 1024"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"temperature": 3}, "temperature must be between 0 and 2"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"n": 0}, "n must be between 1"),
    ({"alhpa": 0.5}, "unknown field 'alhpa'"),
    ({"presence_penalty": 0.5}, "presence_penalty is not supported"),
    ({"prompt": "the " * 2100}, "context is 2048 tokens"),
    ({"prompt": "the " * 2000, "max_tokens": 100}, "Lower max_tokens to at most 48"),
]


@pytest.mark.parametrize("patch,message", BAD_BODIES)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(logits, patch, message):
    body = {"model": "model", "prompt": "tell me about the sea ?", "max_tokens": 4, **patch}
    r = httpx.post(logits.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error
    good = httpx.post(logits.url + "/v1/completions", json={"model": "model", "prompt": "hi", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("raw,message", [
    ('{"model": "model", "prompt": "hi", "alpha": NaN}', "alpha must be a finite number with |alpha| <= 1000"),
    ('{"model": "model", "prompt": "hi", "alpha": {"formal": Infinity}}',
     "alpha['formal'] must be a finite number with |alpha['formal']| <= 1000"),
    ('{"model": "model", "prompt": "hi", "alpha": 1e999}', "alpha must be a finite number"),
    # the tuner's own limit, checked before the request is queued (not a 500 from inside generate)
    ('{"model": "model", "prompt": "hi", "alpha": [5000]}',
     "alpha[0] must be a finite number with |alpha[0]| <= 1000"),
    ('{"model": "model", "prompt": "hi", ', "not valid JSON"),
    ('[1, 2]', "must be a JSON object"),
])
def test_non_finite_alpha_and_malformed_json(logits, raw, message):
    r = httpx.post(logits.url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_error_statuses_through_the_openai_client(logits):
    client = logits.client(max_retries=0)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="dials 'concise' alone"):
        client.chat.completions.create(model="concise", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       extra_body={"alpha": {"formal": 1.0}})
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="model", messages=[{"role": "user", "content": "sea " * 2100}],
                                       max_tokens=3)
    # Over the body size limit (1 MiB by default): 413, before anything is parsed.
    r = httpx.post(logits.url + "/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "larger than this server's limit" in r.json()["error"]["message"]
    # ... and when the client streams the body without a Content-Length.
    r = httpx.post(logits.url + "/v1/completions", content=iter([b'{"prompt": "', b"a" * (2 << 20), b'"}']),
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert client.completions.create(model="model", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    assert "POST /v1/completions -> 413" in logits.log()


def test_weights_mode_groups_by_alpha_and_refuses_per_sequence_alpha(weights, tiny):
    client = weights.client(max_retries=0)
    with pytest.raises(openai.BadRequestError, match="weights mode"):
        client.completions.create(model="model", prompt="hi", max_tokens=3, n=2, extra_body={"alpha": [0.0, 1.0]})
    ref = Reference(tiny, "weights")
    jobs = [(PROMPTS[i % 8], (0.0, 0.5, 1.5)[i % 3], 6 + i % 5) for i in range(48)]
    since = len(weights.log())

    def one(job):
        prompt, alpha, max_tokens = job
        r = client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"alpha": alpha})
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    assert got == [ref.answer(p, both(a), m) for p, a, m in jobs]
    batches = weights.batches(since)
    assert max(rows for rows, _, _ in batches) > 1 and {k for _, _, k in batches} == {1}


# ---------------------------------------------------------------------------------------------------- load
@pytest.mark.parametrize("mode", ["logits", "hidden"])
def test_200_interleaved_requests_each_equal_its_solo_generate(request, mode):
    server = request.getfixturevalue(mode)
    ref = request.getfixturevalue(f"ref_{mode}")
    client = server.client(max_retries=0)
    alphas = [-0.5, 0.0, 0.3, 0.7, 1.0, 1.6]
    jobs = []
    for i in range(210):
        alpha = alphas[(i * 5) % len(alphas)]
        jobs.append({"prompt": PROMPTS[i % len(PROMPTS)], "alpha": alpha, "max_tokens": 4 + (i * 7) % 9,
                     "chat": i % 3 == 0, "stream": i % 4 == 1, "target": "concise" if i % 10 == 7 else "model"})

    def one(job):
        kw = {"max_tokens": job["max_tokens"], "temperature": 0, "stream": job["stream"], "model": job["target"],
                  "extra_body": {"alpha": job["alpha"]}}
        if job["chat"]:
            r = client.chat.completions.create(messages=[{"role": "user", "content": job["prompt"]}], **kw)
        else:
            r = client.completions.create(prompt=job["prompt"], **kw)
        if job["stream"]:
            texts, reasons, usage = _stream_text(r)
            return texts[0], reasons[0], usage.completion_tokens
        c = r.choices[0]
        return (c.message.content if job["chat"] else c.text), c.finish_reason, r.usage.completion_tokens

    since = len(server.log())
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    expected = []
    for job in jobs:
        alpha = {"concise": job["alpha"], "formal": 0.0} if job["target"] == "concise" else both(job["alpha"])
        expected.append(ref.answer(job["prompt"], alpha, job["max_tokens"], job["chat"]))
    mismatches = [(job, g, e) for job, g, e in zip(jobs, got, expected) if g != e]
    assert not mismatches, mismatches[:3]
    batches = server.batches(since)
    assert sum(rows for rows, _, _ in batches) == len(jobs)
    assert max(rows for rows, _, _ in batches) > 1, batches
    assert max(k for _, _, k in batches) > 1  # rows with different alphas shared a generate() call
    per_prompt = {}
    for job, e in zip(jobs, expected):
        per_prompt.setdefault((job["prompt"], job["chat"]), set()).add(e[0][:20])
    assert sum(len(v) > 1 for v in per_prompt.values()) >= len(per_prompt) // 2  # alpha does change the text


# ------------------------------------------------------------------------------------ queue, clients, shutdown
def _long_stream(server, max_tokens=1500):
    """A streamed request that runs for a long time (EOS ignored); returns the open response and its lines."""
    client = httpx.Client(timeout=60)
    body = {"model": "model", "prompt": "tell me a very long story", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    response = client.send(client.build_request("POST", server.url + "/v1/completions", json=body), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    return client, response, lines, json.loads(first[6:])["id"]


def _log_line(server, rid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if rid in line and "completion_tokens=" in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no log line for {rid}:\n{server.log()[-2000:]}")


def test_full_queue_answers_503_with_retry_after(small):
    client, response, _, rid = _long_stream(small)  # occupies the worker
    body = {"model": "model", "prompt": "hi", "max_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(httpx.post, small.url + "/v1/completions", json=body, timeout=60) for _ in range(2)]
        deadline = time.monotonic() + 10
        while httpx.get(small.url + "/health").json()["queued"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(small.url + "/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert "queue is full (2 requests waiting)" in r.json()["error"]["message"]
        response.close()  # the long request's client goes away: the queued ones run
        client.close()
        assert [f.result().status_code for f in waiting] == [200, 200]
    assert "cancelled (client gone)" in _log_line(small, rid)


def test_client_that_disconnects_frees_its_slot(small):
    client, response, lines, rid = _long_stream(small, max_tokens=1700)
    for _ in range(3):
        next(lines)
    response.close()
    client.close()
    line = _log_line(small, rid)
    assert "cancelled (client gone)" in line
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 1700
    # A non-streamed request whose client gives up (a read timeout) is dropped too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small.url + "/v1/completions", timeout=httpx.Timeout(60, read=1.0),
                   json={"model": "model", "prompt": "another long one", "max_tokens": 1700, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while small.log().count("cancelled (client gone)") < 2:
        assert time.monotonic() < deadline, small.log()[-2000:]
        time.sleep(0.1)
    assert httpx.get(small.url + "/health").json()["running_rows"] == 0
    r = small.client().completions.create(model="model", prompt="hi", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(small):
    client, response, lines, _ = _long_stream(small, max_tokens=300)
    small.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no new connections once draining
        httpx.get(small.url + "/health", timeout=5)
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    response.close()
    client.close()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 300  # the stream ran to its end
    assert small.proc.wait(30) == 0
    log = small.log()
    assert "stopped:" in log and "Traceback" not in log


# ---------------------------------------------------------------------------------------------------- pieces
def test_incremental_decoder_handles_multibyte_tokens_and_stop_strings():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from peft_clm.tools.serve.detok import IncrementalDecoder

    # A byte-level BPE with a small vocabulary: emoji and CJK characters span several tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "héllo 🙂 wörld 日本語 the fox 👍🏽 ok"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.encode()) // 2  # the multi-byte characters were split into byte tokens
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.add(t) for t in ids] + [dec.finish()]
    assert "".join(pieces) == tokenizer.decode(ids) == text == dec.text
    assert not any("\ufffd" in p for p in pieces)
    # A stop string met across tokens: nothing of it is released, the text ends before it.
    dec = IncrementalDecoder(tokenizer, stop=["wörld 日", "nope"])
    pieces = [dec.add(t) for t in ids]
    assert dec.stopped and "".join(pieces) == "héllo 🙂 " == dec.text
    # An unfinished character at the very end comes out as U+FFFD, as a whole decode shows it.
    cut = tokenizer("ok 🙂")["input_ids"][:-1]
    dec = IncrementalDecoder(tokenizer)
    assert "".join([dec.add(t) for t in cut] + [dec.finish()]) == tokenizer.decode(cut)


def test_serve_command_reports_bad_arguments(tiny, capsys):
    from peft_clm.tools.cli import main

    assert main(["serve", "--model", str(tiny / "model"), "--adapter", f"x={tiny / 'missing'}"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny / "model"), "--adapter", f"a={tiny / 'concise'}",
                 "--adapter", f"a={tiny / 'formal'}"]) == 2
    assert "given twice" in capsys.readouterr().err
    adapters = ["--adapter", f"concise={tiny / 'concise'}", "--adapter", f"formal={tiny / 'formal'}"]
    assert main(["serve", "--model", str(tiny / "model"), *adapters, "--router", str(tiny / "router")]) == 2
    assert "--router and --policy go together" in capsys.readouterr().err
    for policy, message in (({"sea": {"loud": 1.0}}, r"names adapter\(s\) \['loud'\]"),
                            ({"law": {"formal": 1.0}}, r"route\(s\) \['law'\] that the router never gives"),
                            ({"sea": 1.0}, "a policy is {label: {adapter: alpha}}"),
                            ({"sea": {"formal": "high"}}, r"policy\['sea'\]\['formal'\] must be")):
        (tiny / "bad_policy.json").write_text(json.dumps(policy))
        assert main(["serve", "--model", str(tiny / "model"), *adapters, "--router", str(tiny / "router"),
                     "--policy", str(tiny / "bad_policy.json")]) == 2
        assert re.search(message, capsys.readouterr().err), policy
    assert main(["serve", "--model", str(tiny / "model"), *adapters, "--interpolation", "weights",
                 "--router", str(tiny / "router"), "--policy", str(tiny / "policy.json")]) == 2
    assert "weights mode" in capsys.readouterr().err


def test_batcher_takes_waiting_requests_oldest_first_within_the_size_and_the_group():
    from peft_clm.tools.serve.batcher import Batcher, Job
    from peft_clm.tools.serve.engine import RowSpec
    from peft_clm.tools.serve.errors import ApiError

    class FakeEngine:  # records the batches; the first one blocks until released
        def __init__(self, weights):
            self.weights, self.batches, self.gate = weights, [], threading.Event()

        def group_key(self, spec):
            return spec.alpha["k"] if self.weights else None

        def run_batch(self, specs, sinks):
            self.batches.append([s.prompt_ids[0] for s in specs])
            assert self.gate.wait(10)
            for sink in sinks:
                sink.finish("length", 1, "")
            return 1

    def job(i, alpha=0.0, rows=1):
        return Job(f"r{i}", [RowSpec([i], {"k": alpha}, 1)] * rows, emit=lambda event: None)

    for weights in (False, True):
        engine = FakeEngine(weights)
        batcher = Batcher(engine, max_batch_size=4, batch_wait_ms=1, max_queue=6)
        batcher.start()
        batcher.submit(job(0))
        deadline = time.monotonic() + 5
        while not engine.batches:  # job 0 runs (and blocks): the next ones queue up behind it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = [job(1, 0.5), job(2, 1.0), job(3, 0.5, rows=2), job(4, 0.5), job(5, 1.0), job(6, 0.5)]
        for j in waiting:
            batcher.submit(j)
        with pytest.raises(ApiError) as full:  # 6 waiting: the queue is full
            batcher.submit(job(7))
        assert full.value.status == 503 and full.value.headers["Retry-After"] == "1"
        batcher.cancel(waiting[-1])  # its client went away: it never runs
        engine.gate.set()
        deadline = time.monotonic() + 5
        while batcher.stats()["rows_done"] < 7:
            assert time.monotonic() < deadline, engine.batches
            time.sleep(0.01)
        batcher.close()
        if weights:  # one alpha per call, the oldest request's group first
            assert engine.batches == [[0], [1, 3, 3, 4], [2, 5]]
        else:  # any alphas share a call, oldest first, up to 4 rows; a request's rows stay together
            assert engine.batches == [[0], [1, 2, 3, 3], [4, 5]]
