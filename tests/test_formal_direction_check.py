"""scripts/formal_direction_check.py: its dense measures and its wrong-way counts on a hand-written sweep."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "formal_direction_check", ROOT / "scripts" / "formal_direction_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_measures_on_strings():
    check = _script()
    assert check.neg_word_length("a tree") == -2.5
    assert check.neg_word_length("") == 0.0
    assert check.personal_pronouns("You're right and I agree with them") == pytest.approx(100 * 2 / 7)


def test_wrong_way_counts_per_measure_and_alpha(tmp_path, monkeypatch, capsys):
    check = _script()
    answers = {
        "0.0": ["I think it's cool", "The sky is blue", "Water is wet"],
        "1.0": ["It is considerable", "Hey, the sky's awesome!", "Water is wet"],  # aligned, wrong way, unmoved
        "2.0": ["Consequently, considerable", "The atmosphere appears azure", "Precipitation accumulates"],
    }
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"answers": answers, "max_new_tokens": 8}))
    pairs = tmp_path / "pairs.jsonl"
    rows = [  # the chosen sides against the alpha-0 answers: aligned, wrong way, unmoved
        {"prompt": "q1", "chosen": "Precipitation accumulates considerably", "rejected": "Hey it's wet lol"},
        {"prompt": "q2", "chosen": "Hey the sky's cool!", "rejected": "Hey lol!!"},
        {"prompt": "q3", "chosen": "Water is wet", "rejected": "Water's wet lol"},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "check.json"
    monkeypatch.setattr(sys, "argv", ["x", str(sweep), "--pairs", str(pairs), "--alphas", "1,2", "--out", str(out)])
    check.main()
    result = json.loads(out.read_text())
    casual = result["sweeps"][str(sweep)]["casualness"]
    assert casual["1.0"]["wrong_way"] == pytest.approx(1 / 3) and casual["1.0"]["unmoved"] == pytest.approx(1 / 3)
    assert result["sweeps"][str(sweep)]["neg_word_length"]["2.0"]["wrong_way"] == 0.0
    assert result["pair_agreement"]["casualness"]["chosen_more_formal"] == 1.0
    instructed = result["sweeps"][str(sweep)]["instructed"]["casualness"]
    assert instructed["wrong_way"] == pytest.approx(1 / 3) and instructed["unmoved"] == pytest.approx(1 / 3)
    # the instruction decoded as the sweep decodes, read from its file (stored for these 3 prompts and budget)
    stored = tmp_path / "instructed.json"
    build = importlib.util.spec_from_file_location("build", ROOT / "scripts" / "build_preference_data.py")
    builder = importlib.util.module_from_spec(build)
    build.loader.exec_module(builder)
    system = builder.INSTRUCTIONS["formal"][0]
    prompts = ["q1", "q2", "q3"]
    stored.write_text(json.dumps({"instruction": system, "prompts": prompts, "max_new_tokens": 8,
                                  "answers": ["Yo it's cool!", "Sky", "Water"]}))
    argv = ["x", str(sweep), "--pairs", str(pairs), "--alphas", "1,2", "--out", str(out), "--instructed", str(stored)]
    monkeypatch.setattr(sys, "argv", argv)
    check.main()
    greedy = json.loads(out.read_text())["sweeps"][str(sweep)]["instructed_greedy"]["casualness"]
    assert greedy["wrong_way"] == pytest.approx(1 / 3) and greedy["unmoved"] == pytest.approx(2 / 3)
    monkeypatch.setattr(sys, "argv", ["x", str(sweep), "--pairs", str(pairs), "--alphas", "1,2", "--out", str(out)])
    # answers stored for other prompts are refused, not silently reused or overwritten
    stored.write_text(json.dumps({"instruction": system, "prompts": ["other", "q2", "q3"], "max_new_tokens": 8,
                                  "answers": ["a", "b", "c"]}))
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="holds answers for other prompts"):
        check.main()
    monkeypatch.setattr(sys, "argv", ["x", str(sweep), "--pairs", str(pairs), "--alphas", "1,2", "--out", str(out)])
    pairs.write_text(json.dumps(rows[0]) + "\n")  # fewer pairs than swept prompts: one clear error
    with pytest.raises(SystemExit, match="the sweep answered 3 prompts; --pairs has only 1"):
        check.main()
    monkeypatch.setattr(sys, "argv", ["x", str(sweep), "--pairs", str(pairs), "--alphas", "1.5"])
    with pytest.raises(SystemExit, match="need 0 and"):
        check.main()


def test_no_pairs_reports_the_sweeps_own_moves_for_prompts_without_pairs(tmp_path, monkeypatch, capsys):
    check = _script()
    answers = {"0.0": ["Rocks", "It is so"], "1.0": ["The Earth's rocks", "It's so cool"]}
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"answers": answers, "max_new_tokens": 8}))
    out = tmp_path / "check.json"
    monkeypatch.setattr(sys, "argv", ["x", str(sweep), "--no-pairs", "--alphas", "1", "--out", str(out)])
    check.main()
    result = json.loads(out.read_text())
    moved = result["sweeps"][str(sweep)]
    assert result["pairs"] is None and result["pair_agreement"] == {} and "instructed" not in moved
    assert moved["casualness"]["1.0"]["wrong_way"] == 0.5  # the contraction counts, the possessive does not
    # both alpha-0 answers carry no casual marker, so both count under "not_casual"; the contraction's rises
    assert result["by_base_answer"][str(sweep)] == {"casual": {"n": 0, "1.0": 0}, "not_casual": {"n": 2, "1.0": 1}}
    assert "held-out pairs" not in capsys.readouterr().out
    for extra in (["--instructed", str(tmp_path / "i.json")], ["--pairs", str(tmp_path / "p.jsonl")]):
        monkeypatch.setattr(sys, "argv", ["x", str(sweep), "--no-pairs", *extra])
        with pytest.raises(SystemExit):
            check.main()
        assert "--no-pairs reads no pairs" in capsys.readouterr().err


def test_an_empty_pairs_file_is_refused_not_read_as_no_pairs(tmp_path, monkeypatch):
    check = _script()
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"answers": {"0.0": ["a"], "1.0": ["b"]}, "max_new_tokens": 8}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    monkeypatch.setattr(sys, "argv", ["x", str(sweep), "--pairs", str(pairs), "--alphas", "1"])
    with pytest.raises(SystemExit, match="holds no pairs"):
        check.main()
