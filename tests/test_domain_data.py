"""The domain data's extra training questions (`scripts/build_domain_data.py --more-train`) are new questions, and
adding them leaves the 240 questions' split and answers as they are (`data/domains_more` against
`data/domains_greedy`, built with the same arguments but the flag)."""

import importlib.util
import json
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def _builder():
    path = ROOT / "scripts" / "build_domain_data.py"
    spec = importlib.util.spec_from_file_location("build_domain_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(folder, split):
    return [json.loads(line) for line in (ROOT / "data" / folder / f"{split}.jsonl").read_text().splitlines()]


def _norm(question):
    return re.sub(r"[^a-z0-9 ]", "", question.lower()).strip()


def test_more_train_questions_are_new_and_train_only():
    build = _builder()
    assert set(build.MORE_TRAIN) == {"medical", "legal", "financial"}
    old = {_norm(q) for questions in build.QUESTIONS.values() for q in questions}
    new = [_norm(q) for questions in build.MORE_TRAIN.values() for q in questions]
    assert all(len(questions) == 60 for questions in build.MORE_TRAIN.values())
    assert len(set(new)) == len(new) and not old & set(new)
    heldout = {q for part in build.split_questions().values() for q in part["heldout"]}
    assert not heldout & {q for questions in build.MORE_TRAIN.values() for q in questions}


def test_more_train_data_keeps_the_240_questions_answers_and_adds_three_levels_each():
    build = _builder()
    assert _rows("domains_more", "heldout") == _rows("domains_greedy", "heldout")
    more, greedy = _rows("domains_more", "train"), _rows("domains_greedy", "train")
    assert more[: len(greedy)] == greedy
    extra = more[len(greedy):]
    assert [r["prompt"][0]["content"] for r in extra] == [q for qs in build.MORE_TRAIN.values() for q in qs]
    for r in extra:  # every level answered, the avoid and expert answers from one of their domain's openings
        assert all(r[level].strip() for level in build.LEVELS)
        assert r["avoid"].startswith(tuple(build.AVOID_OPENINGS[r["domain"]]))
        assert r["expert"].startswith(tuple(build.EXPERT_OPENINGS[r["domain"]]))
    summary = json.loads((ROOT / "data" / "domains_more" / "summary.json").read_text())
    assert summary["levers"]["more_train"] is True
