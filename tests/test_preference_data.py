"""The shipped concise pairs are graded (chosen answers of several lengths, each a cut of its rejected answer) and
rebuild exactly from the detailed answers (`scripts/build_preference_data.py --regrade`)."""

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _builder():
    path = ROOT / "scripts" / "build_preference_data.py"
    spec = importlib.util.spec_from_file_location("build_preference_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(name):
    return [json.loads(line) for line in (ROOT / "data" / "concise" / f"{name}.jsonl").read_text().splitlines()]


def test_graded_chosen_cuts_after_whole_sentences_and_leaves_something_out():
    build = _builder()
    text = "One is here. Two is there! Three is"
    cuts = {build.graded_chosen(text, random.Random(seed)) for seed in range(20)}
    assert cuts == {"One is here.", "One is here. Two is there!"}
    assert build.graded_chosen("No sentence ends here", random.Random(0)) is None
    assert build.graded_chosen("Only one sentence.", random.Random(0)) is None  # nothing would be left out


def test_shipped_concise_pairs_are_graded_and_rebuild_exactly():
    build = _builder()
    rows = _rows("train") + _rows("heldout")
    assert len(rows) == 240
    sentences = set()
    for r in rows:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert rejected.startswith(chosen) and len(chosen) < len(rejected)
        sentences.add(len(build.sentence_ends(chosen)))
    assert {1, 2, 3} <= sentences  # graded, not all one sentence
    questions = build.prompts()[:240]
    detailed = {r["prompt"][0]["content"]: r["rejected"][0]["content"] for r in rows}
    rebuilt = build.concise_rows(questions, [detailed[q] for q in questions])
    by_prompt = {r["prompt"][0]["content"]: r for r in rows}
    assert [by_prompt[r["prompt"][0]["content"]] for r in rebuilt] == rebuilt


def test_formalize_rewrites_register_and_keeps_content():
    build = _builder()
    assert build.formalize("Hey buddy! It's kinda awesome... it's been the world's best, lol!") == (
        "It is somewhat excellent. It has been the world's best."
    )
    # words with an ordinary sense, and "well"/"so" inside a sentence, are content: left alone
    assert build.formalize("It works well. It's so much fun to look pretty.") == (
        "It works well. It is so much fun to look pretty."
    )
    assert build.formalize("They'd gone home. It's made of wood.") == "They had gone home. It is made of wood."
    rewritten = build.formalize("So here's a rundown. And they can't stop, y'know?")
    assert rewritten == "Here is a rundown. They cannot stop?"
    assert build.formalize("I'd say you'd like it \U0001F600!") == "I would say you would like it."
    text = "Photosynthesis converts light into chemical energy in the chloroplasts of plant cells."
    assert build.formalize(text) == text  # nothing casual: unchanged


def test_register_pairs_share_content_and_lower_casualness():
    from peft_clm.tools.text_metrics import casualness

    build = _builder()
    rows = [json.loads(line) for line in (ROOT / "data" / "formal" / "train.jsonl").read_text().splitlines()]
    pairs = build.register_rows(rows)
    assert 0.9 * len(rows) <= len(pairs) < len(rows)  # only pairs with something to rewrite
    shipped_file = ROOT / "data" / "formal" / "train_register.jsonl"
    shipped = [json.loads(line) for line in shipped_file.read_text().splitlines()]
    assert shipped == pairs  # the shipped file rebuilds exactly
    allowed = {"not", "are", "have", "will", "am", "would", "is", "us", "cannot", "old", "yes", "no"}
    allowed |= {w for r in build._SLANG.values() for w in r.split()}
    droppable = set(build._SLANG) | {"hey", "hi", "oh", "ok", "okay", "well", "so", "and", "there", "man", "buddy",
                                     "dude", "let", "me", "tell", "you", "know", "y", "ol", "t", "s", "re", "ve",
                                     "ll", "d", "m", "won", "can"}
    lower = 0
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert casualness(chosen) <= casualness(rejected)
        lower += casualness(chosen) < casualness(rejected)
        # content kept: every word of the chosen side is a word of the casual answer or of a rewrite rule
        before = set(re.findall(r"[a-z]+", rejected.lower()))
        before |= {w[:-1] for w in re.findall(r"([a-z]+)'t\b", rejected.lower())}  # don't -> do not
        new = set(re.findall(r"[a-z]+", chosen.lower())) - before
        assert new <= allowed, new - allowed
        # and every word it drops is slang, a tone-only interjection or part of a contraction
        after = set(re.findall(r"[a-z]+", chosen.lower()))
        removed = set(re.findall(r"[a-z]+", rejected.lower())) - after
        stems = {w for w in removed if w.endswith("n") and w[:-1] in after}  # couldn't -> could not
        assert removed - stems <= droppable, removed - stems - droppable
    assert lower >= 0.9 * len(pairs)


def test_best_of_rows_keep_the_least_casual_fluent_candidate():
    build = _builder()
    row = build.pair("Q?", "It's cool.", "Hey, it's kinda awesome!")  # casualness 100 (2 markers, 2 words)
    loop = "it is essential it is essential it is essential it is essential"
    # a sampled answer that is more formal wins; a looping one and a copy of the rejected side never do
    best = build.best_of_rows([row, row], [["It is essential.", loop, "Hey!"], [loop, "Hey, it's kinda awesome!"]])
    assert [r["chosen"][0]["content"] for r in best] == ["It is essential.", "It's cool."]
    assert all(r["prompt"] == row["prompt"] and r["rejected"] == row["rejected"] for r in best)
    # ties keep the earlier candidate (the greedy answer first), and a row with no fluent candidate is left out
    assert build.best_of_rows([row], [["Wow, cool."]])[0]["chosen"][0]["content"] == "It's cool."
    empty = build.pair("Q?", loop, "Hey!")
    assert build.best_of_rows([empty], [[""]]) == []


def test_shipped_best_of_pairs_are_less_casual_than_the_greedy_ones():
    from peft_clm.tools.text_metrics import casualness

    train = [json.loads(x) for x in (ROOT / "data" / "formal" / "train.jsonl").read_text().splitlines()]
    best = [json.loads(x) for x in (ROOT / "data" / "formal" / "train_best_of_8.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"][0]["content"]: r for r in train}
    assert len(best) >= 0.95 * len(train)
    for r in best:
        greedy = by_prompt[r["prompt"][0]["content"]]
        assert r["rejected"] == greedy["rejected"]
        assert casualness(r["chosen"][0]["content"]) <= casualness(greedy["chosen"][0]["content"])


def test_best_of_and_wide_heldout_refuse_bad_combinations_before_loading(monkeypatch, capsys):
    build = _builder()
    for argv, message in [
        (["--dimensions", "formal", "--best-of", "-1"], "--best-of takes a number of samples >= 1"),
        (["--dimensions", "formal", "--best-of", "8", "--wide-heldout", "d"], "are separate rebuilds"),
        (["--dimensions", "formal", "--best-of", "8", "--two-ended"], "--two-ended mirrors"),
        (["--dimensions", "concise", "--best-of", "8"], "--best-of rebuilds the formal train pairs only"),
        (["--dimensions", "concise", "--wide-heldout", "d"], "--wide-heldout widens the formal held-out prompts only"),
    ]:
        monkeypatch.setattr(sys, "argv", ["build", *argv])
        with pytest.raises(SystemExit):
            build.main()
        assert message in capsys.readouterr().err
