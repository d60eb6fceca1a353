"""Rebuild the shipped preference data from SmolLM2's own answers (deterministic: greedy decoding).

For each prompt the model answers twice, under two contrasting system instructions; the pair (prompt without
any instruction, preferred answer, other answer) teaches the CLM layer to internalise the instruction, so that the
alignment knob replaces a long instruction prompt. Two independent dimensions, each split into train/held-out by
prompt:

- concise: "answer in one short sentence" (chosen, cut after its first sentence, which is what the instruction
  asks and what the 135M model does not always stop at) vs "answer in detail" (rejected); metric: words per answer.
- formal: "formal, professional register" (chosen) vs "casual, chatty register" (rejected); metric:
  `peft_clm.tools.text_metrics.casualness` (transparent marker counts), which training never sees.

    python scripts/build_preference_data.py --out data        # ~8 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from peft_clm.tools.loading import load_model


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
def answer(model, tokenizer, system: str, questions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    tokenizer.padding_side = "left"
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
            do_sample=False,
            repetition_penalty=1.15,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += [tokenizer.decode(g[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip() for g in gen]
        print(f"  {start + len(chunk)}/{len(questions)}", flush=True)
    return out


def first_sentence(text: str) -> str:
    """The text up to the end of its first sentence (all of it when no sentence ends)."""
    match = re.search(r"[.!?](\s|$)", text)
    return text[: match.start() + 1] if match else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data")
    parser.add_argument("--n-prompts", type=int, default=240)
    parser.add_argument("--heldout", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--dimensions", default="concise,formal")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    questions = prompts()[: args.n_prompts]
    n_heldout = int(len(questions) * args.heldout)
    for dim in args.dimensions.split(","):
        chosen_instr, rejected_instr = INSTRUCTIONS[dim]
        t0 = time.time()
        print(f"{dim}: chosen side", flush=True)
        chosen = answer(model, tokenizer, chosen_instr, questions, 64 if dim == "concise" else 48, args.batch_size)
        if dim == "concise":
            chosen = [first_sentence(c) for c in chosen]
        print(f"{dim}: rejected side", flush=True)
        rejected = answer(model, tokenizer, rejected_instr, questions, 64 if dim == "concise" else 48, args.batch_size)
        rows = [
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for q, c, r in zip(questions, chosen, rejected)
            if c and r and c != r
        ]
        out = Path(args.out) / dim
        out.mkdir(parents=True, exist_ok=True)
        split = {
            "heldout": [r for r in rows if r["prompt"][0]["content"] in set(questions[:n_heldout])],
            "train": [r for r in rows if r["prompt"][0]["content"] not in set(questions[:n_heldout])],
        }
        for name, part in split.items():
            tmp = out / f"{name}.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
            tmp.replace(out / f"{name}.jsonl")
        print(
            f"{dim}: {len(split['train'])} train / {len(split['heldout'])} held-out pairs in {time.time() - t0:.0f} s"
        )


if __name__ == "__main__":
    main()
