"""What a user meets beyond the mean curve: fluency metrics on hand-written texts, per-prompt reliability, the usable
range, the answers' NLL under the base model, and the sweep of a knob that is not CLM's alpha."""

import contextlib
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import perturb, preference_rows, save_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_clm import ClmConfig
from peft_clm.tools.generation import generate_answers
from peft_clm.tools.preference import answer_nll
from peft_clm.tools.sweep import knob_sweep, per_prompt_reliability, rescore_sweep, score_sweep, usable_range
from peft_clm.tools.text_metrics import distinct_n, fluency, is_degenerate, max_ngram_repeats


FLUENT = [
    "Basil likes sun, so put it on a windowsill and water it when the top of the soil is dry.",
    "The water cycle moves water from the sea to the sky and back. The water cycle never stops.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.",
    "Yes, yes, I see.",
]
DEGENERATE = [
    "To ensure your basil thrives, ensure windowsill windowsill windowsill windowsill windowsill windowsill",
    "It is good and it is good and it is good and",
    "The sea is blue. The sea is blue. The sea is blue.",
    "",
    "  ... !!! ",
]


@pytest.mark.parametrize("text", DEGENERATE)
def test_degeneration_fires_on_loops_and_empty_answers(text):
    assert is_degenerate(text)


@pytest.mark.parametrize("text", FLUENT)
def test_degeneration_does_not_fire_on_fluent_answers(text):
    assert not is_degenerate(text)  # a phrase said twice ("the water cycle") is not a loop


def test_degeneration_threshold_is_three_occurrences_of_a_4gram():
    assert max_ngram_repeats("a b c d a b c d", 4) == 2 and not is_degenerate("a b c d x a b c d")
    assert max_ngram_repeats("a b c d a b c d a b c d", 4) == 3 and is_degenerate("a b c d, a b c d; a B c D")
    assert not is_degenerate("w w w w w") and is_degenerate("w w w w w w")  # a one-word loop fires at 6 words
    assert is_degenerate("a b c d a b c d a b c d", n=4, repeats=3) and not is_degenerate("a b c d a b c d", repeats=3)


NUMBER_LOOPS = [
    "In numbers: 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2,",
    "In numbers: 2022-01-22 2022-01-23 2022-01-24 2022-01-25 202",
    "1. 2017 Federal Law: 2017-2018 Federal Law: 2017-2018 Federal Law: 2017-2018 Federal",
]


@pytest.mark.parametrize("text", NUMBER_LOOPS)
def test_loops_in_numbers_fire_only_when_numbers_count(text):
    assert is_degenerate(text, numbers=True)
    assert not is_degenerate(text)  # the sweeps' rule, letter words only: the figures it measured stay put


@pytest.mark.parametrize("text", FLUENT + ["Take 200 mg every 6 hours, at most 1,200 mg a day, for 3 days."])
def test_numbers_as_words_leave_fluent_answers_alone(text):
    assert not is_degenerate(text, numbers=True)


def test_numbers_are_one_symbol():
    assert max_ngram_repeats("1 2 3 4 5 6", 4, numbers=True) == 3 and max_ngram_repeats("1 2 3 4 5 6", 4) == 0
    assert max_ngram_repeats("Day 1: Rome. Day 2: Rome. Day 3: Rome.", 3, numbers=True) == 3
    assert is_degenerate("1 2 3", numbers=True)  # no word at all, as without numbers


def test_distinct_2_and_fluency_summary():
    assert distinct_n("the cat sat on the mat", 2) == 1.0
    assert distinct_n("go go go go", 2) == pytest.approx(1 / 3)
    assert distinct_n("hello", 2) == 1.0  # nothing to repeat
    f = fluency(["It rains today.", "go go go go go go go go"], base_nll=[1.5, float("nan")])
    assert f["degenerate_rate"] == 0.5 and f["base_nll"] == 1.5
    assert f["distinct2"] == pytest.approx((1.0 + 1 / 7) / 2)
    with pytest.raises(ValueError, match="at least one answer"):
        fluency([])


def test_per_prompt_reliability_counts_wrong_way_and_rho_per_prompt():
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5]
    # prompt 0 falls steadily (aligned), prompt 1 rises (wrong way), prompt 2 never moves, prompt 3 falls from -0.5
    # to 0, then rises (wrong way between 0 and 1)
    values = [[10, 1, 5, 9], [8, 2, 5, 6], [6, 3, 5, 7], [4, 4, 5, 8], [2, 5, 5, 9]]
    r = per_prompt_reliability(alphas, values, direction=-1, prompts=["a", "b", "c", [{"content": "d"}]])
    assert r["wrong_way_fraction"] == 0.5  # prompts 1 and 3 end higher at alpha 1 than at 0
    assert r["aligned_way_fraction"] == 0.25 and r["unmoved_fraction"] == 0.25
    per = r["per_prompt"]
    assert per[0]["rho"] == pytest.approx(-1.0) and per[1]["rho"] == pytest.approx(1.0)
    assert math.isnan(per[2]["rho"]) and r["rho_undefined_fraction"] == 0.25
    assert [p["moves"] for p in per] == [-1, 1, 0, 1] and per[3]["prompt"] == "d"
    assert r["rho_quantiles"]["min"] == pytest.approx(-1.0) and r["rho_quantiles"]["max"] == pytest.approx(1.0)
    assert r["rho_aligned_sign_fraction"] == 0.25
    flipped = per_prompt_reliability(alphas, values, direction=1)
    assert flipped["wrong_way_fraction"] == 0.25 and flipped["aligned_way_fraction"] == 0.5
    no_one = per_prompt_reliability([0.0, 2.0], [[1], [2]])
    assert no_one["wrong_way_fraction"] is None and no_one["per_prompt"][0]["rho"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="direction"):
        per_prompt_reliability(alphas, values, direction=0)


def test_usable_range_is_the_stretch_around_alpha_0_within_5_points():
    alphas = [2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]  # unsorted on purpose
    rates = [0.50, 0.30, 0.10, 0.05, 0.05, 0.10, 0.11]
    u = usable_range(alphas, rates)
    assert u["range"] == [-0.5, 1.0] and u["degenerate_alphas"] == [-1.0, 1.5, 2.0] and u["base_rate"] == 0.05
    # a usable alpha beyond a degenerate one is not in the range: the range is contiguous
    assert usable_range([0.0, 1.0, 2.0], [0.0, 0.2, 0.0])["range"] == [0.0, 0.0]
    assert usable_range([-1.0, 1.0], [0.0, 0.5])["range"] == [-1.0, -1.0]  # no 0: the alpha nearest it


def test_score_sweep_reports_fluency_reliability_and_the_core_rho():
    alphas = [-0.5, 0.0, 1.0, 2.0]
    answers = {
        0: ["one two three four five six", "a b c d e f g"],
        1: ["one two three four five", "a b c d e f"],
        2: ["one two", "a b c d e f g h"],
        3: ["go go go go go go go", ""],
    }
    r = score_sweep(alphas, ["p", "q"], answers, "words", nll={j: [1.0, 2.0] for j in range(4)},
                    core_range=(-0.5, 1.0))
    assert [row["words_mean"] for row in r["rows"]] == [6.5, 5.5, 5.0, 3.5]
    assert r["rows"][3]["degenerate_rate"] == 1.0 and r["rows"][1]["base_nll"] == 1.5
    assert r["usable"]["range"] == [-0.5, 1.0] and r["usable"]["degenerate_alphas"] == [2.0]
    assert r["reliability"]["wrong_way_fraction"] == 0.5  # q grows from 6 to 8 words between alpha 0 and 1
    assert r["spearman_rho_core"]["rho"] == pytest.approx(-1.0) and r["answers"]["2.0"] == answers[3]


def test_rescore_reproduces_a_fresh_score_and_follows_a_changed_metric(monkeypatch):
    import json

    import peft_clm.tools.sweep as sweep_module

    alphas = [-0.5, 0.0, 1.0, 2.0]
    answers = {0: ["It's fun!", "Hey."], 1: ["The Earth's crust.", "Hi there."], 2: ["The crust.", "Thus it is."],
               3: ["Hence.", "Moreover it is."]}
    scored = score_sweep(alphas, ["p", "q"], answers, "casualness", nll={j: [1.0, 2.0] for j in range(4)})
    stored = json.loads(json.dumps(scored))  # what sweep.json holds
    assert rescore_sweep(json.loads(json.dumps(stored))) == stored  # same metric: every field, to the last digit
    assert stored["rows"][1]["casualness_mean"] == 25.0  # "Hi" (50) and 0: the possessive 's is no contraction
    # a metric whose definition changed (here: counts "Earth" as casual) changes only the fields it decides
    changed = dict(sweep_module.METRICS, casualness=lambda t: 100.0 * t.count("Earth") + 1.0 * len(t.split()))
    monkeypatch.setattr(sweep_module, "METRICS", changed)
    again = rescore_sweep(json.loads(json.dumps(stored)))
    assert again["rows"][1]["casualness_mean"] == (103.0 + 2.0) / 2 and again["base_value"] == 52.5
    first = again["reliability"]["per_prompt"][0]
    assert first["moves"] == -1 and first["prompt"] == "p"
    kept = ("degenerate_rate", "distinct2", "base_nll", "n_prompts", "alpha")
    assert [{k: r[k] for k in kept} for r in again["rows"]] == [{k: r[k] for k in kept} for r in stored["rows"]]
    assert again["usable"] == stored["usable"] and again["answers"] == stored["answers"]
    with pytest.raises(ValueError, match="metric='nope'"):
        rescore_sweep({**stored, "metric": "nope"})
    with pytest.raises(ValueError, match=r"answers missing at \[2.0\]"):
        rescore_sweep({**stored, "answers": {k: v for k, v in stored["answers"].items() if k != "2.0"}})
    with pytest.raises(ValueError, match="repeat a value"):
        score_sweep([0.0, 1.0, 1.0], ["p"], {0: ["a"], 1: ["b"], 2: ["c"]}, "words")
    int_alphas = json.loads(json.dumps({**stored, "alphas": [-0.5, 0, 1, 2]}))  # as a hand-written file may have it
    assert rescore_sweep(int_alphas)["rows"][1]["casualness_mean"] == again["rows"][1]["casualness_mean"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluency")
    save_tiny_model_dir(root / "model")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"), ClmConfig(interpolation="logits"))
    perturb(model, seed=0, scale=0.3)
    model.save_pretrained(root / "adapter")
    return root


def test_answer_nll_is_the_base_models_per_token_nll(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    clm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), tiny / "adapter").eval()
    prompts = ["tell me about the sea ?", "hello"]
    answers = ["the sea is very good .", ""]
    got = answer_nll(clm, tok, prompts, answers)
    assert math.isnan(got[1])  # an empty answer has no tokens
    ids = tok(prompts[0] + "the sea is very good .", add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_prompt = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
    want = -logp[n_prompt - 1:].gather(-1, ids[0, n_prompt:, None]).mean()
    assert got[0] == pytest.approx(float(want), rel=1e-5)
    assert answer_nll(base, tok, prompts[:1], answers[:1])[0] == pytest.approx(got[0], rel=1e-5)
    with torch.no_grad():  # the trained path is not what scores: alpha 1's own NLL differs
        logits1 = clm(input_ids=ids, clm_alpha=1.0).logits[0, :-1].float()
    own = -torch.log_softmax(logits1, -1)[n_prompt - 1:].gather(-1, ids[0, n_prompt:, None]).mean()
    assert abs(float(own) - got[0]) > 1e-4
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        answer_nll(base, tok, prompts, answers[:1])


def test_knob_sweep_scores_any_knob_and_leaves_the_model_as_it_was(tiny, tmp_path):
    """A steering-like knob (a vector added to one layer's output, by a hook): value 0 is the base model, the hook is
    gone afterwards, and the result has the same columns as a CLM sweep."""
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 2.0

    @contextlib.contextmanager
    def knob(value):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + value * vector,) + output[1:]
            return output + value * vector

        handle = model.model.layers[1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    rows = preference_rows(4)
    prompts = [r["prompt"] for r in rows]
    plain = generate_answers(model, tok, prompts, [None], max_new_tokens=5)[0]
    r = knob_sweep(model, tok, knob, [0.0, 1.0, 3.0], prompts, tmp_path, metric="words", pairs=rows,
                   max_new_tokens=5, label="steering vector", knob_name="multiplier")
    assert r["answers"]["0.0"] == plain and generate_answers(model, tok, prompts, [None], max_new_tokens=5)[0] == plain
    assert r["answers"]["3.0"] != plain  # the knob acts
    assert r["rows"][0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # value 0 is the reference
    assert {"degenerate_rate", "distinct2", "base_nll", "reward_accuracy"} <= set(r["rows"][1])
    assert r["knob"] == "multiplier" and len(r["reliability"]["per_prompt"]) == 4
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "sweep.csv").is_file()
    with pytest.raises(ValueError, match="must include 0"):
        knob_sweep(model, tok, knob, [1.0, 2.0], prompts, tmp_path / "x")
