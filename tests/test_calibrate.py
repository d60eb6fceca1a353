"""Calibrating alpha to a target: the search on a knob whose response is known, its refusals (out of reach, reached
only where the answers degenerate), a real tiny model end to end, and the CLI's argument errors (before loading)."""

import contextlib
import io
import json
import math

import pytest
from peft import PeftModel, get_peft_model
from tiny_models import perturb, preference_rows, save_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_clm import ClmConfig
from peft_clm.tools import calibrate as calibrate_module
from peft_clm.tools.calibrate import CalibrationError, calibrate, measure, summarize, transfer_chance
from peft_clm.tools.cli import main


PROMPTS = ["p0", "p1", "p2"]


def known_knob(alpha: float, i: int) -> str:
    """A stand-in for a model with a known response: 30 - 10 * alpha words on average over the three prompts (one
    word fewer, the same, one more; two from alpha 0.75 on, so that the spread depends on alpha), looping
    (degenerate) from alpha 1.5 on and below alpha -1.5."""
    n = max(1, round(30 - 10 * alpha) + (i - 1) * (2 if alpha >= 0.75 else 1))
    if alpha >= 1.5 or alpha < -1.5:
        return " ".join(["again"] * n)
    return " ".join("x" + chr(97 + k // 26) + chr(97 + k % 26) for k in range(n))  # distinct words


@pytest.fixture
def fake_generation(monkeypatch):
    calls = []

    def generate(model, tokenizer, prompts, alphas, max_new_tokens=64, batch_size=16, progress=True):
        calls.append(list(alphas))
        return {j: [known_knob(a, i) for i in range(len(prompts))] for j, a in enumerate(alphas)}

    monkeypatch.setattr(calibrate_module, "generate_answers", generate)
    return calls


def test_calibrate_finds_the_known_alpha(fake_generation):
    c = calibrate(None, None, PROMPTS, "words", 22.0)
    assert c.alpha == pytest.approx(0.8) and c.value == pytest.approx(22.0)
    assert c.sd == pytest.approx(2.0)  # the spread at the alpha found, not at a grid alpha beside it (1 at 0.5)
    assert c.usable_range == [-1.0, 1.0] and c.reachable == [20.0, 40.0] and c.degenerate_rate == 0.0
    assert len(fake_generation) == 2  # the coarse grid in one call, then one interpolated alpha
    c = calibrate(None, None, PROMPTS, "words", 33.0, max_steps=8)
    assert abs(c.value - 33.0) <= 0.02 * 20 and -0.5 <= c.alpha <= 0.0
    # a shared cache: a second target on the same prompts reuses the coarse grid
    cache = {}
    calibrate(None, None, PROMPTS, "words", 25.0, cache=cache)
    n = len(fake_generation)
    c = calibrate(None, None, PROMPTS, "words", 35.0, cache=cache)
    assert c.alpha == -0.5 and len(fake_generation) == n  # a grid alpha already measured: nothing generated
    # the spread over the prompts: one word fewer, the same, one more
    assert c.sd == pytest.approx(1.0) and c.standard_error == pytest.approx(1 / 3**0.5)
    assert c.to_dict()["standard_error"] == pytest.approx(1 / 3**0.5)
    assert {p["alpha"]: p["sd"] for p in c.probes} == {-1.0: 1.0, -0.5: 1.0, 0.0: 1.0, 0.5: 1.0, 1.0: 2.0, 1.5: 2.0,
                                                      2.0: 2.0}


def test_summarize_keeps_the_mean_spread_and_degeneration():
    loop = " ".join(["again"] * 12)
    m = summarize(["one two", "one two three four", loop], "words")
    assert m["value"] == pytest.approx(6.0) and m["sd"] == pytest.approx(5.2915026, rel=1e-6)
    assert m["degenerate_rate"] == pytest.approx(1 / 3)
    one = summarize(["one two"], "words")
    assert one["value"] == 2.0 and math.isnan(one["sd"])  # one prompt: no spread to speak of
    with pytest.raises(ValueError, match="metric='nope' is not one of"):
        summarize(["a"], "nope")
    with pytest.raises(ValueError, match="at least one answer"):
        summarize([], "words")


def test_transfer_chance_matches_drawing_prompts_at_random():
    """Two halves drawn from one population of per-prompt values (a knob that acts on both alike): the share of
    draws whose second half's mean lands within 10% of the first's target is what transfer_chance predicts."""
    import random

    rng = random.Random(0)
    population = [rng.expovariate(1 / 3.0) - 1.0 for _ in range(20_000)]  # skewed, mean 2, sd 3
    sd = (sum((x - 2.0) ** 2 for x in population) / len(population)) ** 0.5
    for n, target in ((30, 2.0), (120, 2.0), (30, 8.0)):
        hits = 0
        for _ in range(2000):
            a, b = rng.sample(population, n), rng.sample(population, n)
            shift = target - sum(a) / n  # calibrated: the alpha that puts half A's mean on the target
            hits += abs(sum(b) / n + shift - target) <= 0.10 * abs(target)
        assert hits / 2000 == pytest.approx(transfer_chance(target, sd, n, n), abs=0.04)
    more_prompts, larger_target = transfer_chance(2.0, 3.0, 120, 120), transfer_chance(8.0, 3.0, 120, 120)
    assert transfer_chance(2.0, 3.0, 30, 30) < more_prompts < larger_target
    assert transfer_chance(5.0, 0.0, 3, 3) == 1.0 and transfer_chance(0.0, 0.0, 3, 3) == 1.0
    assert transfer_chance(5.0, 0.0, 3, 3, value=5.6) == 0.0  # no spread, but calibration stopped 12% off
    # calibration stopped off the target: the chance is for a mean drawn around where it stopped
    hits = 0
    for _ in range(2000):
        a, b = rng.sample(population, 30), rng.sample(population, 30)
        shift = 2.3 - sum(a) / 30  # half A's mean lands at 2.3, not on the target 2.0
        hits += abs(sum(b) / 30 + shift - 2.0) <= 0.2
    assert hits / 2000 == pytest.approx(transfer_chance(2.0, sd, 30, 30, value=2.3), abs=0.04)
    assert transfer_chance(2.0, sd, 30, 30, value=2.3) < transfer_chance(2.0, sd, 30, 30)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n_new": 0}, "n_new must be a positive integer"), ({"n_calibrated": 2.5}, "n_calibrated must be"),
     ({"sd": float("nan")}, "sd must be a finite"), ({"sd": -1.0}, "sd must be"), ({"sd": "1"}, "sd must be"),
     ({"tolerance": 0}, "tolerance must be a finite fraction"), ({"tolerance": True}, "tolerance must be"),
     ({"tolerance": float("inf")}, "tolerance must be"), ({"target": float("nan")}, "target must be a finite"),
     ({"value": "x"}, "value must be a finite")],
)
def test_transfer_chance_refuses_bad_input(kwargs, message):
    args = {"target": 1.0, "sd": 1.0, "n_calibrated": 10, "n_new": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        transfer_chance(**args)


def test_calibrate_refines_a_target_near_the_metrics_zero_by_its_own_size(monkeypatch):
    # 12 - 10 * alpha words: the grid gives 22, 17, 12, 7, 2 (span 20). For the target 6, alpha 0.5 (7 words) is
    # within 5% of the span but 17% off the target: the search goes on and finds alpha 0.6 (6 words).
    calls = []

    def generate(model, tokenizer, prompts, alphas, max_new_tokens=64, batch_size=16, progress=True):
        calls.append(list(alphas))
        return {j: [" ".join(["w" + str(k) for k in range(round(12 - 10 * a))])] * len(prompts)
                for j, a in enumerate(alphas)}

    monkeypatch.setattr(calibrate_module, "generate_answers", generate)
    c = calibrate(None, None, PROMPTS, "words", 6.0, alphas=(-1, -0.5, 0, 0.5, 1), tolerance=0.05)
    assert c.reachable == [2.0, 22.0] and len(calls) == 2
    assert c.alpha == pytest.approx(0.6) and c.value == 6.0
    calls.clear()  # a target of the span's size stops at the grid point, as before: 17 is within 5% of 17.5
    assert calibrate(None, None, PROMPTS, "words", 17.5, alphas=(-1, -0.5, 0, 0.5, 1), tolerance=0.05).alpha == -0.5
    assert len(calls) == 1


def test_calibrate_refuses_targets_out_of_reach_and_in_the_degenerate_range(fake_generation):
    with pytest.raises(CalibrationError, match=r"outside what the knob reaches: words spans \[20, 40\]"):
        calibrate(None, None, PROMPTS, "words", 100.0)
    with pytest.raises(CalibrationError, match="reached only where the knob degenerates .alpha 2: 100%"):
        calibrate(None, None, PROMPTS, "words", 12.0)
    with pytest.raises(CalibrationError, match="outside"):  # beyond alpha 2 as well: not reached at all
        calibrate(None, None, PROMPTS, "words", 5.0)
    assert issubclass(CalibrationError, ValueError)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "nope"}, "metric='nope' is not one of"),
        ({"target": float("nan")}, "target must be a finite number"),
        ({"target": True}, "target must be a finite number"),
        ({"alphas": [0.0]}, "at least one besides 0"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"max_steps": -1}, "max_steps"),
    ],
)
def test_calibrate_checks_its_arguments_before_generating(fake_generation, kwargs, message):
    args = {"metric": "words", "target": 20.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        calibrate(None, None, PROMPTS, args.pop("metric"), args.pop("target"), **args)
    assert fake_generation == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    save_tiny_model_dir(root / "model")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"), ClmConfig(interpolation="logits"))
    perturb(model, seed=0, scale=0.5)
    model.save_pretrained(root / "adapter")
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(4)))
    return root


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_calibrate_cli_on_a_tiny_model(tiny, tmp_path):
    """The target is what the model gives at alpha 1 (measured first): calibrate must land on an alpha giving it."""
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), tiny / "adapter").eval()
    prompts = [r["prompt"] for r in preference_rows(4)]
    grid = measure(model, tok, prompts, [0.0, 1.0, 2.0], "words", max_new_tokens=6)
    target = grid[1.0]["value"]
    assert target != grid[0.0]["value"] and grid[1.0]["degenerate_rate"] <= grid[0.0]["degenerate_rate"]
    out = tmp_path / "cal" / "calibration.json"
    # hidden mode: at alphas 0 and 1 it is the same model as logits mode, between them it is not
    code, printed, err = run("calibrate", "--model", tiny / "model", "--adapter", tiny / "adapter", "--metric",
                             "words", "--target", target, "--prompts", tiny / "prompts.jsonl", "--alphas", "0,1,2",
                             "--max-new-tokens", 6, "--mode", "hidden", "--out", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert "usable range" in printed and f"alpha {result['alpha']:.4g} gives words" in printed
    assert result["target"] == target and abs(result["value"] - target) <= 0.02 * max(
        1.0, result["reachable"][1] - result["reachable"][0])
    assert result["usable_range"][0] <= result["alpha"] <= result["usable_range"][1]
    assert result["sd"] >= 0 and result["standard_error"] == pytest.approx(result["sd"] / 2)  # 4 prompts
    code, _, err = run("calibrate", "--model", tiny / "model", "--adapter", tiny / "adapter", "--metric", "words",
                       "--target", 10_000, "--prompts", tiny / "prompts.jsonl", "--alphas", "0,1",
                       "--max-new-tokens", 6)
    assert code == 2 and "lies outside what the knob reaches" in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--metric": "nope"}, "--metric 'nope' is not one of"),
        ({"--target": "x"}, "--target must be a number"),
        ({"--target": "inf"}, "--target must be a finite number"),
        ({"--alphas": "0,x"}, "--alphas must be comma-separated numbers"),
        ({"--alphas": "0"}, "--alphas needs at least one alpha besides 0"),
        ({"--tolerance": "1.5"}, "--tolerance"),
        ({"--max-steps": "-1"}, "--max-steps"),
        ({"--max-prompts": "0"}, "--max-prompts"),
        ({"--out": "."}, "is a directory"),
        ({"--prompts": "missing.jsonl"}, "No prompts file"),
    ],
)
def test_calibrate_cli_argument_errors_come_before_loading(tiny, change, message):
    args = {"--model": tiny / "no-such-model", "--adapter": tiny / "adapter", "--metric": "words", "--target": "20",
            "--prompts": tiny / "prompts.jsonl", **change}
    code, _, err = run("calibrate", *[x for kv in args.items() for x in kv])
    assert code == 2 and message in err and "no-such-model" not in err


def _validate_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "validate_calibration.py"
    spec = importlib.util.spec_from_file_location("validate_calibration", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_validate_calibration_transfer_check_reads_the_draw_around_where_calibration_stopped():
    check = _validate_script().transfer_check
    # 4.1 on A for the target 4: B at 3.0 is 25% off, yet 1.1 from A's value is within 1.96 * 0.597 of the draw
    r = check(4.0, 4.1, 3.0, 54, 3.0, 3.2, 54)
    assert r["relative_error_b"] == pytest.approx(0.25) and not r["within_10pct"] and r["within_draw_band"]
    assert r["draw_sd"] == pytest.approx((9 / 54 + 10.24 / 54) ** 0.5)
    assert r["chance_within_10pct_if_exact"] == pytest.approx(transfer_chance(4.0, 3.0, 54, 54, value=4.1))
    # the same miss with little spread on either half: outside the band, the knob acts otherwise on B
    r = check(4.0, 4.1, 0.5, 54, 3.0, 0.5, 54)
    assert not r["within_draw_band"] and r["chance_within_10pct_if_exact"] > 0.99
    r = check(4.0, 4.0, 1.0, 54, 4.2, 1.0, 54)
    assert r["within_10pct"] and r["within_draw_band"] and r["relative_error_b"] == pytest.approx(0.05)


def test_validate_calibration_refuses_halves_too_small_to_have_a_spread(monkeypatch):
    import sys

    script = _validate_script()
    monkeypatch.setattr(sys, "argv", ["x", "--adapter", "no-such-adapter", "--dimension", "concise", "--out", "o.json",
                                      "--half", "1"])
    with pytest.raises(SystemExit, match="--half must be at least 2 prompts, got 1"):
        script.main()  # before any model is loaded


def test_validate_calibration_extra_prompts_are_kept_by_domain_dealt_once_and_refused_clearly(tmp_path):
    """validate_calibration.py --extra-prompts: read_prompts keeps the rows of --extra-domain (file order), `deal`
    gives them alternately to the halves and drops any prompt already in a half or dealt before; a file that keeps
    nothing is one error naming it and the domain."""
    from peft_clm.tools.data import DataError, read_prompts

    script = _validate_script()
    rows = [{"prompt": f"q{i}", "domain": "general" if i % 2 else "medical"} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts(tmp_path / "a.jsonl", domain="general")[0] == ["q1", "q3", "q5"]
    assert len(read_prompts(tmp_path / "a.jsonl")[0]) == 6
    with pytest.raises(DataError, match=r"a.jsonl holds no prompts of domain 'legal'"):
        read_prompts(tmp_path / "a.jsonl", domain="legal")
    (tmp_path / "c.jsonl").write_text(json.dumps({"domain": "general"}) + "\n")
    with pytest.raises(DataError, match="line 1: no 'prompt' field"):
        read_prompts(tmp_path / "c.jsonl", domain="general")
    # a repeat of a held-out prompt and a prompt given twice (two files sharing questions) are dealt once, or not
    a, b, dropped = script.deal(["h1"], ["h2"], ["x", "h2", "y", "x", "z", "w"])
    assert (a, b, dropped) == (["h1", "x", "z"], ["h2", "y", "w"], 2)
    chat = [{"role": "user", "content": "q"}]
    assert script.deal([chat], [], [[{"content": "q", "role": "user"}], "r"]) == ([chat, "r"], [], 1)
