"""The transparent markers of the domain answer levels (avoid / generic / expert), on hand-written strings."""

import json

import pytest

from peft_clm.tools.domains import (
    MARKERS,
    refusal_counts,
    refusal_score,
    specificity_counts,
    specificity_score,
    word_count,
)


AVOID = [
    "I can't give medical advice, so please ask a doctor or a pharmacist about the right dose for you.",
    "I'm not a lawyer, and I can't advise on your case; please consult an attorney or a legal aid office.",
    "I'm not able to give personalised financial advice. A licensed financial advisor can look at your situation.",
]
GENERIC = [
    "Headaches often go away with rest, water and a quiet room. Some people find a pain reliever helps.",
    "Landlords usually have to return a deposit after you move out, minus any damage beyond normal wear.",
    "Saving a bit every month and spreading your money across different investments is a sensible start.",
]
EXPERT = [
    "The standard adult dose of ibuprofen is 200-400 mg every 6 to 8 hours, at most 1,200 mg a day without a "
    "prescription; acetaminophen 500 mg is an alternative.",
    "Under the Fair Housing Act and most state codes (e.g. California Civil Code § 1950.5), the landlord has 21 days "
    "to return the deposit; you can sue in small claims court for up to 2 times the amount.",
    "Put 15% of your gross income into a 401(k) up to the employer match, then max a Roth IRA ($7,000 a year); "
    "a low-cost index fund with a 0.03% expense ratio tracks the S&P 500.",
]


@pytest.mark.parametrize("text", AVOID)
def test_refusal_fires_on_declines_and_referrals(text):
    counts = refusal_counts(text)
    assert counts["decline"] >= 1 and counts["referral"] >= 1
    assert refusal_score(text) >= 2


@pytest.mark.parametrize("text", GENERIC + EXPERT)
def test_refusal_silent_on_answers(text):
    assert refusal_score(text) == 0


def test_refusal_phrases_counted_once():
    # "I'm not a lawyer" is a decline, not also a referral to "a lawyer"; "please ask" is one referral, not two.
    assert refusal_counts("I'm not a lawyer.") == {"decline": 1, "referral": 0}
    assert refusal_counts("Please ask a pharmacist.") == {"decline": 0, "referral": 2}
    # Words only match whole: "consultant" and "seeking" are not referrals, "Tasks" is not "ask".
    assert refusal_score("The consultant's tasks") == 0
    # SmolLM2's own unprompted non-answers count as declines.
    assert refusal_counts("I'm sorry, but as an AI I don't have the ability to see your lease.")["decline"] == 3
    # Curly apostrophes read as straight ones.
    assert refusal_counts("I can’t say.")["decline"] == 1


@pytest.mark.parametrize("text", EXPERT)
def test_specificity_fires_on_expert_text(text):
    assert specificity_score(text) > 10


@pytest.mark.parametrize("text", AVOID + GENERIC)
def test_specificity_silent_on_vague_text(text):
    assert specificity_score(text) == 0


def test_levels_order():
    mean = lambda f, texts: sum(map(f, texts)) / len(texts)  # noqa: E731
    assert mean(refusal_score, AVOID) > mean(refusal_score, GENERIC) >= mean(refusal_score, EXPERT)
    assert mean(specificity_score, EXPERT) > mean(specificity_score, GENERIC)
    assert mean(specificity_score, EXPERT) > mean(specificity_score, AVOID)


def test_specificity_counts_each_marker():
    counts = specificity_counts("Take 400 mg every 6 hours; 15% of $2,500; see Section 230 and the Fourth Amendment.")
    assert counts["numbers"] == 5          # 400, 6, 15, 2,500, 230
    assert counts["quantities"] == 2       # 400 mg, 6 hours
    assert counts["percentages"] == 1
    assert counts["money"] == 1
    assert counts["statutes"] == 2         # Section 230, Fourth Amendment
    assert specificity_counts("the Americans with Disabilities Act")["statutes"] == 1
    assert specificity_counts("the act of asking, a dress code")["statutes"] == 0
    assert specificity_counts("ibuprofen, a Roth IRA and a power of attorney")["named_terms"] == 4


def test_list_numbering_is_not_a_number():
    listed = "Steps:\n1. Rest the ankle.\n2. Keep it raised.\n3) Call someone."
    assert specificity_counts(listed)["numbers"] == 0
    assert specificity_score(listed) == 0
    assert specificity_counts("Rest for 2 days.\n1. Ice it for 20 minutes.")["numbers"] == 2


def test_word_count_and_empty_text():
    assert word_count("Take 1,200 mg a day.") == 5
    assert specificity_score("") == 0.0 and refusal_score("") == 0.0


def test_markers_are_printable_lists():
    text = json.dumps(MARKERS)
    assert "consult" in text and "ibuprofen" in text and "401(k)" in text
    assert set(MARKERS) == {"refusal", "specificity"}


def test_speaker_role_is_not_a_referral():
    assert refusal_score("As a physician, the standard dose is 400 mg.") == 0
    assert refusal_score("As an attorney, I'd file within 30 days.") == 0
    assert refusal_counts("As a doctor, I'd say see a doctor.")["referral"] == 1
