"""The domain data's extra training questions (`scripts/build_domain_data.py --more-train`) and extra held-out
questions (`--more-heldout`) are new questions, and adding them leaves the earlier questions' split and answers as
they are (`data/domains_more` against `data/domains_greedy`, and `data/domains_wide`'s held-out rows against
`data/domains_more`'s, each built with the same arguments but the new flag)."""

import importlib.util
import json
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def _builder():
    path = ROOT / "scripts" / "build_domain_data.py"
    spec = importlib.util.spec_from_file_location("build_domain_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(folder, split):
    folder = ROOT / "data" / folder if isinstance(folder, str) else folder
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _norm(question):
    return re.sub(r"[^a-z0-9 ]", "", question.lower()).strip()


def test_more_train_questions_are_new_and_train_only():
    build = _builder()
    assert set(build.MORE_TRAIN) == {"medical", "legal", "financial"}
    old = {_norm(q) for questions in build.QUESTIONS.values() for q in questions}
    new = [_norm(q) for questions in build.MORE_TRAIN.values() for q in questions]
    assert all(len(questions) == 60 for questions in build.MORE_TRAIN.values())
    assert len(set(new)) == len(new) and not old & set(new)


def test_more_heldout_questions_are_new():
    build = _builder()
    assert set(build.MORE_HELDOUT) == {"medical", "legal", "financial", "general"}
    old = {_norm(q) for table in (build.QUESTIONS, build.MORE_TRAIN) for qs in table.values() for q in qs}
    new = [_norm(q) for questions in build.MORE_HELDOUT.values() for q in questions]
    assert all(len(questions) == 30 for questions in build.MORE_HELDOUT.values())
    assert len(set(new)) == len(new) and not old & set(new)


def test_more_heldout_data_keeps_every_earlier_answer_and_adds_three_levels_each():
    build = _builder()
    # held-out only: its knobs are trained on data/domains_more (a rebuild here differed in one training answer of
    # 1,080, a near-tie of greedy decoding on this CPU, so the rebuilt train.jsonl is not shipped)
    assert not (ROOT / "data" / "domains_wide" / "train.jsonl").exists()
    wide, more = _rows("domains_wide", "heldout"), _rows("domains_more", "heldout")
    assert wide[: len(more)] == more
    extra = wide[len(more):]
    assert [(r["domain"], r["prompt"][0]["content"]) for r in extra] == [
        (d, q) for d, qs in build.MORE_HELDOUT.items() for q in qs
    ]
    for r in extra:
        index = len(build.QUESTIONS[r["domain"]]) + len(build.MORE_TRAIN.get(r["domain"], []))
        index += build.MORE_HELDOUT[r["domain"]].index(r["prompt"][0]["content"])
        assert all(r[level].strip() for level in build.LEVELS)
        assert r["avoid"].startswith(build.lever(r["domain"], "avoid", index)[1])
        assert r["expert"].startswith(tuple(build.EXPERT_OPENINGS[r["domain"]]))
    summary = json.loads((ROOT / "data" / "domains_wide" / "summary.json").read_text())
    assert summary["levers"]["more_train"] is True and summary["levers"]["more_heldout"] is True


def test_more_train_data_keeps_the_240_questions_answers_and_adds_three_levels_each():
    build = _builder()
    assert _rows("domains_more", "heldout") == _rows("domains_greedy", "heldout")
    more, greedy = _rows("domains_more", "train"), _rows("domains_greedy", "train")
    assert more[: len(greedy)] == greedy
    extra = more[len(greedy):]
    assert [r["prompt"][0]["content"] for r in extra] == [q for qs in build.MORE_TRAIN.values() for q in qs]
    for r in extra:  # every level answered; the avoid answer from its own opening, the expert one from a retry's too
        index = len(build.QUESTIONS[r["domain"]]) + build.MORE_TRAIN[r["domain"]].index(r["prompt"][0]["content"])
        assert all(r[level].strip() for level in build.LEVELS)
        assert r["avoid"].startswith(build.lever(r["domain"], "avoid", index)[1])
        assert r["expert"].startswith(tuple(build.EXPERT_OPENINGS[r["domain"]]))
    summary = json.loads((ROOT / "data" / "domains_more" / "summary.json").read_text())
    assert summary["levers"]["more_train"] is True


def _run_builder(build, monkeypatch, out, *flags):
    """`main()` with the model stubbed: every answer is a fixed sentence (with the size of the generate call it came
    from, so that answers depend on what they were batched with), but an expert answer from a domain's first
    opening loops (a run of digits) and the generic answer to a domain's second question loops unless decoded with
    the fallback penalty, so that both the retries and the fallback fire."""
    domain_of = {q: d for table in (build.QUESTIONS, build.MORE_TRAIN, build.MORE_HELDOUT) for d, qs in table.items()
                 for q in qs}

    def generate(model, tokenizer, requests, max_new_tokens=64, batch_size=24, repetition_penalty=1.15):
        out = []
        for messages, prefill in requests:
            question = messages[-1]["content"]
            looping = prefill == build.EXPERT_OPENINGS[domain_of[question]][0] or (
                not prefill and question in {q[1] for q in build.QUESTIONS.values()} and repetition_penalty == 1.0
            )
            # the call's size in the answer: a question answered in another batch set would read differently
            out.append((" 123456789 123456789." if looping else f" An answer to: {question} ({len(requests)})", True))
        return out

    monkeypatch.setattr(build, "load_model", lambda name: (None, None))
    monkeypatch.setattr(build, "generate", generate)
    monkeypatch.setattr(sys, "argv", ["build", "--out", str(out), "--limit", "3", "--repetition-penalty", "1.0",
                                      *flags])
    build.main()
    rows = {split: _rows(out, split) for split in ("train", "heldout")}
    return rows, json.loads((out / "summary.json").read_text())


def test_more_train_is_a_second_pass_with_its_own_retries_and_openings(tmp_path, monkeypatch):
    build = _builder()
    plain, plain_summary = _run_builder(build, monkeypatch, tmp_path / "plain")
    more, more_summary = _run_builder(build, monkeypatch, tmp_path / "more", "--more-train")
    assert more["heldout"] == plain["heldout"]
    assert more["train"][: len(plain["train"])] == plain["train"]
    extra = more["train"][len(plain["train"]):]
    assert [(r["domain"], r["prompt"][0]["content"]) for r in extra] == [
        (d, q) for d, qs in build.MORE_TRAIN.items() for q in qs[:3]
    ]
    for i, r in enumerate(extra):  # the index goes on after the domain's 60 questions, so do the openings
        index = len(build.QUESTIONS[r["domain"]]) + i % 3
        assert r["avoid"].startswith(build.lever(r["domain"], "avoid", index)[1])
        opening = build.lever(r["domain"], "expert", index + (index % 3 == 0))[1]  # the first opening loops
        assert r["expert"].startswith(f"{opening} An answer to: {r['prompt'][0]['content']} (")
    # the first opening is each 3rd question's: 4 domains x 1 in the 240's pass, 3 more in the new questions' pass
    assert plain_summary["expert_answers_retried"] == 4 and more_summary["expert_answers_retried"] == 7
    for summary in (plain_summary, more_summary):  # the second question of each domain: only in the first pass
        assert summary["fallback_penalty_answers"] == {"avoid": 0, "generic": 4, "expert": 0}
        assert summary["still_degenerate"] == {"avoid": 0, "generic": 0, "expert": 0}
    assert (plain_summary["levers"]["more_train"], more_summary["levers"]["more_train"]) == (False, True)


def test_more_heldout_is_a_last_pass_of_held_out_rows(tmp_path, monkeypatch):
    build = _builder()
    more, _ = _run_builder(build, monkeypatch, tmp_path / "more", "--more-train")
    wide, wide_summary = _run_builder(build, monkeypatch, tmp_path / "wide", "--more-train", "--more-heldout")
    assert wide["train"] == more["train"]
    assert wide["heldout"][: len(more["heldout"])] == more["heldout"]
    extra = wide["heldout"][len(more["heldout"]):]
    assert [(r["domain"], r["prompt"][0]["content"]) for r in extra] == [
        (d, q) for d, qs in build.MORE_HELDOUT.items() for q in qs[:3]
    ]
    for i, r in enumerate(extra):  # the index goes on after the domain's training questions, so do the openings
        index = len(build.QUESTIONS[r["domain"]]) + len(build.MORE_TRAIN.get(r["domain"], [])) + i % 3
        assert r["avoid"].startswith(build.lever(r["domain"], "avoid", index)[1])
    assert wide_summary["levers"]["more_heldout"] is True
