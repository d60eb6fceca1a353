"""The prompt router (peft_clm.tools.router) on tiny random models: it learns topics it was shown and routes new
prompts of them, its features are the base model's whatever the adapters' alphas, a saved router routes to the bit
as before, a policy becomes per-row alphas that generate as each row would alone, and bad input is one error."""

import json

import pytest
import torch
from peft import get_peft_model
from test_levels import _plain_model
from tiny_models import perturb, tiny_tokenizer

from peft_clm import ClmConfig
from peft_clm.tools.router import (
    PromptRouter,
    UnroutablePrompt,
    default_layers,
    policy_alphas,
    prompt_features,
    prompt_text,
)


SEA = "sea sky sun moon river tree bird".split()
TALK = "hello dear sir madam friend please thank".split()


def _prompts(words, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=g).tolist()) for _ in range(n)]


def _data(n, seed):
    prompts = _prompts(SEA, n, seed) + _prompts(TALK, n, seed + 1)
    return prompts, ["sea"] * n + ["talk"] * n


def test_router_learns_topics_and_routes_new_prompts_of_them():
    tokenizer, model = tiny_tokenizer(), _plain_model(tiny_tokenizer(), seed=1)
    prompts, labels = _data(12, seed=0)
    router = PromptRouter.fit(model, tokenizer, prompts, labels, layers=[1, 2])
    assert router.labels == ["sea", "talk"] and router.layers == [1, 2]
    new_prompts, new_labels = _data(10, seed=50)
    assert router.route(model, tokenizer, new_prompts) == new_labels
    probs = router.probabilities(model, tokenizer, new_prompts)
    assert probs.shape == (20, 2) and torch.allclose(probs.sum(-1), torch.ones(20))
    # a chat is routed on its last user message
    chat = [{"role": "user", "content": "thank you"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": new_prompts[0]}]
    assert router.route(model, tokenizer, [chat]) == ["sea"]
    assert default_layers(30) == [6, 12, 18, 24, 30] and default_layers(2) == [1, 2]
    assert default_layers(7) == [1, 3, 4, 6, 7]


@pytest.mark.parametrize("mode", ["logits", "hidden"])
def test_features_are_the_base_models_whatever_the_adapters_alpha(mode):
    tokenizer = tiny_tokenizer()
    base = _plain_model(tokenizer, seed=2)
    prompts = ["the sea is blue", "hello dear friend , how are you ?", "cat"]
    before = prompt_features(base, tokenizer, prompts, [0, 1, 2])
    ids = tokenizer(prompts[:1], return_tensors="pt")["input_ids"]
    off = base(input_ids=ids).logits
    model = get_peft_model(base, ClmConfig(interpolation=mode)).eval()
    perturb(model, seed=3, scale=0.3)
    model.set_alpha(1.5)
    after = prompt_features(model, tokenizer, prompts, [0, 1, 2])
    assert torch.equal(before, after)
    assert not torch.allclose(model(input_ids=ids).logits, off)  # the adapter is on again after routing


def test_saved_router_routes_as_before_and_refuses_what_it_cannot_read(tmp_path):
    tokenizer, model = tiny_tokenizer(), _plain_model(tiny_tokenizer(), seed=1)
    prompts, labels = _data(8, seed=0)
    router = PromptRouter.fit(model, tokenizer, prompts, labels, layers=[2])
    router.save(tmp_path / "router")
    assert sorted(p.name for p in (tmp_path / "router").iterdir()) == ["router.safetensors", "router_config.json"]
    back = PromptRouter.load(tmp_path / "router")
    assert torch.equal(back.probabilities(model, tokenizer, prompts), router.probabilities(model, tokenizer, prompts))
    router.save(tmp_path / "router")  # a saved router is replaced whole
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a saved router"):
        router.save(tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # nothing half-written left behind
    with pytest.raises(FileNotFoundError, match="is not a saved router"):
        PromptRouter.load(tmp_path / "other")
    config = json.loads((tmp_path / "router" / "router_config.json").read_text())
    assert config["labels"] == ["sea", "talk"] and config["model"]["hidden_size"] == 32
    wider = _plain_model(tokenizer)
    wider.config.num_hidden_layers = 3
    with pytest.raises(ValueError, match="fitted on another model.*num_hidden_layers: fitted 2, given 3"):
        router.route(wider, tokenizer, prompts)
    with pytest.raises(ValueError, match="fitted on another model.*embedding_norm"):  # same shape, other weights
        router.route(_plain_model(tokenizer, seed=9), tokenizer, prompts)
    (tmp_path / "router" / "router_config.json").write_text(json.dumps({"labels": ["sea", "talk"]}))
    with pytest.raises(ValueError, match=r"damaged router: \['layers', 'model'\] missing"):
        PromptRouter.load(tmp_path / "router")


def test_bad_input_is_one_clear_error():
    tokenizer, model = tiny_tokenizer(), _plain_model(tiny_tokenizer())
    prompts, labels = _data(3, seed=0)
    with pytest.raises(ValueError, match="one label per prompt; got 6 prompts and 5 labels"):
        PromptRouter.fit(model, tokenizer, prompts, labels[:5])
    with pytest.raises(ValueError, match="at least two labels with at least two prompts each"):
        PromptRouter.fit(model, tokenizer, prompts, ["sea"] * 6)
    with pytest.raises(ValueError, match="at least two labels with at least two prompts each"):
        PromptRouter.fit(model, tokenizer, prompts, ["sea"] * 5 + ["talk"])
    with pytest.raises(ValueError, match=r"layers must be hidden-state indices 0..2"):
        PromptRouter.fit(model, tokenizer, prompts, labels, layers=[3])
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0"):
        PromptRouter.fit(model, tokenizer, prompts, labels, weight_decay=-1.0)
    with pytest.raises(UnroutablePrompt, match="prompts with no tokens cannot be routed"):
        prompt_features(model, tokenizer, ["the sea", ""], [1])
    with pytest.raises(ValueError, match="route with the model in eval mode"):
        prompt_features(model.train(), tokenizer, ["the sea"], [1])
    model.eval()
    with pytest.raises(ValueError, match="no prompts to route"):
        prompt_features(model, tokenizer, [], [1])
    with pytest.raises(UnroutablePrompt, match="a string or a list of chat messages with a user message"):
        prompt_text([{"role": "system", "content": "be kind"}])
    with pytest.raises(ValueError, match="do not fit together"):
        PromptRouter(["a", "b"], [1], torch.zeros(4), torch.ones(4), torch.zeros(4, 3), torch.zeros(3))


def test_policy_alphas_give_each_row_its_routes_setting():
    alpha = policy_alphas(["med", "general", "law", "med"], {"med": {"m": 1.0}, "law": {"l": -0.5, "m": 0.25}})
    assert set(alpha) == {"m", "l"}
    assert alpha["m"].tolist() == [1.0, 0.0, 0.25, 1.0] and alpha["l"].tolist() == [0.0, 0.0, -0.5, 0.0]
    assert policy_alphas(["x"], {}, adapters=["m"])["m"].tolist() == [0.0]
    with pytest.raises(ValueError, match=r"names adapter\(s\) \['z'\], which are not among \['m'\]"):
        policy_alphas(["med"], {"med": {"z": 1.0}}, adapters=["m"])
    with pytest.raises(ValueError, match=r"policy\['med'\]\['m'\] must be a finite number"):
        policy_alphas(["med"], {"med": {"m": float("nan")}})


@pytest.mark.parametrize("mode", ["logits", "hidden"])
def test_routed_generation_equals_each_row_generated_alone_at_its_routes_alphas(mode):
    tokenizer = tiny_tokenizer()
    base = _plain_model(tokenizer, seed=4)
    prompts, labels = _data(10, seed=0)
    router = PromptRouter.fit(base, tokenizer, prompts, labels, layers=[1, 2])
    model = get_peft_model(base, ClmConfig(interpolation=mode), adapter_name="sea_knob")
    model.add_adapter("talk_knob", ClmConfig(interpolation=mode))
    perturb(model, seed=5, scale=0.5, adapter="sea_knob")
    perturb(model, seed=6, scale=0.5, adapter="talk_knob")
    model.base_model.set_adapter(["sea_knob", "talk_knob"])
    model.eval()
    batch_prompts = [_prompts(SEA, 1, 70)[0], _prompts(TALK, 1, 71)[0], _prompts(SEA, 1, 72)[0]]
    routes = router.route(model, tokenizer, batch_prompts)
    assert routes == ["sea", "talk", "sea"]
    policy = {"sea": {"sea_knob": 1.5}, "talk": {"talk_knob": -1.0, "sea_knob": 0.5}}
    alpha = policy_alphas(routes, policy, adapters=["sea_knob", "talk_knob"])
    ids = tokenizer(batch_prompts, return_tensors="pt")["input_ids"]  # six words each: no padding
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = model.generate(input_ids=ids, clm_alpha=alpha, **kwargs)
    for i, route in enumerate(routes):
        alone = model.generate(input_ids=ids[i : i + 1], clm_alpha={"sea_knob": 0.0, "talk_knob": 0.0,
                                                                      **policy[route]}, **kwargs)
        assert torch.equal(together[i : i + 1], alone)
    unrouted = model.generate(input_ids=ids, clm_alpha={"sea_knob": 1.5, "talk_knob": 0.0}, **kwargs)
    assert not torch.equal(unrouted, together)  # the talk row's own setting changed its answer


def test_router_fit_command_fits_reports_and_saves(tmp_path, capsys):
    from tiny_models import save_tiny_model_dir

    from peft_clm.tools.cli import main

    save_tiny_model_dir(tmp_path / "model")
    prompts, labels = _data(10, seed=0)
    rows = [{"prompt": p if i % 2 else [{"role": "user", "content": p}], "topic": lb}
            for i, (p, lb) in enumerate(zip(prompts, labels))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    new_prompts, new_labels = _data(5, seed=50)
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"prompt": p, "topic": lb}) + "\n"
                                                 for p, lb in zip(new_prompts, new_labels)))
    args = ["router", "fit", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
            "--label-field", "topic", "--heldout", str(tmp_path / "held.jsonl"), "--out", str(tmp_path / "router")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fitted on 20 prompts (sea 10, talk 10)" in out and "held-out" in out and "wrote" in out
    held = float(out.split("held-out")[1].split("accuracy ")[1].split(";")[0])
    assert held == 1.0  # two topics of disjoint words: new prompts of them are routed right
    assert PromptRouter.load(tmp_path / "router").labels == ["sea", "talk"]
    # bad input: one message each, nothing written
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "sea", "topic": "sea"}) + "\n{not json\n")
    bad = [*args[:4], "--data", str(tmp_path / "bad.jsonl"), *args[6:-1], str(tmp_path / "r2")]
    assert main(bad) == 2
    assert "bad.jsonl: 1 bad row(s), nothing was read:\n  line 2: not JSON" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "sea", "label": "sea"}) + "\n"
                                        + json.dumps({"prompt": [{"role": "system", "content": "sea"}], "topic": "a"})
                                        + "\n" + json.dumps({"prompt": "sea", "topic": ""}) + "\n")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "3 bad row(s)" in err and "line 1: missing field(s) ['topic']" in err
    assert "line 2: field 'prompt' has no user message" in err
    assert "line 3: field 'topic' must be a non-empty string, got ''" in err
    assert main([*args, "--layers", "one,2"]) == 2
    assert "--layers must be hidden-state indices" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main([*args[:-1], str(tmp_path / "taken")]) == 2
    assert "is not a saved router" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_serve_routed_check_script_on_a_tiny_model(tmp_path):
    """scripts/serve_routed_check.py against a real server on a tiny model: every question is asked routed and at
    alpha 0, and what it writes names each answer's route and the alphas applied."""
    import subprocess
    import sys
    from pathlib import Path

    from tiny_models import save_tiny_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_model_dir(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} . {% endfor %}"
                               "{% if add_generation_prompt %}answer :{% endif %}")
    tokenizer.save_pretrained(tmp_path / "model")
    knobs = [f"{d}_{lv}" for d in ("medical", "legal", "financial") for lv in ("avoid", "expert")]
    for i, knob in enumerate(knobs):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), ClmConfig())
        perturb(model, seed=i, scale=0.3)
        model.save_pretrained(tmp_path / "runs" / "clm" / knob)
    prompts, labels = _data(8, seed=0)
    labels = ["medical" if lb == "sea" else "general" for lb in labels]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    PromptRouter.fit(base, tokenizer, prompts, labels).save(tmp_path / "router")
    held, held_labels = _data(2, seed=60)
    rows = [{"prompt": [{"role": "user", "content": p}], "domain": "medical" if lb == "sea" else "general"}
            for p, lb in zip(held, held_labels)]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).resolve().parent.parent / "scripts" / "serve_routed_check.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "model"), "--runs",
                           str(tmp_path / "runs"), "--router", str(tmp_path / "router"), "--policy",
                           '{"medical": {"medical_avoid": 1.5}}', "--data", str(tmp_path / "held.jsonl"),
                           "--per-domain", "2", "--max-tokens", "4", "--out", str(tmp_path / "out" / "served.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads((tmp_path / "out" / "served.json").read_text())
    assert [a["route"] for a in served["routed"]] == ["medical", "medical", "general", "general"]
    assert all(a["alpha"]["medical_avoid"] == (1.5 if a["route"] == "medical" else 0.0) for a in served["routed"])
    assert all(a["route"] is None and set(a["alpha"].values()) == {0.0} for a in served["base"])
    assert served["summary"]["medical"]["routed_to_own"] == 1.0 and "medical" in proc.stdout
