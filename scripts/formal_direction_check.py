"""Is the formal dimension's wrong-way figure the casualness markers' sparsity, or the knob? Re-score stored sweeps.

The formal sweeps' wrong-way fraction (prompts whose casualness rises from alpha 0 to 1) is 21%. Casualness counts
about 0.8 markers per answer, so one marker can decide a prompt. This script re-scores the answers the sweeps
already stored (no generation) with two dense measures that every word feeds, and reports for each measure:

- how often it ranks the held-out pairs the way the data does (chosen more formal than rejected): a measure that
  disagrees with the preference data cannot judge the knob;
- the fraction of prompts that move the wrong way from alpha 0 to 1, 1.5 and 2 (ties: unmoved);
- the same fraction for the knob's training target: the held-out pairs' chosen answers (SmolLM2 under the formal
  instruction, which alpha 1 internalises) against the sweep's alpha-0 answers to the same prompts;
- with `--instructed FILE`, the same for the formal instruction itself decoded as the sweep decodes (greedy, the
  sweep's token budget, no repetition penalty, which the stored pairs had): the answers are generated once (the
  one step of this script that runs the model, ~1 min) and kept in FILE.

Measures (lower = more formal, as every metric of `peft_clm.tools.text_metrics`): `casualness`; `neg_word_length`,
minus the mean characters per word (formal prose uses longer words); `personal_pronouns`, first- and second-person
pronouns per 100 words (a closed word class, so it needs no tagger).

    python scripts/formal_direction_check.py results/formal/sweep.json \
        results/modes/formal_{hidden,weights}/sweep.json results/baselines/formal_lora_scale/sweep.json \
        --out results/formal/direction_check.json
    python scripts/formal_direction_check.py results/formal_wide/formal/sweep.json \
        results/formal_wide/formal_best8/sweep.json --no-pairs --out results/formal_wide/direction_check.json
        # sweeps of prompts without pairs: only the sweeps' own wrong-way fractions
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peft_clm.tools.text_metrics import casualness, words  # noqa: E402


PERSONAL = {"i", "me", "my", "mine", "you", "your", "yours", "we", "us", "our", "ours"}


def neg_word_length(text: str) -> float:
    ws = words(text)
    return -statistics.mean(len(w) for w in ws) if ws else 0.0


def personal_pronouns(text: str) -> float:
    ws = [w.lower().split("'")[0] for w in words(text)]  # "you're" counts as "you"
    return 100.0 * sum(w in PERSONAL for w in ws) / len(ws) if ws else 0.0


MEASURES = {"casualness": casualness, "neg_word_length": neg_word_length, "personal_pronouns": personal_pronouns}


def content(message) -> str:
    return message[-1]["content"] if isinstance(message, list) else message


def moves(after: list[str], before: list[str], measure) -> dict:
    """Per prompt, `measure` of the answer after minus before: the fractions that rise (the wrong way: every measure
    here is lower = more formal) or stay, and the mean change."""
    moved = [measure(a) - measure(b) for a, b in zip(after, before, strict=True)]
    return {
        "wrong_way": sum(m > 0 for m in moved) / len(moved),
        "unmoved": sum(m == 0 for m in moved) / len(moved),
        "mean_change": statistics.mean(moved),
    }


def by_base_answer(at: dict, alphas: list[float]) -> dict:
    """Casualness wrong-way counts split by where a prompt starts: its alpha-0 answer casual (> 0: a casual marker in
    excess, which the knob can remove) or not (<= 0: only a word of the formal list can lower it further, and the
    same markers in a longer answer read as a rise towards 0)."""
    base = [casualness(t) for t in at[0.0]]
    groups = {"casual": [i for i, b in enumerate(base) if b > 0],
              "not_casual": [i for i, b in enumerate(base) if b <= 0]}

    def wrong_way(a: float, idx: list[int]) -> int:  # `moves`' rule, counted over the group
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return round(moves(pick(at[a]), pick(at[0.0]), casualness)["wrong_way"] * len(idx)) if idx else 0

    return {k: {"n": len(idx), **{str(a): wrong_way(a, idx) for a in alphas}} for k, idx in groups.items()}


def swept_prompts(sweep: dict, pairs: list[dict]) -> list[str]:
    """The user prompts of the sweep's answers, in order: the first held-out pairs' prompts, checked against the
    prompts the sweep recorded (when it did), so that no answer is compared with another prompt's answer."""
    n = len(sweep["answers"]["0.0"])
    if len(pairs) < n:
        raise SystemExit(f"the sweep answered {n} prompts; --pairs has only {len(pairs)}.")
    prompts = [content(p["prompt"]) for p in pairs[:n]]
    recorded = [r["prompt"] for r in sweep.get("reliability", {}).get("per_prompt", [])]
    if recorded and [content(r) for r in recorded] != prompts:
        raise SystemExit("the sweep's prompts are not the first prompts of --pairs in order.")
    return prompts


def instructed_answers(path: Path, pairs: list[dict], sweep: dict) -> list[str]:
    """SmolLM2's greedy answers under the formal instruction to the swept prompts, decoded as the sweep decodes (its
    max_new_tokens); read from `path` when it holds them for the same prompts, instruction and budget, else
    generated and written there (a file for other prompts is refused, never overwritten)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", Path(__file__).parent / "build_preference_data.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    system, prompts, budget = build.INSTRUCTIONS["formal"][0], swept_prompts(sweep, pairs), sweep["max_new_tokens"]
    key = {"instruction": system, "prompts": prompts, "max_new_tokens": budget}
    if path.exists():
        stored = json.loads(path.read_text())
        if {k: stored.get(k) for k in key} != key:
            raise SystemExit(f"{path} holds answers for other prompts, instruction or budget; delete it to rebuild.")
        return stored["answers"]
    from peft_clm.tools.generation import generate_answers
    from peft_clm.tools.loading import load_model

    model, tokenizer = load_model("smollm2")
    messages = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in prompts]
    answers = generate_answers(model, tokenizer, messages, [None], budget, progress=False)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**key, "answers": answers}, indent=1) + "\n")
    tmp.replace(path)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="sweep.json files of the formal dimension")
    parser.add_argument("--pairs", help="the held-out pairs the sweeps answered (default data/formal/heldout.jsonl)")
    parser.add_argument("--alphas", default="1,1.5,2")
    parser.add_argument("--out", default=None)
    parser.add_argument("--instructed", default=None, help="JSON of the instructed answers (generated if missing)")
    parser.add_argument("--no-pairs", action="store_true", help="the sweeps' own wrong-way fractions only, for sweeps "
                        "of other prompts than the held-out pairs' (e.g. data/formal/heldout_wide.jsonl)")
    args = parser.parse_args()
    if args.no_pairs and (args.instructed or args.pairs):
        parser.error("--no-pairs reads no pairs: drop --pairs and --instructed (which answers the pairs' prompts)")
    args.pairs = None if args.no_pairs else args.pairs or "data/formal/heldout.jsonl"
    pairs = [] if args.no_pairs else [
        json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()
    ]
    if not args.no_pairs and not pairs:
        raise SystemExit(f"--pairs {args.pairs} holds no pairs (for sweeps without pairs give --no-pairs).")
    first = json.loads(Path(args.sweeps[0]).read_text())
    instructed = instructed_answers(Path(args.instructed), pairs, first) if args.instructed else None
    result = {"pairs": args.pairs, "pair_agreement": {}, "sweeps": {}}
    for name, f in MEASURES.items() if pairs else ():
        diffs = [f(content(p["chosen"])) - f(content(p["rejected"])) for p in pairs]
        result["pair_agreement"][name] = {
            "chosen_more_formal": sum(d < 0 for d in diffs) / len(diffs),
            "tie": sum(d == 0 for d in diffs) / len(diffs),
        }
    alphas = [float(a) for a in args.alphas.split(",")]
    for path in args.sweeps:
        sweep = json.loads(Path(path).read_text())
        at = {float(k): v for k, v in sweep["answers"].items()}
        if 0.0 not in at or any(a not in at for a in alphas):
            raise SystemExit(f"{path}: answers at alphas {sorted(at)}; need 0 and {alphas}.")
        per = {name: {str(a): moves(at[a], at[0.0], f) for a in alphas} for name, f in MEASURES.items()}
        result.setdefault("by_base_answer", {})[path] = by_base_answer(at, alphas)
        # The knob's training target against the same base answers: the held-out pairs' chosen side is SmolLM2's
        # answer under the formal instruction that alpha 1 internalises (same prompts, in the sweep's order), so
        # its wrong-way fraction is what a knob that reproduced its data exactly would score at alpha 1.
        if not pairs:
            result["sweeps"][path] = per
            continue
        n = len(swept_prompts(sweep, pairs))
        chosen = [content(p["chosen"]) for p in pairs[:n]]
        per["instructed"] = {name: moves(chosen, at[0.0], f) for name, f in MEASURES.items()}
        if instructed is not None:
            if len(instructed) != n:
                raise SystemExit(f"{path} answered {n} prompts, the instructed answers are for {len(instructed)}.")
            per["instructed_greedy"] = {name: moves(instructed, at[0.0], f) for name, f in MEASURES.items()}
        result["sweeps"][path] = per
    if pairs:
        print(f"held-out pairs ({len(pairs)}): chosen more formal than rejected / tie")
    for name, v in result["pair_agreement"].items():
        print(f"  {name:30s} {v['chosen_more_formal']:.2f} / {v['tie']:.2f}")
    print("wrong-way fraction from alpha 0 to " + ", ".join(f"{a:g}" for a in alphas) + " (unmoved in brackets)")
    for path, per in result["sweeps"].items():
        for name, by in per.items():
            if name.startswith("instructed"):  # the data's and the instruction's rows, printed below
                continue
            cells = "  ".join(f"{by[str(a)]['wrong_way']:.2f} ({by[str(a)]['unmoved']:.2f})" for a in alphas)
            print(f"  {path:48s} {name:30s} {cells}")
    print("casualness wrong-way count by the alpha-0 answer: casual (> 0) / not (<= 0), from alpha 0 to "
          + ", ".join(f"{a:g}" for a in alphas))
    for path, split in result["by_base_answer"].items():
        cells = "  ".join(" / ".join(f"{split[k][str(a)]} of {split[k]['n']}" for k in ("casual", "not_casual"))
                          for a in alphas)
        print(f"  {path:48s} {cells}")
    if pairs:
        print("the training target (the formal-instructed answers of the held-out pairs) against the same alpha-0 "
              "answers")
    for path, per in result["sweeps"].items() if pairs else ():
        if "instructed_greedy" in per:
            by = per["instructed_greedy"]
            cells = "  ".join(f"{n} {v['wrong_way']:.2f} ({v['unmoved']:.2f})" for n, v in by.items())
            print(f"  {path:48s} instruction decoded as the sweep: {cells}")
        cells = "  ".join(f"{name} {v['wrong_way']:.2f} ({v['unmoved']:.2f})" for name, v in per["instructed"].items())
        print(f"  {path:48s} {cells}")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)


if __name__ == "__main__":
    main()
