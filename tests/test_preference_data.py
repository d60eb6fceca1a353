"""The shipped concise pairs are graded (chosen answers of several lengths, each a cut of its rejected answer) and
rebuild exactly from the detailed answers (`scripts/build_preference_data.py --regrade`)."""

import importlib.util
import json
import random
from pathlib import Path


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
