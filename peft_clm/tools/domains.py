"""Transparent markers of the three answer levels of the Alignment Vectors data (avoid / generic / expert).

Two pure functions over an answer's text, from fixed lists and regexes (no model), printed by `MARKERS`:

- `refusal_score(text)`: how many decline phrases ("I can't give ...", "I'm not a doctor") and referral phrases
  ("consult", "a lawyer", "financial advisor") the answer contains. A count per answer, not a rate: one decline
  and one referral is already a clear "avoid" answer however long the text.
- `specificity_score(text)`: specific details per 100 words: numbers (not list numbering), percentages, money
  amounts, quantities with a unit (dosages, durations, sizes), statute or rule references ("Section 8", "§ 230",
  "the Fair Labor Standards Act", "the Fourth Amendment"), and named professional terms (drug names, medical
  tests, legal instruments, financial products). A number with a unit counts twice (the number and the
  quantity): a dosage is more specific than a bare number.

Both lower-case the text and read curly apostrophes as straight ones. `refusal_score` and `specificity_score`
are what `scripts/build_domain_data.py` prints per domain and level to check that the levels differ.

    >>> refusal_score("I can't give medical advice, so please ask a doctor.")
    3.0
    >>> round(specificity_score("Take 400 mg of ibuprofen every 6 hours."), 1)
    62.5
"""

from __future__ import annotations

import re
from collections.abc import Iterable


# Phrases that decline to answer. Longest alternatives first in the regex, so "i can't give" is one hit.
DECLINE_PHRASES = (
    "i can't", "i cannot", "i can not", "i'm not able to", "i am not able to", "i'm unable to", "i am unable to",
    "i won't", "i will not", "i'd rather not", "i would rather not", "i must decline", "i'm not in a position",
    "i am not in a position", "i'm not qualified", "i am not qualified", "i'm not a doctor", "i am not a doctor",
    "i'm not a lawyer", "i am not a lawyer", "i'm not a financial", "i am not a financial", "not a substitute for",
    "beyond what i can", "outside what i can", "i don't give", "i do not give", "i shouldn't", "i should not",
    "not able to give", "not able to provide", "can't advise", "cannot advise", "unable to advise",
    # The assistant-style non-answers SmolLM2 gives unprompted ("As an AI ... I don't have the ability to ...").
    "as an ai", "i don't have the ability to", "i do not have the ability to", "i'm sorry, but",
)
# Phrases that send the user to someone else (a professional or a service).
REFERRAL_PHRASES = (
    "consult", "please ask", "ask a", "ask an", "ask your", "talk to", "speak with", "speak to", "check with",
    "reach out to", "contact a", "contact an", "contact your", "seek", "see a doctor", "see your doctor",
    "a professional", "a qualified", "a licensed", "your doctor", "a doctor", "a physician", "your physician",
    "healthcare provider", "health care provider", "pharmacist", "a lawyer", "an attorney", "your attorney",
    "your lawyer", "legal aid", "financial advisor", "financial adviser", "financial planner", "tax professional",
    "an accountant", "a cpa", "an expert", "a specialist",
)

# Named professional terms: drugs, tests and devices; legal instruments and doctrines; financial products.
MEDICAL_TERMS = (
    "ibuprofen", "acetaminophen", "paracetamol", "aspirin", "naproxen", "amoxicillin", "penicillin", "azithromycin",
    "doxycycline", "cephalexin", "metformin", "insulin", "statin", "statins", "atorvastatin", "simvastatin",
    "lisinopril", "amlodipine", "omeprazole", "famotidine", "antacid", "antacids", "antihistamine",
    "antihistamines", "cetirizine", "loratadine", "diphenhydramine", "epinephrine", "prednisone",
    "hydrocortisone", "corticosteroid", "corticosteroids", "melatonin", "levothyroxine", "ssri", "ssris",
    "sertraline", "fluoxetine", "allopurinol", "colchicine", "albuterol", "inhaler", "nsaid", "nsaids",
    "triptan", "triptans", "sumatriptan", "benzoyl", "retinoid", "retinoids", "tretinoin", "oral rehydration",
    "electrolyte", "electrolytes", "a1c", "hba1c", "ecg", "ekg", "mri", "ct scan", "x-ray", "ultrasound",
    "biopsy", "blood test", "rice method", "systolic", "diastolic", "ldl", "hdl", "triglycerides",
    "tsh", "bmi", "cbc", "glucose",
)
LEGAL_TERMS = (
    "statute", "statutes", "plaintiff", "defendant", "tort", "subpoena", "affidavit", "jurisdiction",
    "miranda", "habeas corpus", "injunction", "probate", "executor", "intestate", "intestacy", "deed",
    "small claims", "breach of contract", "liability", "negligence", "damages", "escrow",
    "arraignment", "indictment", "misdemeanor", "felony", "expungement", "restraining order", "protective order",
    "power of attorney", "living trust", "prenuptial", "non-compete", "cease and desist", "llc",
    "articles of organization", "fair use", "copyright office", "uspto", "trademark", "patent", "eeoc",
    "flsa", "fdcpa", "ada", "osha", "due process", "precedent", "notarized", "notary", "chapter 7",
    "chapter 13", "guardian ad litem", "implied consent", "statute of limitations",
)
FINANCIAL_TERMS = (
    "401(k)", "403(b)", "ira", "roth", "hsa", "fsa", "529", "etf", "etfs", "index fund", "index funds",
    "mutual fund", "mutual funds", "reit", "reits", "s&p 500", "dow jones", "nasdaq", "treasury", "treasuries",
    "t-bills", "fdic", "fico", "apr", "apy", "expense ratio", "dividend", "dividends", "capital gains",
    "marginal tax rate", "tax bracket", "amortization", "principal", "escrow", "pmi", "refinance", "annuity",
    "fiduciary", "rmd", "required minimum distribution", "debt-to-income", "credit utilization", "cd", "cds",
    "bond", "bonds", "basis points", "rebalancing", "asset allocation", "irs", "schedule c",
    "form 1040", "w-2", "1099", "social security", "medicare",
)
NAMED_TERMS = tuple(sorted(set(MEDICAL_TERMS + LEGAL_TERMS + FINANCIAL_TERMS)))

UNITS = (
    "mg", "mcg", "µg", "g", "kg", "ml", "l", "iu", "units", "unit", "mmhg", "bpm", "°c", "°f", "degrees",
    "seconds", "minutes", "minute", "hours", "hour", "days", "day", "weeks", "week", "months", "month", "years",
    "year", "cm", "mm", "inches", "inch", "feet", "ft", "miles", "km", "calories", "kcal", "oz", "ounces", "cups",
    "cup", "tablespoons", "tbsp", "teaspoons", "tsp", "liters", "litres", "grams", "pounds", "lbs", "times",
    "doses", "tablets", "pills", "servings", "dollars", "euros",
)

# A number: digits, optionally with thousands separators or decimals ("1,500", "2.5").
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
# List numbering at the start of a line ("1. ", "2) ") is layout, not a detail.
_LIST_NUMBER = re.compile(r"(?m)^\s*\d+[.)]\s")
_PERCENT = re.compile(r"\d\s?%|\bpercent\b|\bper cent\b")
_MONEY = re.compile(r"[$€£]\s?\d")
_QUANTITY = re.compile(r"\d(?:[\d.,]*)\s?(?:-\s?\d[\d.,]*\s?)?(?:" + "|".join(map(re.escape, UNITS)) + r")(?![\w])")
# References to a statute, rule or provision by number or by name.
_STATUTE = re.compile(
    r"(?:\b(?:section|sec\.|article|title|rule|chapter|regulation|clause)\s+\d+|§\s?\d+|\bu\.s\.c\.?(?![\w])"
    r"|\b(?:first|second|fourth|fifth|sixth|eighth|fourteenth)\s+amendment\b)"
)
# A named law, read on the original case: capitalised words ending in Act or Code ("Fair Housing Act").
_NAMED_LAW = re.compile(r"\b(?:[A-Z][A-Za-z.&'-]*\s(?:of\s|and\s)?){1,6}(?:Act|Code)\b")


def _phrase_regex(phrases: Iterable[str]) -> re.Pattern:
    alternatives = sorted(set(phrases), key=len, reverse=True)
    return re.compile(r"(?<![\w])(?:" + "|".join(map(re.escape, alternatives)) + r")(?![\w])")


_DECLINE = _phrase_regex(DECLINE_PHRASES)
_REFERRAL = _phrase_regex(REFERRAL_PHRASES)
_TERMS = _phrase_regex(NAMED_TERMS)
_ROLE = re.compile(r"\b(?:as|i'm|i am) (?:a|an|your) (?:[a-z-]+ ){0,2}?(?:doctor|physician|lawyer|attorney|"
                   r"professional|specialist|expert|pharmacist|financial (?:advisor|adviser|planner)|accountant)\b")
# A word: letters/digits, with inner apostrophes, dots and hyphens; "1,200" is one word.
_WORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9'’.-]|,(?=\d))*")


def _normalise(text: str) -> str:
    return text.lower().replace("’", "'").replace("‘", "'")


def word_count(text: str) -> int:
    """Words (runs of letters/digits), the denominator of `specificity_score`.

    >>> word_count("Take 400 mg twice a day.")
    6
    """
    return len(_WORD.findall(text))


def refusal_counts(text: str) -> dict[str, int]:
    """Decline and referral phrase hits, separately.

    >>> refusal_counts("I'm not a lawyer; please consult an attorney.")
    {'decline': 1, 'referral': 2}
    """
    t = _normalise(text)
    # Referrals are counted outside the decline phrases, so "I'm not a lawyer" is one decline, not a referral too,
    # and outside a speaker's role ("As a physician, ..." names who answers, not whom to ask).
    rest = _ROLE.sub(" | ", _DECLINE.sub(" | ", t))
    return {"decline": len(_DECLINE.findall(t)), "referral": len(_REFERRAL.findall(rest))}


def refusal_score(text: str) -> float:
    """Decline phrases + referral phrases in the answer (a count per answer; lists in `MARKERS`).

    >>> refusal_score("Drink water and rest.")
    0.0
    """
    counts = refusal_counts(text)
    return float(counts["decline"] + counts["referral"])


def specificity_counts(text: str) -> dict[str, int]:
    """Hits of each specificity marker (numbers exclude list numbering).

    >>> specificity_counts("Save 15% of $4,000 in a Roth IRA for 30 years.")["named_terms"]
    2
    """
    t = _normalise(text)
    no_lists = _LIST_NUMBER.sub(" ", t)
    return {
        "numbers": len(_NUMBER.findall(no_lists)),
        "percentages": len(_PERCENT.findall(t)),
        "money": len(_MONEY.findall(t)),
        "quantities": len(_QUANTITY.findall(no_lists)),
        "statutes": len(_STATUTE.findall(t)) + len(_NAMED_LAW.findall(text)),
        "named_terms": len(_TERMS.findall(t)),
    }


def specificity_score(text: str) -> float:
    """Specific details (numbers, %, money, quantities with units, statutes, named terms) per 100 words.

    >>> specificity_score("It depends; talk to someone you trust.")
    0.0
    """
    n = word_count(text)
    if n == 0:
        return 0.0
    return 100.0 * sum(specificity_counts(text).values()) / n


MARKERS = {
    "refusal": {"decline_phrases": sorted(DECLINE_PHRASES), "referral_phrases": sorted(REFERRAL_PHRASES)},
    "specificity": {
        "named_terms": {"medical": sorted(MEDICAL_TERMS), "legal": sorted(LEGAL_TERMS),
                        "financial": sorted(FINANCIAL_TERMS)},
        "units": sorted(UNITS),
        "regexes": {"numbers": _NUMBER.pattern, "list_numbering_excluded": _LIST_NUMBER.pattern,
                    "percentages": _PERCENT.pattern, "money": _MONEY.pattern, "quantities": _QUANTITY.pattern,
                    "statutes": _STATUTE.pattern, "named_laws": _NAMED_LAW.pattern},
    },
}
