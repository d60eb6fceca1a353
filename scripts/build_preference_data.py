"""Rebuild the shipped preference data from SmolLM2's own answers (deterministic: greedy decoding).

For each prompt the model answers twice, under two contrasting system instructions; the pair (prompt without
any instruction, preferred answer, other answer) teaches the CLM layer to internalise the instruction, so that the
alignment knob replaces a long instruction prompt. Two independent dimensions, each split into train/held-out by
prompt:

- concise: graded lengths. The rejected answer is the model's answer under "answer in rich detail" (64 tokens);
  the chosen answer is the same answer cut after its first k complete sentences, k drawn per prompt (seeded) from
  1 .. the most that still leaves it shorter than the rejected one, so the chosen lengths range over one to four
  sentences (about 15 to 60 words) instead of all being one sentence. Both sides share their opening, so the
  pairs teach where to stop, by degrees; metric: words per answer. (The first version took the first sentence of
  a separate "one short sentence" answer: every chosen answer was one sentence, so words per answer floored there
  and alpha above 1 could not shorten further.)
- formal: "formal, professional register" (chosen) vs "casual, chatty register" (rejected); metric:
  `peft_clm.tools.text_metrics.casualness` (transparent marker counts), which training never sees.

    python scripts/build_preference_data.py --out data        # ~8 min on 2 CPU cores
    python scripts/build_preference_data.py --out data --dimensions formal --register-only
        # register-only formal pairs from the casual answers already in data/formal (no model run): the chosen side
        # is the casual answer rewritten by the formal instruction's rules (`formalize`), so content is shared
    python scripts/build_preference_data.py --out data --dimensions formal --best-of 8 --batch-size 64   # ~8 min
        # best-of-8 formal train pairs (train_best_of_8.jsonl): the chosen side is the least casual of the greedy
        # formal answer and 8 sampled ones (seeded; the draws depend on --batch-size, 64 for the shipped file),
        # the rejected side the casual answer already in data/formal
    python scripts/build_preference_data.py --out data --dimensions formal --wide-heldout data/domains_more
        # heldout_wide.jsonl: the formal held-out pairs plus the 60 general questions of the domains data (no run)
    python scripts/build_preference_data.py --out data --dimensions concise --regrade
        # the concise pairs from the detailed answers already in data/concise (no model run; the same pairs, since
        # decoding is greedy and the draws are seeded)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from peft_clm.tools.alpha_pairs import mirrored_pairs
from peft_clm.tools.data import read_prompts
from peft_clm.tools.loading import load_model
from peft_clm.tools.text_metrics import S_CONTRACTION_HOSTS, casualness, is_degenerate


TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "compound interest", "vaccines",
    "the internet", "volcanoes", "climate change", "the moon landing", "machine learning", "earthquakes",
    "democracy", "the immune system", "electric cars", "the Roman Empire", "recycling", "gravity", "coffee",
    "the human heart", "rainbows", "inflation", "solar panels", "the printing press", "honey bees", "tides",
    "antibiotics", "the stock market", "glaciers", "jazz music", "the Olympic Games", "DNA", "wind turbines",
    "chess", "the Great Wall of China", "sleep", "bread baking", "the speed of light", "coral reefs", "elections",
]
TEMPLATES = [
    "What is {t}?",
    "Explain {t} to me.",
    "Why does {t} matter?",
    "Tell me something interesting about {t}.",
    "How would you describe {t} to a friend?",
    "What should everyone know about {t}?",
    "Give me a quick overview of {t}.",
]
INSTRUCTIONS = {
    "concise": (
        "Answer in one short sentence of at most fifteen words. No introduction, no lists, no follow-up.",
        "Answer in rich detail: several full paragraphs with background, examples, and a closing summary.",
    ),
    "formal": (
        "Reply in a formal, professional register: complete sentences, precise vocabulary, no contractions, "
        "no exclamation marks, no slang.",
        "Reply in a super casual, chatty way, like texting a buddy: use slang, contractions, words like 'hey', "
        "'gonna', 'kinda', 'awesome', and exclamation marks!",
    ),
}


def prompts(seed: int = 0) -> list[str]:
    all_prompts = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    random.Random(seed).shuffle(all_prompts)
    return all_prompts


@torch.no_grad()
def answer(
    model, tokenizer, system: str, questions: list[str], max_new_tokens: int, batch_size: int, samples: int = 0
) -> list[str]:
    """The model's answers to `questions` under the system instruction: greedy (one per question), or with
    `samples` > 0 that many sampled answers per question (temperature 0.8, top-p 0.95), question-major; seed torch
    first for reproducible samples."""
    tokenizer.padding_side = "left"
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "num_return_sequences": samples}
    out = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": q}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for q in chunk
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        gen = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            **(sampling if samples else {"do_sample": False}),
            repetition_penalty=1.15,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += [tokenizer.decode(g[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip() for g in gen]
        print(f"  {start + len(chunk)}/{len(questions)}", flush=True)
    return out


def sentence_ends(text: str) -> list[int]:
    """The offsets just after each complete sentence of `text` (a '.', '!' or '?' followed by space or the end)."""
    return [m.start() + 1 for m in re.finditer(r"[.!?](\s|$)", text)]


def graded_chosen(detailed: str, rng: random.Random) -> str | None:
    """The detailed answer cut after its first k complete sentences, k uniform over 1 .. the most that leaves the
    cut strictly shorter than `detailed`; None when it has no complete sentence to cut after.

    Example: a detailed answer "A. B. C" (two complete sentences and a partial one) gives "A." or "A. B."."""
    ends = [e for e in sentence_ends(detailed) if detailed[e:].strip()]  # a cut must leave something out
    if not ends:
        return None
    return detailed[: ends[rng.randrange(len(ends))]].strip()


# Register-only formal pairs: the chosen side is the casual answer itself, rewritten by the rules of the formal
# instruction ("complete sentences, precise vocabulary, no contractions, no exclamation marks, no slang"), so the
# two sides share their content and differ in register only. With the instructed pairs, content changes too (the
# two answers are two different texts), and at alpha 1 the knob moved the sparse register markers by less than
# greedy answers vary from prompt to prompt (21% of prompts the wrong way).
_PRONOUN_IS = "|".join(h for h in S_CONTRACTION_HOSTS if h != "let")  # "let's" has its own rule
# after 's only these mark "has" ("it's made of" is passive: "is"); after 'd a participle marks "had"
_HAS_AFTER = r"(?:been|got|gotten|had)\b"
_PARTICIPLE = r"(?:been|got|gotten|had|done|gone|seen|made|become|taken|given|known|\w+ed)\b"
_CONTRACTIONS = [  # (pattern, replacement); case of the first letter is kept by `_keep_case`
    (r"\bcan't\b", "cannot"), (r"\bwon't\b", "will not"), (r"\bshan't\b", "shall not"), (r"\bain't\b", "is not"),
    (r"\blet's\b", "let us"), (r"\b(\w+)n't\b", r"\1 not"), (r"\b(\w+)'re\b", r"\1 are"),
    (r"\b(\w+)'ve\b", r"\1 have"), (r"\b(\w+)'ll\b", r"\1 will"), (r"\b(i)'m\b", r"\1 am"),
    # before a past participle 's is "has" and 'd is "had" ("it's been", "they'd gone"), else "is" and "would"
    (rf"\b({_PRONOUN_IS})'s(?=\s+{_HAS_AFTER})", r"\1 has"), (rf"\b({_PRONOUN_IS})'s\b", r"\1 is"),
    (rf"\b(i|you|we|they|he|she|it)'d(?=\s+{_PARTICIPLE})", r"\1 had"),
    (r"\b(i|you|we|they|he|she|it)'d\b", r"\1 would"),
    (r"\bol'", "old"), (r"\by'know\b,?\s*", ""),
]
# casual word -> its formal counterpart ("" drops it); words with an ordinary sense too ("pretty", "fun", "stuff",
# "cool", "super") are left alone, since a rule cannot tell "look pretty" from "pretty good"
_SLANG = {
    "gonna": "going to", "wanna": "want to", "gotta": "have to", "kinda": "somewhat", "sorta": "somewhat",
    "awesome": "excellent", "totally": "entirely", "basically": "essentially", "literally": "", "yeah": "yes",
    "yep": "yes", "nope": "no", "folks": "people", "guys": "everyone", "amazing": "remarkable", "cuz": "because",
    "ya": "you", "lol": "", "omg": "", "tbh": "", "btw": "", "wow": "",
}
# interjections that only carry tone: at a sentence's start "Hey there!", "Okay,", "Well,", "So,"; anywhere
# "let me tell you,", "you know,", "dude,", "buddy," (a sentence-internal "well." or "so." is content)
_OPENER = re.compile(r"(^|[.!?]\s+|\n\s*)(?:hey|hi|oh|ok|okay|well|so)(?: there| man| buddy| dude)?[,!.]+\s*",
                     re.IGNORECASE)
_INTERJECTION = re.compile(r"\b(?:let me tell you|you know|dude|buddy)\s*,\s*", re.IGNORECASE)
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")


def _keep_case(match: re.Match, replacement: str) -> str:
    out = match.expand(replacement)
    return out[:1].upper() + out[1:] if match.group(0)[:1].isupper() and out else out


def formalize(text: str) -> str:
    """`text` in a formal register with its content kept: contractions expanded (possessives kept), slang replaced
    or dropped (`_SLANG`), tone-only interjections and emoji dropped, '!' and '...' made full stops, each sentence
    capitalised.

    Example:
        ```py
        >>> formalize("Hey buddy! It's kinda awesome... it's been the world's best, lol!")
        "It is somewhat excellent. It has been the world's best."
        ```
    """
    out = _EMOJI.sub("", text)
    out = _OPENER.sub(r"\1", _OPENER.sub(r"\1", out))  # twice: "Hey! Well, ..." opens with two
    out = _INTERJECTION.sub("", out)
    out = re.sub(r"(^|[.!?]\s+|\n\s*)(?:so|and),?\s+", r"\1", out, flags=re.IGNORECASE)  # chatty sentence openers
    for pattern, replacement in _CONTRACTIONS:
        out = re.sub(pattern, lambda m, r=replacement: _keep_case(m, r), out, flags=re.IGNORECASE)
    for word, replacement in _SLANG.items():
        out = re.sub(rf"\b{word}\b", lambda m, r=replacement: _keep_case(m, r), out, flags=re.IGNORECASE)
    out = re.sub(r"[!?]*!+[!?]*", lambda m: "?" if "?" in m.group(0) else ".", out)
    out = re.sub(r"\.{2,}|\u2026", ".", out)
    out = re.sub(r"[ \t]+([,.;:?])", r"\1", out)  # a dropped word leaves no space before punctuation
    out = re.sub(r",\s*([,.;:?])", r"\1", out)
    out = re.sub(r"[ \t]{2,}", " ", out).strip()
    out = re.sub(r"(^|[.?]\s+|\n\s*)([a-z])", lambda m: m.group(1) + m.group(2).upper(), out)
    return out


def register_rows(rows: list[dict]) -> list[dict]:
    """Register-only pairs from instructed formal pairs: (question, formalize(casual answer), casual answer); pairs
    whose casual answer has nothing to rewrite are left out (chosen and rejected would be the same text)."""
    out = []
    for r in rows:
        casual = r["rejected"][0]["content"]
        formal = formalize(casual)
        if formal and formal != casual:
            out.append(pair(r["prompt"][0]["content"], formal, casual))
    return out


# Best-of-n formal pairs: the instructed formal answers are not reliably more formal than the base model's own
# answer (29% of held-out prompts move the wrong way on casualness from the base answer to the chosen one), and a
# knob that reproduces its data inherits that. Rejection sampling picks, per question, the most formal of the
# greedy answer and n sampled ones under the same instruction, scored by casualness (the measure a user checks);
# the direction check's dense measures (word length, personal pronouns) never take part in the choice, so they
# stay an independent check of the register.
def best_of_rows(rows: list[dict], samples: list[list[str]]) -> list[dict]:
    """Formal pairs whose chosen side is the least casual of (the row's chosen answer, *its samples*); ties keep
    the earlier candidate, degenerate candidates (`is_degenerate`) and copies of the rejected side never win.

    Example: a row chosen "It's cool." with samples ["It is essential.", "Hey!"] gets chosen "It is essential."."""
    out = []
    for row, candidates in zip(rows, samples, strict=True):
        rejected = row["rejected"][0]["content"]
        pool = [row["chosen"][0]["content"], *candidates]
        pool = [c for c in pool if c and c != rejected and not is_degenerate(c)]
        if pool:
            out.append(pair(row["prompt"][0]["content"], min(pool, key=casualness), rejected))
    return out


def write_split(out: Path, rows: list[dict], heldout_prompts: set[str]) -> dict:
    """train.jsonl / heldout.jsonl (split by prompt), each written to a temporary file and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    split = {
        "heldout": [r for r in rows if r["prompt"][0]["content"] in heldout_prompts],
        "train": [r for r in rows if r["prompt"][0]["content"] not in heldout_prompts],
    }
    for name, part in split.items():
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
    return split


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def concise_rows(questions: list[str], detailed: list[str], seed: int = 0) -> list[dict]:
    """Graded concise pairs: (question, detailed answer cut after k sentences, detailed answer); one seeded draw
    per question, in question order, so the same answers always give the same pairs."""
    rng = random.Random(seed)
    rows = []
    for q, d in zip(questions, detailed):
        chosen = graded_chosen(d, rng)
        if chosen and d and chosen != d:
            rows.append(pair(q, chosen, d))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data")
    parser.add_argument("--n-prompts", type=int, default=240)
    parser.add_argument("--heldout", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--dimensions", default="concise,formal")
    parser.add_argument("--regrade", action="store_true",
                        help="concise only: rebuild the pairs from the detailed answers already in --out/concise")
    parser.add_argument("--register-only", action="store_true",
                        help="formal only: write train_register.jsonl and heldout_register.jsonl from the casual "
                        "answers already in --out/formal (chosen: formalize(casual); no model run)")
    parser.add_argument("--two-ended", action="store_true",
                        help="also write train_two_ended.jsonl: each train pair at alpha +1 and its mirror at -1 "
                        "(peft_clm.tools.alpha_pairs.mirrored_pairs)")
    parser.add_argument("--best-of", type=int, default=0, metavar="N",
                        help="formal only: write train_best_of_N.jsonl from the train pairs already in --out/formal: "
                        "the chosen side is the least casual of the greedy formal answer and N sampled ones")
    parser.add_argument("--wide-heldout", metavar="DOMAINS_DIR",
                        help="formal only: write heldout_wide.jsonl, the held-out pairs plus the general questions of "
                        "DOMAINS_DIR's train and held-out files (no model run; the formal knob never saw either)")
    args = parser.parse_args()
    one_step = [f"--{k.replace('_', '-')}" for k in ("best_of", "wide_heldout", "regrade", "register_only")
                if getattr(args, k)]
    if len(one_step) > 1:
        parser.error(f"{' and '.join(one_step)} are separate rebuilds: give one at a time.")
    if args.best_of and args.best_of < 1:
        parser.error(f"--best-of takes a number of samples >= 1, got {args.best_of}.")
    if args.two_ended and (args.best_of or args.wide_heldout):
        parser.error("--two-ended mirrors the train pairs of a full or --regrade build, not --best-of/--wide-heldout.")
    if args.wide_heldout:
        if args.dimensions != "formal":
            parser.error("--wide-heldout widens the formal held-out prompts only: give --dimensions formal.")
        out = Path(args.out) / "formal"
        rows = [json.loads(line) for line in (out / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
        seen = {json.dumps(r["prompt"]) for r in rows}
        for name in ("train", "heldout"):
            for prompt in read_prompts(Path(args.wide_heldout) / f"{name}.jsonl", domain="general")[0]:
                if json.dumps(prompt) not in seen:
                    seen.add(json.dumps(prompt))
                    rows.append({"prompt": prompt})
        tmp = out / "heldout_wide.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / "heldout_wide.jsonl")
        print(f"formal: {len(rows)} wide held-out prompts")
        return
    if args.best_of:
        if args.dimensions != "formal":
            parser.error("--best-of rebuilds the formal train pairs only: give --dimensions formal.")
        out = Path(args.out) / "formal"
        rows = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        model, tokenizer = load_model("smollm2")
        torch.manual_seed(0)
        t0 = time.time()
        flat = answer(model, tokenizer, INSTRUCTIONS["formal"][0], [r["prompt"][0]["content"] for r in rows], 48,
                      max(1, args.batch_size // args.best_of), samples=args.best_of)
        samples = [flat[i * args.best_of : (i + 1) * args.best_of] for i in range(len(rows))]
        best = best_of_rows(rows, samples)
        target = out / f"train_best_of_{args.best_of}.jsonl"
        tmp = target.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in best), encoding="utf-8")
        tmp.replace(target)
        mean = lambda rs: sum(casualness(r["chosen"][0]["content"]) for r in rs) / max(1, len(rs))  # noqa: E731
        print(f"formal: {len(best)} best-of-{args.best_of} train pairs of {len(rows)} ({len(rows) - len(best)} "
              f"dropped: no fluent candidate) in {time.time() - t0:.0f} s; mean chosen casualness "
              f"{mean(rows):.2f} -> {mean(best):.2f} per 100 words")
        return
    if args.regrade and args.dimensions != "concise":
        parser.error("--regrade rebuilds the concise pairs only: give --dimensions concise.")
    if args.register_only:
        if args.dimensions != "formal":
            parser.error("--register-only rebuilds the formal pairs only: give --dimensions formal.")
        out = Path(args.out) / "formal"
        for name in ("train", "heldout"):
            rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
            register = register_rows(rows)
            tmp = out / f"{name}_register.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in register), encoding="utf-8")
            tmp.replace(out / f"{name}_register.jsonl")
            print(f"formal: {len(register)} register-only {name} pairs (of {len(rows)}; the rest: nothing to rewrite)")
        return
    torch.manual_seed(0)
    model, tokenizer = (None, None) if args.regrade else load_model("smollm2")
    questions = prompts()[: args.n_prompts]
    n_heldout = int(len(questions) * args.heldout)
    heldout_prompts = set(questions[:n_heldout])
    for dim in args.dimensions.split(","):
        chosen_instr, rejected_instr = INSTRUCTIONS[dim]
        t0 = time.time()
        out = Path(args.out) / dim
        if dim == "concise":
            if args.regrade:  # the detailed answers are the rejected side of the existing pairs
                by_prompt = {}
                for name in ("train", "heldout"):
                    for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
                        row = json.loads(line)
                        by_prompt[row["prompt"][0]["content"]] = row["rejected"][0]["content"]
                detailed = [by_prompt.get(q, "") for q in questions]
            else:
                print(f"{dim}: detailed answers", flush=True)
                detailed = answer(model, tokenizer, rejected_instr, questions, 64, args.batch_size)
            rows = concise_rows(questions, detailed)
        else:
            print(f"{dim}: chosen side", flush=True)
            chosen = answer(model, tokenizer, chosen_instr, questions, 48, args.batch_size)
            print(f"{dim}: rejected side", flush=True)
            rejected = answer(model, tokenizer, rejected_instr, questions, 48, args.batch_size)
            rows = [pair(q, c, r) for q, c, r in zip(questions, chosen, rejected) if c and r and c != r]
        split = write_split(out, rows, heldout_prompts)
        if args.two_ended:
            tmp = out / "train_two_ended.jsonl.tmp"
            tmp.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mirrored_pairs(split["train"])),
                encoding="utf-8",
            )
            tmp.replace(out / "train_two_ended.jsonl")
        print(
            f"{dim}: {len(split['train'])} train / {len(split['heldout'])} held-out pairs in {time.time() - t0:.0f} s"
        )


if __name__ == "__main__":
    main()
