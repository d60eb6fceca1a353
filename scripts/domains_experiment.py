"""The Alignment Vectors experiment (arXiv 2410.19206) with CLM knobs: three domains, three levels, one knob each.

Stages (each writes JSON under --results, default results/domains; `report` joins them into tables, CSV and plots):

    python scripts/domains_experiment.py pairs                 # data/domains -> per-domain DPO pairs (ordinal)
    python scripts/domains_experiment.py train --kind clm      # one CLM adapter per domain
    python scripts/domains_experiment.py train --kind full     # full DPO per domain, for alignment vectors
    python scripts/domains_experiment.py train --kind clm --pooled   # one pooled adapter: the retraining cost
    python scripts/domains_experiment.py score --kind clm      # 1-D sweeps, leakage, 3-knob grid, 27 combinations
    python scripts/domains_experiment.py score --kind vectors  # the same with full-checkpoint vectors
    python scripts/domains_experiment.py markers               # generated answers: markers vs likelihood level
    python scripts/domains_experiment.py decompose             # references' likelihood: opening vs continuation
    python scripts/domains_experiment.py knob-search           # per-level: 27 combinations over six signed knobs
    python scripts/domains_experiment.py knob-search --kind vectors   # the same over six full-DPO vectors
    python scripts/domains_experiment.py routed --scores-from R # the same, each question at its route's setting
    python scripts/domains_experiment.py report                # tables, CSV, plots

The level of the model on a held-out question is the reference answer (avoid / generic / expert, stored in
data/domains/heldout.jsonl) with the highest mean per-token log-likelihood given the bare question
(`peft_clm.tools.levels`). A knob's avoid (expert) alpha is the smallest |alpha| of its sweep at which its own
domain's avoid (expert) accuracy is highest, or with `--pick specific` the alpha of lowest leakage among those where
it is at least 0.8. Leakage of a knob at an alpha: the change of the mean level
(-1 avoid, 0 generic, +1 expert) on each other domain, as a fraction of the change on its own domain.

With `--design per-level` (pairs, score and markers stages) each domain has two one-ended knobs, `<domain>_avoid`
and `<domain>_expert`, trained at alpha +1 only (`train --domains medical_avoid,...`); the other stages read them as
one signed dial per domain (`peft_clm.tools.levels.dial_alphas`: alpha -a is the avoid knob at a, +a the expert knob
at a), so every table, pick and combination keeps the one-knob-per-domain form.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REGULATED = ("medical", "legal", "financial")
DOMAINS = (*REGULATED, "general")
POOLED = "pooled_expert_avoid_expert"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def dir_bytes(path: Path) -> int:
    """Bytes of the saved weights (adapter or model safetensors at the top of `path`; checkpoints excluded)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------------ pairs
def own_rows(rows: list[dict], domain: str) -> list[dict]:
    """The rows of one domain, in data order."""
    return [r for r in rows if r["domain"] == domain]


def write_pairs(out: Path, pairs: list[dict], what: str, noun: str = "pairs") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tmp.replace(out)
    print(f"{out}: {len(pairs)} {noun} ({what})")


def cmd_pairs(args) -> None:
    """Per-domain DPO pairs. `--design ordinal` (default): expert > generic and generic > avoid on the domain's
    questions, plus `--anchors` questions from each other domain (general included) as anchor pairs, the same two
    answers in both orders (`peft_clm.tools.levels.anchor_pairs`). `--design two-ended`: expert > generic at alpha
    +1 and avoid > generic at -1 (`end_pairs`), the other domains' questions as one-sided `held_pairs` at both ends.
    `--design two-ended-held`: the same, with the other domains' generic answers preferred over both other levels at
    both ends (`held_pairs(..., both_levels=True)`). `--design expert-avoid`: the first design, expert over avoid on
    the domain's questions only. `--design per-level`: two one-ended knobs per domain, `<domain>_avoid` and
    `<domain>_expert`, each its level over generic on the domain's questions and the other domains' generic answers
    over both other levels, all at alpha +1 (the knob is trained only where it is used). With `--hold` the other
    domains are not pairs but a `hold.jsonl` beside the pairs: the three answers of every other training question,
    whose tokens the train stage holds at the base's distributions (`peft_clm.tools.hold`)."""
    from peft_clm.tools.levels import anchor_pairs, end_pairs, held_pairs, level_pair, ordinal_pairs, target_pairs

    data = Path(args.data)
    if args.hold and args.design != "per-level":
        raise SystemExit(f"--hold holds the other domains of a per-level knob; --design {args.design} has no hold.")
    for split in ("train", "heldout"):
        rows = read_jsonl(data / f"{split}.jsonl")
        for domain in REGULATED:
            own = own_rows(rows, domain)
            if args.design == "per-level":
                others = [d for d in DOMAINS if d != domain]
                anchors = [] if split == "heldout" else [r for d in others for r in own_rows(rows, d)[: args.anchors]]
                held = [level_pair(r, "generic", lo) for r in anchors for lo in ("expert", "avoid")]
                held = [] if args.hold else held
                for level in ("avoid", "expert"):
                    folder = data / args.pairs / f"{domain}_{level}"
                    write_pairs(
                        folder / f"{split}.jsonl",
                        [level_pair(r, level, "generic") for r in own] + held,
                        f"{len(own)} {level} over generic, {len(held)} generic over both levels on "
                        f"{len(anchors) if held else 0} other questions",
                    )
                    if not args.hold:  # a hold left by an earlier --hold run would be trained with these pairs
                        (folder / "hold.jsonl").unlink(missing_ok=True)
                    elif split == "train":  # every other training question, at all three levels
                        write_pairs(
                            folder / "hold.jsonl",
                            [{"prompt": r["prompt"], "completion": r[lv]} for d in others for r in own_rows(rows, d)
                             for lv in ("avoid", "generic", "expert")],
                            f"the three answers of the other domains' {split} questions",
                            noun="hold rows",
                        )
                continue
            if args.design == "expert-avoid":
                write_pairs(
                    data / args.pairs / domain / f"{split}.jsonl",
                    [level_pair(r, "expert", "avoid") for r in own],
                    "chosen expert, rejected avoid",
                )
                continue
            two_ended = args.design.startswith("two-ended")
            pairs = end_pairs(own) if two_ended else ordinal_pairs(own)
            anchors = (
                []
                if split == "heldout"
                else [r for d in DOMAINS if d != domain for r in [x for x in rows if x["domain"] == d][: args.anchors]]
            )
            others = (
                held_pairs(anchors, both_levels=args.design == "two-ended-held")
                if two_ended
                else anchor_pairs(anchors)
            )
            write_pairs(
                data / args.pairs / domain / f"{split}.jsonl",
                pairs + others,
                f"{len(pairs)} {args.design}, {len(others)} pairs holding {len(anchors)} other questions",
            )
    # One pooled training set for one combination (medical expert, legal avoid, financial expert), to time
    # retraining per combination: each domain's target level over its two other levels, general anchored.
    if args.design == "per-level":
        return  # the pooled run was timed with the third design
    rows = read_jsonl(data / "train.jsonl")
    targets = {"medical": "expert", "legal": "avoid", "financial": "expert"}
    if args.design == "expert-avoid":  # the first design's data has no generic answers for training questions
        orient = {"medical": ("expert", "avoid"), "legal": ("avoid", "expert"), "financial": ("expert", "avoid")}
        pooled = [level_pair(r, *orient[r["domain"]]) for r in rows if r["domain"] in orient]
    else:
        pooled = [p for d, lv in targets.items() for p in target_pairs([r for r in rows if r["domain"] == d], lv)]
        pooled += anchor_pairs([r for r in rows if r["domain"] == "general"][: args.anchors])
    write_pairs(data / args.pairs / POOLED / "train.jsonl", pooled, "medical expert, legal avoid, financial expert")


def cmd_handcheck(args) -> None:
    """The three answers of the 1st and 4th held-out question of each domain, side by side, for reading by hand."""
    from peft_clm.tools.domains import refusal_score, specificity_score

    rows = read_jsonl(Path(args.data) / "heldout.jsonl")
    lines = ["# Hand check: three levels of 8 held-out questions (1st and 4th of each domain)", ""]
    for d in DOMAINS:
        part = [r for r in rows if r["domain"] == d]
        for r in (part[0], part[3]):
            lines.append(f"## {d}: {r['prompt'][-1]['content']}")
            for lv in ("avoid", "generic", "expert"):
                text = r[lv].replace("\n", " ")
                lines.append(
                    f"- **{lv}** (refusal {refusal_score(r[lv]):.0f}, specificity {specificity_score(r[lv]):.1f}): "
                    f"{text}"
                )
            lines.append("")
    out = Path(args.results) / "hand_check.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------------------ train
def cmd_train(args) -> None:
    from peft_clm.tools.train import train

    data = Path(args.data) / args.pairs
    adapter = "clm" if args.kind == "clm" else "full"
    jobs = (
        [(POOLED, data / POOLED / "train.jsonl")]
        if args.pooled
        else [(d, data / d / "train.jsonl") for d in args.domains.split(",")]
    )
    held = [p for _, p in jobs if (p.parent / "hold.jsonl").exists()]
    if held and adapter != "clm":
        raise SystemExit(f"{held[0].parent} holds a hold.jsonl, which trains CLM knobs only (--kind clm).")
    log_path = Path(args.results) / f"train_{args.kind}{'_pooled' if args.pooled else ''}.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    for name, path in jobs:
        out = Path(args.runs) / args.kind / name
        hold = (path.parent / "hold.jsonl").exists()
        print(f"training {adapter} on {path}{' with its hold' if hold else ''} -> {out}", flush=True)
        r = train(
            "smollm2",
            str(path),
            str(out),
            method="dpo",
            adapter=adapter,
            interpolation=args.interpolation,
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            beta=args.beta,
            sft_weight=args.sft_weight,
            max_length=args.max_length,
            hold=str(path.parent / "hold.jsonl") if hold else None,
            hold_weight=args.hold_weight if hold else None,
            seed=args.seed,
            progress=False,
            overwrite=True,
        )
        print(r.summary(), flush=True)
        log[name] = {
            "adapter": adapter,
            "data": str(path),
            "steps": r.steps,
            "seconds": r.seconds,
            "seconds_per_step": r.seconds_per_step,
            "trainable_params": r.trainable_params,
            "final_loss": r.final_loss,
            "first_loss": r.first_loss,
            "reward_accuracy": r.reward_accuracy,
            "disk_bytes": dir_bytes(out),
            "lr": args.lr,
            "beta": args.beta,
            "sft_weight": args.sft_weight,
            "seed": args.seed,
            "interpolation": args.interpolation,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "hold_weight": args.hold_weight if hold else None,
        }
        write_json(log_path, log)


# ------------------------------------------------------------------------------------------------------ score
def distribution(scores, row_domains) -> dict:
    """Per domain: share of questions at each level and the mean level, for one point ([N, 3] scores)."""
    from peft_clm.tools.levels import LEVELS, levels_from_scores

    levels = levels_from_scores(scores)
    out = {}
    for d in DOMAINS:
        idx = [i for i, rd in enumerate(row_domains) if rd == d]
        lv = levels[idx]
        out[d] = {name: float((lv == k).float().mean()) for k, name in enumerate(LEVELS)}
        out[d]["mean_level"] = float((lv.float() - 1).mean())
    return out


def key_of(point: dict, names=REGULATED) -> str:
    """A point's identity as text: every name's alpha, 0 when the point leaves it out."""
    return json.dumps({d: float(point.get(d, 0.0)) for d in names})


REACHED = 0.8  # a domain is at its target level when this share of its questions is (search_combinations' default)


def add_twofold(combos: list[dict], halves: list[list[dict]]) -> None:
    """Each combination's two-fold accuracy (the mean of the two folds' reported halves) and whether it is reached
    (at least 0.8 on every regulated domain, as `search_combinations` counts a combination reached)."""
    for c, h0, h1 in zip(combos, *halves):
        c["twofold_accuracy"] = {d: (h0["accuracy"][d] + h1["accuracy"][d]) / 2 for d in c["accuracy"]}
        c["twofold_reached"] = all(c["twofold_accuracy"][d] >= REACHED for d in REGULATED)


def refine_pools(pools: dict, candidates: dict, selects: dict, search, key) -> dict:
    """Each pool ({name: points}) with the next-best predicted points (`candidates[name][j][1:]`) of every
    combination j whose best point in the pool, by `search(pool, select)`, is below 0.8 on the rows it is chosen on
    (`selected_min_accuracy`): a fold adds points on what its own half shows, never on the half it reports."""
    refined = {}
    for name, pool in pools.items():
        short = [j for j, c in enumerate(search(pool, selects[name])) if c["selected_min_accuracy"] < REACHED]
        extra = [p for j in short for p in candidates[name][j][1:]]
        refined[name] = list({key(p): p for p in pool + extra}.values())
    return refined


def fold_selects(row_domains: list[str]) -> list[list[bool]]:
    """The two-fold check's halves: fold k chooses on every other question of each domain (starting at k) and
    reports on the rest."""
    selects = []
    for fold in (0, 1):
        seen: dict = {}
        selects.append([])
        for d in row_domains:
            seen[d] = seen.get(d, -1) + 1
            selects[-1].append(seen[d] % 2 == fold)
    return selects


def dials(args) -> dict | None:
    """The per-level design's knobs: each domain's signed dial over its avoid and expert knob (None: one knob each)."""
    return {d: (f"{d}_avoid", f"{d}_expert") for d in REGULATED} if args.design == "per-level" else None


def as_adapter_alphas(points: list[dict], knobs: dict | None) -> list[dict]:
    """Points of {domain: alpha} as the adapters' alphas: the same dicts for one knob per domain, or each domain's
    signed dial read as its avoid knob (alpha < 0) or expert knob (alpha > 0) in the per-level design."""
    from peft_clm.tools.levels import dial_alphas

    return points if knobs is None else [dial_alphas(p, knobs) for p in points]


def score_points(kind, model, tokenizer, rows, points, vectors=None, batch_size=8, knobs=None):
    """Level scores at each point, {domain: alpha} read through `as_adapter_alphas` as {knob: alpha}: CLM points
    from one batched logits-mode pass per batch; vector points each from a pass of its own, with the knobs'
    vectors ({knob: path}) applied in place at their scales and undone after."""
    from peft_clm.tools.levels import level_scores

    points = as_adapter_alphas(points, knobs)
    if kind == "clm":
        return level_scores(model, tokenizer, rows, points, batch_size=batch_size)
    import torch
    from tqdm.auto import tqdm

    from peft_clm.tools.vectors import applied

    out = []
    for p in tqdm(points, desc="vector points", disable=len(points) < 2):
        with applied(model, [(vectors[k], s) for k, s in p.items() if s != 0.0]):
            out.append(level_scores(model, tokenizer, rows, [None], batch_size=batch_size)[0])
    return torch.stack(out)


def saved_scores(runs: Path, kind: str, row_domains: list[str]) -> dict:
    """The points an earlier `score` run saved under `runs` ({key: [N, 3] scores}); refuses scores of other rows."""
    from safetensors.torch import load_file

    labels_path, tensor_path = runs / f"grid_scores_{kind}.json", runs / f"grid_scores_{kind}.safetensors"
    if not (labels_path.exists() and tensor_path.exists()):
        raise SystemExit(f"--reuse-scores: no saved scores at {tensor_path} (run the score stage without it first)")
    labels = json.loads(labels_path.read_text())
    if labels["row_domains"] != row_domains:
        raise SystemExit(f"--reuse-scores: {labels_path} was scored on other questions (--max-per-domain differs)")
    scores = load_file(str(tensor_path))["scores"]
    return {key_of(p): s for p, s in zip(labels["points"], scores)}


def files_sha(*paths: Path) -> str:
    """sha256 of the files' bytes, in order."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def adapter_fingerprint(folder: Path) -> str:
    """A CLM knob's identity: sha256 of its adapter weights and config."""
    return files_sha(folder / "adapter_model.safetensors", folder / "adapter_config.json")


def knob_fingerprints(args, kind: str) -> dict[str, str]:
    """sha256 of each knob's weights and settings (its CLM adapter's weights and config, or its alignment vector,
    extracted first if need be): what saved scores belong to."""
    if kind == "clm":
        folder = Path(args.runs) / "clm"
        return {k: adapter_fingerprint(folder / k) for k in knob_names(args)}
    return {k: files_sha(Path(path)) for k, path in knob_vectors(args).items()}


def rows_fingerprint(rows: list[dict]) -> str:
    """sha256 of the questions and their three reference answers, in order: the rows a score belongs to."""
    import hashlib

    from peft_clm.tools.levels import LEVELS

    return hashlib.sha256(json.dumps([[r["prompt"], *(r[lv] for lv in LEVELS)] for r in rows]).encode()).hexdigest()


def search_scores_path(results: Path, kind: str) -> Path:
    """Where knob-search keeps its exactly scored points: one safetensors file, [P, N, 3] scores, the points and
    fingerprints in its metadata (one file, replaced whole: scores and labels never disagree)."""
    return results / ("knob_search_scores" + ("" if kind == "clm" else f"_{kind}") + ".safetensors")


def save_search_scores(path: Path, exact: dict, meta: dict) -> None:
    """Write exactly scored points ({key_of(point): [N, 3] scores}) and `meta` to `path`, through a temporary file."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    labels = {**meta, "points": [json.loads(k) for k in exact]}
    tmp = path.with_name(path.name + ".tmp")
    scores = torch.stack(list(exact.values())).contiguous()
    save_file({"scores": scores}, str(tmp), metadata={"labels": json.dumps(labels)})
    tmp.replace(path)


def read_search_scores(path: Path, rows_sha: str, n_rows: int, what: str = "--scores-from") -> tuple:
    """(labels, points, [P, N, 3] scores) saved at `path` by a knob-search, refused unless scored on these
    questions (`rows_fingerprint`) and whole."""
    from safetensors import safe_open

    if not path.exists():
        raise SystemExit(f"{what}: no saved scores at {path} (a knob-search run writes them)")
    with safe_open(str(path), "pt") as f:
        labels = json.loads((f.metadata() or {}).get("labels", "{}"))
        scores = f.get_tensor("scores") if "scores" in f.keys() else None
    if labels.get("rows") != rows_sha:
        raise SystemExit(f"{what} {path}: scored on {len(labels.get('row_domains', []))} other questions, not "
                         f"the {n_rows} of --data's heldout.jsonl")
    points = labels.get("points", [])
    if scores is None or tuple(scores.shape) != (len(points), n_rows, 3):
        raise SystemExit(f"{what} {path}: damaged ({len(points)} points, scores "
                         f"{None if scores is None else tuple(scores.shape)}); score again without it")
    return labels, points, scores


def load_search_scores(path: Path, knobs: dict, rows_sha: str, n_rows: int, names: list[str]) -> dict:
    """The points saved at `path` by an earlier knob-search ({key: [N, 3] scores}), refused unless scored on the same
    questions. Where a knob's weights or settings (`knob_fingerprints`) differ, only the points that leave that knob
    at 0 are read: a knob at 0 takes no part in a point's score (logits mode skips its pass's delta; a vector at 0
    is not applied), so those scores are the same bit for bit."""
    labels, points, scores = read_search_scores(path, rows_sha, n_rows)
    changed = sorted(k for k in knobs if labels.get("knobs", {}).get(k) != knobs[k])
    kept = {key_of(p, names): s for p, s in zip(points, scores) if all(p.get(k, 0.0) == 0.0 for k in changed)}
    if changed:
        print(f"--scores-from {path}: other weights or settings for the knobs {changed} than under --runs; reading "
              f"the {len(kept)} of {len(points)} points that leave them at 0", flush=True)
    return kept


def load(kind, args):
    from peft_clm.tools.loading import load_model

    if kind == "clm":
        from peft import PeftModel

        model, tokenizer = load_model("smollm2")
        runs = Path(args.runs) / "clm"
        names = knob_names(args)
        peft_model = PeftModel.from_pretrained(model, str(runs / names[0]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(runs / name), adapter_name=name)
        peft_model.base_model.set_adapter(names)
        peft_model.set_interpolation(args.interpolation)
        return peft_model.eval(), tokenizer, None
    model, tokenizer = load_model("smollm2")
    return model, tokenizer, knob_vectors(args)


def knob_names(args) -> list[str]:
    """The knobs under --runs: one per regulated domain, or the per-level design's six."""
    knobs = dials(args)
    return list(REGULATED) if knobs is None else [k for pair in knobs.values() for k in pair]


def knob_vectors(args, base: str | None = None) -> dict[str, str]:
    """{knob: path} of each knob's alignment vector (aligned - base model, default SmolLM2), extracted from
    --runs/full/<knob> on first use and again when that checkpoint was written after its vector (a retrained knob
    never reads a stale vector). `peft_clm.tools.vectors.extract` writes through a temporary file: never a
    half-written vector."""
    from peft_clm.tools.loading import resolve_model_path
    from peft_clm.tools.vectors import extract

    vectors = {}
    for name in knob_names(args):
        out = Path(args.runs) / "vectors" / f"{name}.safetensors"
        aligned = Path(args.runs) / "full" / name
        written = [f.stat().st_mtime for f in aligned.glob("*.safetensors")]
        if out.exists() and written and max(written) > out.stat().st_mtime:
            out.unlink()
        if not out.exists():
            if not written:
                raise SystemExit(f"no full-DPO checkpoint for knob {name} at {aligned} (train --kind full first)")
            out.parent.mkdir(parents=True, exist_ok=True)
            extract(base or resolve_model_path("smollm2"), aligned, out)
        vectors[name] = str(out)
    return vectors


def cmd_score(args) -> None:
    import torch

    from peft_clm.tools.levels import additive_scores, grid_points, knob_leakage, pick_alpha, search_combinations

    kind = args.kind
    model, tokenizer, vectors = load(kind, args)
    rows = read_jsonl(Path(args.data) / "heldout.jsonl")
    if args.max_per_domain:
        rows = [r for d in DOMAINS for r in [x for x in rows if x["domain"] == d][: args.max_per_domain]]
    row_domains = [r["domain"] for r in rows]
    alphas = [float(a) for a in args.alphas.split(",")]
    if 0.0 not in alphas:
        raise SystemExit("--alphas must include 0")
    result = {"kind": kind, "alphas": alphas, "n_questions": {d: row_domains.count(d) for d in DOMAINS}}
    zero = {d: 0.0 for d in REGULATED}
    points_1d = [zero] + [{**zero, d: a} for d in REGULATED for a in alphas if a != 0.0]
    t0 = time.perf_counter()
    all_scores: dict = {}
    if args.reuse_scores:  # re-analysis (e.g. another --pick): points already scored by an earlier run of this stage
        all_scores.update(saved_scores(Path(args.runs), kind, row_domains))
        print(f"reusing {len(all_scores)} scored points from {args.runs}", flush=True)

    def score(points):  # each point once: the 1-D sweeps and the grid share their axis points
        todo = list({key_of(p): p for p in points if key_of(p) not in all_scores}.values())
        if todo:
            all_scores.update(
                zip(map(key_of, todo), score_points(kind, model, tokenizer, rows, todo, vectors, knobs=dials(args)))
            )

    # In logits mode every point comes from 4 passes per batch, so the sweeps and the grid are scored at once; a
    # vector point is a forward pass of its own, so --grid-picks scores the sweeps first and builds each knob's grid
    # from its own picks (avoid alpha, 0, expert alpha): 27 points instead of a full grid.
    if args.grid_picks or args.grid_predicted:
        score(points_1d)
    else:
        grid_alphas = {d: [float(a) for a in (args.grid_alphas or args.alphas).split(",")] for d in REGULATED}
        score(points_1d + grid_points(grid_alphas))
    sweeps, knobs = {}, {}
    for d in REGULATED:
        sweeps[d] = [
            {"alpha": a, "levels": distribution(all_scores[key_of({**zero, d: a})], row_domains)} for a in alphas
        ]
        avoid = pick_alpha(sweeps[d], d, "avoid", -1, args.pick)
        expert = pick_alpha(sweeps[d], d, "expert", 1, args.pick)
        generic = {"alpha": 0.0, "accuracy": sweeps[d][alphas.index(0.0)]["levels"][d]["generic"]}
        knobs[d] = {
            "avoid": avoid,
            "generic": generic,
            "expert": expert,
            "leakage_at_avoid": knob_leakage(sweeps[d], d, avoid["alpha"]),
            "leakage_at_expert": knob_leakage(sweeps[d], d, expert["alpha"]),
        }
        print(
            f"{d}: avoid at {avoid['alpha']:g} ({avoid['accuracy']:.2f}), expert at {expert['alpha']:g} "
            f"({expert['accuracy']:.2f}); leakage max {knobs[d]['leakage_at_avoid']['max']} (avoid), "
            f"{knobs[d]['leakage_at_expert']['max']} (expert)",
            flush=True,
        )
    result["sweeps"], result["knobs"], result["pick"] = sweeps, knobs, args.pick
    if args.grid_picks:
        grid_alphas = {d: sorted({knobs[d]["avoid"]["alpha"], 0.0, knobs[d]["expert"]["alpha"]}) for d in REGULATED}
    points = grid_points(grid_alphas)
    # Two-fold check: choose the point on half the questions of each domain, report on the other half.
    selects = fold_selects(row_domains)
    controls = {"general": "generic"}
    # --grid-predicted: predict the full grid of the sweeps' alphas from the 1-D sweeps (additive_scores) and add
    # each combination's predicted best point to the grid, chosen on all questions for the main search and on each
    # fold's half for that fold (so the two-fold figure never chooses with the questions it reports on).
    pools = {"all": list(points), 0: list(points), 1: list(points)}
    if args.grid_predicted:
        base = all_scores[key_of(zero)]
        one_knob = {d: {a: all_scores[key_of({**zero, d: a})] for a in alphas} for d in REGULATED}
        full = grid_points({d: alphas for d in REGULATED})
        predicted = additive_scores(base, one_knob, full)
        for name, select in (("all", None), (0, selects[0]), (1, selects[1])):
            chosen = search_combinations(predicted, row_domains, full, REGULATED, select=select, controls=controls)
            pools[name] += [c["point"] for c in chosen]
            if name == "all":
                result["predicted"] = {
                    "grid_points": len(full),
                    "reached": sum(c["reached"] for c in chosen),
                    "combinations": [{"targets": c["targets"], "point": c["point"], "accuracy": c["accuracy"]}
                                     for c in chosen],
                }
        for name in pools:  # each point once, in first-seen order
            pools[name] = list({key_of(p): p for p in pools[name]}.values())
        print(f"predicted: {result['predicted']['reached']}/27 combinations on the additive {len(full)}-point grid; "
              f"scoring {len({key_of(p) for pool in pools.values() for p in pool} - set(all_scores))} new points",
              flush=True)
    score([p for pool in pools.values() for p in pool])  # the grid's points not scored yet
    points = pools["all"]
    scores = torch.stack([all_scores[key_of(p)] for p in points])
    combos = search_combinations(scores, row_domains, points, REGULATED, controls=controls)
    result["search_seconds"] = time.perf_counter() - t0
    result["n_points_scored"] = len(all_scores)
    halves = []
    for fold in (0, 1):
        pool = pools[fold]
        halves.append(
            search_combinations(
                torch.stack([all_scores[key_of(p)] for p in pool]),
                row_domains,
                pool,
                REGULATED,
                select=selects[fold],
                controls=controls,
            )
        )
    add_twofold(combos, halves)
    result["grid_alphas"] = grid_alphas if args.grid_picks else grid_alphas[REGULATED[0]]
    result["n_points"] = len(points)
    result["combinations"] = combos
    result["reached"] = sum(c["reached"] for c in combos)
    result["twofold_reached"] = sum(c["twofold_reached"] for c in combos)
    # the raw scores for re-analysis: tensors as safetensors (no pickles), their labels as JSON beside them
    from safetensors.torch import save_file

    scored = [json.loads(k) for k in all_scores]  # every point scored: the sweeps and the grid
    save_file(
        {"scores": torch.stack(list(all_scores.values())).contiguous()},
        str(Path(args.runs) / f"grid_scores_{kind}.safetensors"),
    )
    write_json(Path(args.runs) / f"grid_scores_{kind}.json", {"points": scored, "row_domains": row_domains})
    write_json(Path(args.results) / f"levels_{kind}.json", result)
    print(
        f"{kind}: {result['reached']}/27 combinations reached (accuracy >= 0.8 on every regulated domain, "
        f"point chosen on the same questions); {result['twofold_reached']}/27 with the point chosen on the other "
        f"half; {len(all_scores)} points (sweeps and grid) scored and searched in {result['search_seconds']:.0f} s"
    )


# ---------------------------------------------------------------------------------------------------- markers
def cmd_knob(args) -> None:
    """One knob alone (the first of --domains, trained with `train --domains D`): its 1-D level sweep on every
    domain and its own domain's mean log-likelihood gaps, without the other knobs: for trying a design on one
    domain before training all three. Writes knob_<domain>.json under --results, with every domain's avoid - generic
    gap at each alpha (`gap_avoid_by_domain`: what the knob pushes, its own domain included)."""
    import torch
    from peft import PeftModel

    from peft_clm.tools.levels import level_scores
    from peft_clm.tools.loading import load_model

    domain = args.domains.split(",")[0]
    alphas = [float(a) for a in args.alphas.split(",")]
    model, tokenizer = load_model("smollm2")
    knob = PeftModel.from_pretrained(model, str(Path(args.runs) / "clm" / domain), adapter_name=domain).eval()
    knob.set_interpolation(args.interpolation)
    rows = read_jsonl(Path(args.data) / f"{args.split}.jsonl")  # train: does the knob generalise, or memorise?
    row_domains = [r["domain"] for r in rows]
    own_domain = domain.removesuffix("_avoid").removesuffix("_expert")  # a per-level knob: medical_expert
    own = torch.tensor([d == own_domain for d in row_domains])
    with torch.no_grad():
        scores = level_scores(knob, tokenizer, rows, alphas, batch_size=8)
    sweep = []
    for a, s in zip(alphas, scores):
        gaps = (s[own] - s[own][:, 1:2]).mean(0)  # avoid - generic, 0, expert - generic
        by_domain = {}  # every domain's avoid - generic gap, its own included
        for d in DOMAINS:
            mine = torch.tensor([x == d for x in row_domains])
            by_domain[d] = float((s[mine][:, 0] - s[mine][:, 1]).mean())
        sweep.append({"alpha": a, "levels": distribution(s, row_domains), "gap_avoid": float(gaps[0]),
                      "gap_expert": float(gaps[2]), "gap_avoid_by_domain": by_domain})
        print(f"{a:+5.2f} | " + " | ".join(
            f"{d} " + "/".join(f"{sweep[-1]['levels'][d][lv]:.2f}" for lv in ("avoid", "generic", "expert"))
            for d in DOMAINS
        ) + f" | gaps {gaps[0]:+.2f} / {gaps[2]:+.2f} | avoid gaps " + " ".join(
            f"{d[:3]} {g:+.2f}" for d, g in by_domain.items()), flush=True)
    suffix = "" if args.split == "heldout" else f"_{args.split}"
    if args.split == "heldout":  # in knob-search's format, for `routed --scores-from`
        save_search_scores(Path(args.results) / f"knob_{domain}_scores.safetensors",
                           {key_of({domain: a}, [domain]): s for a, s in zip(alphas, scores)},
                           {"knobs": {domain: adapter_fingerprint(Path(args.runs) / "clm" / domain)},
                            "rows": rows_fingerprint(rows), "row_domains": row_domains, "runs": args.runs,
                            "interpolation": args.interpolation})
    write_json(Path(args.results) / f"knob_{domain}{suffix}.json",
               {"domain": domain, "interpolation": args.interpolation, "runs": args.runs, "split": args.split,
                "sweep": sweep})


def level_alphas(args) -> tuple[dict, str]:
    """Each regulated domain's alpha per level ({domain: {"avoid": a, "generic": 0.0, "expert": e}}, a dial's signed
    alphas) and where they came from. For the per-level design with a knob-search run of the same --runs and
    --interpolation under --results (knob_search.json with its sweeps, or knob_search_sweeps.json): each knob at
    its alpha of highest own accuracy by --pick (`pick_alpha`), the avoid knob's read as a negative dial. Otherwise
    the score stage's picks (levels_clm.json under --results), as the markers of every earlier design were made."""
    from peft_clm.tools.levels import pick_alpha

    results = Path(args.results)
    found = [results / n for n in ("knob_search.json", "knob_search_sweeps.json") if (results / n).exists()]
    search = json.loads(found[0].read_text()) if found else {}  # a search, or its --sweeps-only run
    if args.design == "per-level" and "sweeps" in search:
        ran = (Path(search["runs"]).resolve(), search["interpolation"])
        if ran != (Path(args.runs).resolve(), args.interpolation):
            raise SystemExit(f"{found[0]} swept the knobs of {search['runs']} in "
                             f"{search['interpolation']} mode; markers was given {args.runs} in {args.interpolation}.")
        picks = {}
        for d in REGULATED:
            picks[d] = {"generic": 0.0}
            for level, sign in (("avoid", -1.0), ("expert", 1.0)):
                try:
                    pick = pick_alpha(search["sweeps"][f"{d}_{level}"], d, level, 1, args.pick)
                    picks[d][level] = sign * pick["alpha"]
                except ValueError as error:  # a sweep without positive alphas
                    raise SystemExit(f"knob {d}_{level} in {found[0]}: {error}") from None
        return picks, f"{found[0].name} sweeps, --pick {args.pick}"
    path = results / "levels_clm.json"
    if not path.exists():
        raise SystemExit(f"markers reads the alphas from {path} (score stage) or, for --design per-level, from "
                         f"{results / 'knob_search.json'} (knob-search stage): neither is there.")
    knobs = json.loads(path.read_text())["knobs"]
    return {d: {lv: knobs[d][lv]["alpha"] for lv in ("avoid", "generic", "expert")} for d in REGULATED}, path.name


def cmd_markers(args) -> None:
    """Generate answers to each domain's held-out questions with its knob at its avoid alpha, 0 and its expert
    alpha (`level_alphas`); mean refusal/specificity markers per level, and agreement with the likelihood level of
    the same setting."""
    import torch

    from peft_clm.tools.domains import refusal_score, specificity_score
    from peft_clm.tools.generation import generate_answers
    from peft_clm.tools.levels import LEVELS, level_scores, levels_from_scores
    from peft_clm.tools.text_metrics import is_degenerate

    picks, source = level_alphas(args)
    model, tokenizer, _ = load("clm", args)
    rows = read_jsonl(Path(args.data) / "heldout.jsonl")
    out = {"max_new_tokens": args.max_new_tokens, "alphas_from": source, "domains": {}}
    for d in REGULATED:
        part = [r for r in rows if r["domain"] == d][: args.max_per_domain]
        settings = picks[d]
        points = [{**{k: 0.0 for k in REGULATED}, d: settings[lv]} for lv in LEVELS]  # the other knobs at 0
        t0 = time.perf_counter()
        points = as_adapter_alphas(points, dials(args))
        answers = generate_answers(
            model, tokenizer, [r["prompt"] for r in part], points, args.max_new_tokens, batch_size=16, progress=False
        )
        ll_levels = levels_from_scores(level_scores(model, tokenizer, part, points))
        res = {"alphas": settings, "seconds": time.perf_counter() - t0, "by_setting": {}}
        for j, lv in enumerate(LEVELS):
            ref = [refusal_score(a) for a in answers[j]]
            spec = [specificity_score(a) for a in answers[j]]
            res["by_setting"][lv] = {
                "refusal_mean": sum(ref) / len(ref),
                "refusal_share": sum(x > 0 for x in ref) / len(ref),  # answers with a refusal/referral phrase
                "specificity_mean": sum(spec) / len(spec),
                # a marker count means nothing on a looping or empty answer: the level a user meets needs fluency
                "degenerate_rate": sum(is_degenerate(a) for a in answers[j]) / len(answers[j]),
                "likelihood_level_share": {
                    name: float((ll_levels[j] == k).float().mean()) for k, name in enumerate(LEVELS)
                },
                "examples": answers[j][:3],
            }
        # agreement per answer: a marker level (refusal > 0 -> avoid; else specificity above the median of the
        # generic-setting answers -> expert; else generic) against the likelihood level of the same setting
        cut = torch.tensor([specificity_score(a) for a in answers[1]]).median().item()
        agree = n = 0
        for j in range(len(LEVELS)):
            for i, a in enumerate(answers[j]):
                marker = 0 if refusal_score(a) > 0 else (2 if specificity_score(a) > cut else 1)
                agree += int(marker == int(ll_levels[j, i]))
                n += 1
        res["agreement"] = agree / n
        res["specificity_cut"] = cut
        out["domains"][d] = res
        print(
            f"{d}: "
            + "; ".join(
                f"{lv} (alpha {settings[lv]:g}): refusal {res['by_setting'][lv]['refusal_mean']:.2f}"
                f" (share {res['by_setting'][lv]['refusal_share']:.2f})"
                f", specificity {res['by_setting'][lv]['specificity_mean']:.2f}"
                f", degenerate {res['by_setting'][lv]['degenerate_rate']:.2f}"
                for lv in LEVELS
            )
            + f"; marker/likelihood agreement {res['agreement']:.2f}",
            flush=True,
        )
    write_json(Path(args.results) / "markers_clm.json", out)


# -------------------------------------------------------------------------------------------------- decompose
def opening_tokens(tokenizer, answer: str, openings: list[str]) -> int:
    """How many of the answer's tokens (as the reference batches tokenise it) belong to its prefilled opening."""
    if not openings:
        return 0
    for opening in sorted(openings, key=len, reverse=True):  # "In numbers:" is a prefix of another opening
        if answer.startswith(opening):
            spans = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            return sum(start < len(opening) for start, _ in spans)
    raise ValueError(f"the answer {answer[:60]!r} starts with none of the openings {openings}")


def cmd_decompose(args) -> None:
    """Where each reference's mean log-likelihood comes from: its prefilled opening (the words the data builder
    put first) and the model's own continuation, per regulated domain and level (--split questions). Read under
    the base model with no instruction (what the level score uses), under the base with the level's own system
    instruction (what the data builder added), and with a knob (`--knob-level expert`: each domain's
    `<domain>_expert` under --runs) at each of --alphas. Writes decompose.json under --results."""
    import torch
    from build_domain_data import AVOID_OPENINGS, AVOID_SYSTEM, EXPERT_OPENINGS, EXPERT_ROLES, EXPERT_SYSTEM
    from peft import PeftModel

    from peft_clm.tools.levels import LEVELS
    from peft_clm.tools.loading import load_model
    from peft_clm.tools.preference import completion_batches

    model, tokenizer = load_model("smollm2")
    rows = read_jsonl(Path(args.data) / f"{args.split}.jsonl")
    alphas = [float(a) for a in args.alphas.split(",")] if args.knob_level else []
    out = {"split": args.split, "knob_level": args.knob_level, "runs": args.runs, "domains": {}}

    def logprobs(net, prompts, answers, points):
        """Per answer and point, the log-probabilities of its tokens (end-of-sequence included), float32."""
        got = [[] for _ in points]
        for ids, mask, target in completion_batches(tokenizer, prompts, answers, 8, None, "cpu"):
            with torch.no_grad():
                if points == [None]:
                    mixed_logits = [net(input_ids=ids, attention_mask=mask).logits.float()]
                else:  # logits mode: every alpha from the base and the aligned pass
                    base_logits = net(input_ids=ids, attention_mask=mask, clm_alpha=0.0).logits.float()
                    aligned = net(input_ids=ids, attention_mask=mask, clm_alpha=1.0).logits.float()
                    mixed_logits = [base_logits + a * (aligned - base_logits) for a in points]
            for j, logits in enumerate(mixed_logits):
                lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                got[j] += [lp[i][target[i, 1:]] for i in range(ids.shape[0])]
        return got

    for d in (x for x in args.domains.split(",") if x in REGULATED):
        part = [r for r in rows if r["domain"] == d]
        systems = {
            "avoid": [{"role": "system", "content": AVOID_SYSTEM}],
            "expert": [{"role": "system", "content": EXPERT_SYSTEM.format(role=EXPERT_ROLES[d])}],
        }
        openings = {"avoid": AVOID_OPENINGS[d], "generic": [], "expert": EXPERT_OPENINGS[d]}
        split_at = {lv: [opening_tokens(tokenizer, r[lv], openings[lv]) for r in part] for lv in LEVELS}
        conditions = {"base": None, **{f"base + {lv} instruction": lv for lv in systems}}
        res = {}
        for name, system in conditions.items():
            prompts = [(systems[system] if system else []) + r["prompt"] for r in part]
            per_level = {lv: logprobs(model, prompts, [r[lv] for r in part], [None])[0] for lv in LEVELS}
            res[name] = decomposition(per_level, split_at)
        knob_dir = Path(args.runs) / "clm" / f"{d}_{args.knob_level}"
        if args.knob_level and not knob_dir.exists():
            print(f"{d}: no knob at {knob_dir}; the base model only", flush=True)
        elif args.knob_level:
            base, _ = load_model("smollm2")  # a fresh copy: each domain's knob goes on a plain model
            knob = PeftModel.from_pretrained(base, str(knob_dir)).eval()
            knob.set_interpolation("logits")
            prompts = [r["prompt"] for r in part]
            per_level = {lv: logprobs(knob, prompts, [r[lv] for r in part], alphas) for lv in LEVELS}
            for j, a in enumerate(alphas):
                res[f"{d}_{args.knob_level} at {a:g}"] = decomposition(
                    {lv: per_level[lv][j] for lv in LEVELS}, split_at
                )
        out["domains"][d] = res
        for name, r in res.items():
            print(f"{d:9s} {name:28s} | " + " | ".join(
                f"{lv} opening " + ("-" if r[lv]["opening"] is None else f"{r[lv]['opening']:+.2f}")
                + f" rest {r[lv]['continuation']:+.2f} end {r[lv]['end_of_sequence']:+.2f} mean {r[lv]['mean']:+.2f}"
                for lv in LEVELS) + " | level shares " + "/".join(f"{r['level_share'][lv]:.2f}" for lv in LEVELS)
                + " | own opening free " + "/".join(f"{r['share_opening_free'][lv]:.2f}" for lv in LEVELS)
                + " (without the end token " + "/".join(f"{r['share_opening_free_without_end'][lv]:.2f}"
                                                       for lv in LEVELS) + ")",
                flush=True)
    write_json(Path(args.results) / f"decompose{'' if args.split == 'heldout' else '_' + args.split}.json", out)


def decomposition(per_level: dict, split_at: dict) -> dict:
    """Mean log-probability per token of each level's openings and continuations (pooled over answers; the
    end-of-sequence token apart, as its own mean: an answer the builder cut mid-sentence ends unlikely), the mean
    of the per-answer means (what the level score compares), the share of answers each level wins, and the share
    it would win with its own opening tokens at probability 1 (counting the end-of-sequence tokens, and not)."""
    import torch

    from peft_clm.tools.levels import LEVELS

    res = {}
    for lv, answers in per_level.items():
        opening = torch.cat([lp[:k] for lp, k in zip(answers, split_at[lv])])
        rest = torch.cat([lp[k:-1] for lp, k in zip(answers, split_at[lv])])  # the words the model went on with
        end = torch.stack([lp[-1] for lp in answers])  # the end-of-sequence token every reference ends with
        res[lv] = {
            "opening": float(opening.mean()) if opening.numel() else None,  # generic answers have none
            "opening_tokens": int(opening.numel()),
            "continuation": float(rest.mean()),
            "continuation_tokens": int(rest.numel()),
            "end_of_sequence": float(end.mean()),
            "mean": float(torch.stack([lp.mean() for lp in answers]).mean()),
        }
    means = torch.stack([torch.stack([lp.mean() for lp in per_level[lv]]) for lv in LEVELS], -1)
    wins = means.argmax(-1)
    res["level_share"] = {lv: float((wins == k).float().mean()) for k, lv in enumerate(LEVELS)}
    # The ceiling of a knob that learns only its level's openings: that level's opening tokens at probability 1,
    # everything else as it is; and the same without any answer's end-of-sequence token.
    for name, cut in (("share_opening_free", None), ("share_opening_free_without_end", -1)):
        means_cut = torch.stack([torch.stack([lp[:cut].mean() for lp in per_level[lv]]) for lv in LEVELS], -1)
        res[name] = {}
        for k, lv in enumerate(LEVELS):
            free = means_cut.clone()
            free[:, k] = torch.stack([torch.cat([torch.zeros(n), lp[n:cut]]).mean() for lp, n in
                                      zip(per_level[lv], split_at[lv])])
            res[name][lv] = float((free.argmax(-1) == k).float().mean())
    return res


# ------------------------------------------------------------------------------------------------- knob-search
def cmd_knob_search(args) -> None:
    """The per-level design's 27 combinations searched over every knob's own signed alpha (six knobs, not three
    dials), so that a knob used against its level (the medical avoid knob at -0.5) can cancel another knob's leak.

    Each knob's 1-D sweep over --alphas is scored; the full grid of those alphas (len(alphas) ** 6 points) is
    predicted additively from the sweeps (`peft_clm.tools.levels.additive_scores`, a guide, never a score); each
    combination's predicted best point, chosen on all questions and on each fold's half, is then scored exactly,
    beside every point the `score` stage scored under --runs when it ran (its dials read as adapter alphas), and
    the search runs on the exactly scored points only; `--refine K` then scores exactly the next K predicted points
    of each combination whose best exact point is below 0.8 on the questions it is chosen on (each fold on its own
    half), and searches again. Logits mode: every point of a batch comes from the 7 passes of the base and the six
    knobs (so the stage asks for `--design per-level`, logits mode). With `--kind vectors` the six knobs are
    full-DPO alignment vectors (`train --kind full`), each point a pass of its own with the vectors applied at their
    scales. Writes knob_search.json (knob_search_vectors.json) under --results, with each
    knob's own sweep (`sweeps`); `--sweeps-only` stops after those sweeps (knob_search[_vectors]_sweeps.json).
    Every exactly scored point is kept in knob_search_scores[_vectors].safetensors under --results, saved after each
    batch (a stopped search keeps them); `--scores-from` reads them back instead of scoring again."""
    import torch

    from peft_clm.tools.levels import (
        additive_scores,
        dial_alphas,
        grid_points,
        knob_leakage,
        search_combinations,
    )

    kind = args.kind
    clm_not_logits = kind == "clm" and args.interpolation != "logits"
    if kind not in ("clm", "vectors") or args.design != "per-level" or clm_not_logits:
        raise SystemExit("knob-search searches the per-level design's six knobs, CLM knobs in logits mode or "
                         f"alignment vectors: give --design per-level (got {args.design}), --kind clm or vectors "
                         f"(got {kind}) and, for clm, --interpolation logits (got {args.interpolation})")
    knobs = dials(args)
    names = knob_names(args)
    alphas = [float(a) for a in args.alphas.split(",")]
    if 0.0 not in alphas:
        raise SystemExit("--alphas must include 0")
    if len(alphas) ** len(names) > 600_000:  # the prediction, its levels and the point dicts: ~1 GB at 9 alphas
        raise SystemExit(f"--alphas: {len(alphas)} values make a grid of {len(alphas) ** len(names):,} points over "
                         f"six knobs; give at most 9 (531,441 points)")
    earlier = Path(args.runs) / f"grid_scores_{kind}.json"  # the score stage's dial points join the pool when present
    if args.pool and not args.scores_from:
        raise SystemExit("--pool searches the points of --scores-from runs too; give --scores-from")
    if args.pool and args.sweeps_only:
        raise SystemExit("--pool searches combinations; --sweeps-only stops before any search")
    rows = read_jsonl(Path(args.data) / "heldout.jsonl")
    row_domains = [r["domain"] for r in rows]
    zero = {k: 0.0 for k in names}
    fingerprints, rows_sha = knob_fingerprints(args, kind), rows_fingerprint(rows)

    def key(point: dict) -> str:
        return key_of(point, names)

    earlier_exact = {}  # --scores-from: points scored before, by these knobs on these questions, not scored again
    for results_dir in args.scores_from or []:
        path = search_scores_path(Path(results_dir), kind)
        earlier_exact.update(load_search_scores(path, fingerprints, rows_sha, len(rows), names))
    model, tokenizer, vectors = load(kind, args)
    scores_path = search_scores_path(Path(args.results), kind)
    scores_meta = {"knobs": fingerprints, "rows": rows_sha, "row_domains": row_domains, "runs": args.runs,
                   "interpolation": args.interpolation if kind == "clm" else None}
    exact: dict = {}  # {key: [N, 3]}: every point this search has exact scores of
    counts = {"scored": 0, "reused": 0}

    def score_exactly(points) -> None:
        """Exact scores of `points` into `exact`: read from --scores-from where there, else scored; then every
        exact point (with the --scores-from ones) saved, so that a stopped search keeps what it scored."""
        todo = list({key(p): p for p in points if key(p) not in exact}.values())
        fresh = [p for p in todo if key(p) not in earlier_exact]
        exact.update({key(p): earlier_exact[key(p)] for p in todo if key(p) in earlier_exact})
        if fresh:
            exact.update(zip(map(key, fresh), score_points(kind, model, tokenizer, rows, fresh, vectors)))
        counts["scored"] += len(fresh)
        counts["reused"] += len(todo) - len(fresh)
        save_search_scores(scores_path, {**earlier_exact, **exact}, scores_meta)

    t0 = time.perf_counter()
    points_1d = [zero] + [{**zero, k: a} for k in names for a in alphas if a != 0.0]
    score_exactly(points_1d)
    sweeps = {k: [{"alpha": a, "levels": distribution(exact[key({**zero, k: a})], row_domains)} for a in alphas]
              for k in names}  # as the score stage's levels_clm.json sweeps: [{alpha, levels}]
    leakage = {k: {a: knob_leakage(sweeps[k], k.rsplit("_", 1)[0], a)["max"] for a in alphas if a != 0.0}
               for k in names}  # each knob alone: the largest move of another domain's mean level, over its own
    result = {"alphas": alphas, "knobs": names, "sweeps": sweeps, "leakage": leakage,  # each knob alone
              "runs": args.runs, "kind": kind, "interpolation": args.interpolation if kind == "clm" else None}
    out = Path(args.results) / ("knob_search" + ("" if kind == "clm" else f"_{kind}")
                                + ("_sweeps" if args.sweeps_only else "") + ".json")

    def print_sweeps():
        print("each knob alone, alpha: its own domain's share of its level / leakage (-: own domain unmoved)")
        for k, sweep in sweeps.items():
            domain, level = k.rsplit("_", 1)
            leaks = {**{a: "/-" if x is None else f"/{x:.2f}" for a, x in leakage[k].items()}, 0.0: ""}
            print(f"{k:18s} " + " ".join(f"{p['alpha']:g}:{p['levels'][domain][level]:.2f}{leaks[p['alpha']]}"
                                         for p in sweep))

    if args.sweeps_only:
        result.update(n_points_scored=counts["scored"], n_points_reused=counts["reused"],
                      seconds=time.perf_counter() - t0)
        write_json(out, result)
        print_sweeps()
        print(f"{counts['scored']} points scored in {result['seconds']:.0f} s, {counts['reused']} read from "
              f"--scores-from; wrote {out}")
        return
    one_knob = {k: {a: exact[key({**zero, k: a})] for a in alphas} for k in names}
    full = grid_points({k: alphas for k in names})
    predicted = additive_scores(exact[key(zero)], one_knob, full)
    selects = fold_selects(row_domains)
    controls = {"general": "generic"}
    dial_points = []
    if earlier.exists():
        dial_points = [dial_alphas(p, knobs) for p in json.loads(earlier.read_text())["points"]]
    pools, predicted_best = {}, {}
    folds = (("all", None), (0, selects[0]), (1, selects[1]))
    for name, select in folds:
        chosen = search_combinations(predicted, row_domains, full, REGULATED, select=select, controls=controls,
                                     top_k=1 + args.refine, prefer=args.prefer)
        if name == "all":
            predicted_reached = sum(c["reached"] for c in chosen)
        predicted_best[name] = [c["candidates"] for c in chosen]
        pools[name] = list({key(p): p for p in points_1d + dial_points + [c["point"] for c in chosen]}.values())
    del predicted
    if args.pool:  # in-sample only: earlier runs' points may have been chosen on the halves the folds report on
        pools["all"] = list({**{key(p): p for p in pools["all"]},
                             **{k: json.loads(k) for k in earlier_exact}}.values())
    todo = [p for pool in pools.values() for p in pool]
    print(f"predicted: {predicted_reached}/27 on the additive {len(full)}-point grid; scoring the chosen points "
          "exactly", flush=True)
    score_exactly(todo)

    def search(pool, select=None):
        scores = torch.stack([exact[key(p)] for p in pool])
        return search_combinations(scores, row_domains, pool, REGULATED, select=select, controls=controls,
                                   prefer=args.prefer)

    def search_pools() -> list[dict]:  # in-sample on all questions, with each fold's two-fold figures added
        combos = search(pools["all"])
        add_twofold(combos, [search(pools[fold], selects[fold]) for fold in (0, 1)])
        return combos

    refined, before_refine = 0, None
    if args.refine:
        combos = search_pools()
        before_refine = {"reached": sum(c["reached"] for c in combos),
                         "twofold_reached": sum(c["twofold_reached"] for c in combos)}
        print(f"before refine: {before_refine['reached']}/27 reached in-sample, {before_refine['twofold_reached']}/27 "
              "two-fold", flush=True)
        pools = refine_pools(pools, predicted_best, dict(folds), search, key)
        todo = list({key(p): p for pool in pools.values() for p in pool if key(p) not in exact}.values())
        print(f"refine: {len(todo)} more points exactly (up to {args.refine} per combination short of 0.8 on the "
              "questions it chooses on)", flush=True)
        score_exactly(todo)
        refined = len(todo)
    seconds = time.perf_counter() - t0

    combos = search_pools()
    result.update({
        "grid_points_predicted": len(full), "predicted_reached": predicted_reached,
        "n_points_exact": len(exact), "n_points_scored": counts["scored"], "n_points_reused": counts["reused"],
        "seconds": seconds, "combinations": combos,
        "reached": sum(c["reached"] for c in combos), "twofold_reached": sum(c["twofold_reached"] for c in combos),
        "dial_points_included": len(dial_points), "refine": args.refine, "n_points_refined": refined,
        "before_refine": before_refine,  # {reached, twofold_reached}, or None
        "prefer": args.prefer, "scores_from": args.scores_from or [], "pooled": bool(args.pool),
    })
    write_json(out, result)
    print_sweeps()
    for c in combos:
        print(" ".join(f"{d[:3]} {lv:7s}" for d, lv in c["targets"].items()) + " | "
              + " ".join(f"{k}={a:g}" for k, a in c["point"].items() if a != 0.0) + " | "
              + " ".join(f"{d[:3]} {a:.2f}" for d, a in c["accuracy"].items())
              + (" | reached" if c["reached"] else "") + (" (two-fold)" if c["twofold_reached"] else ""), flush=True)
    print(f"signed knobs ({kind}): {result['reached']}/27 reached, {result['twofold_reached']}/27 two-fold; "
          f"{counts['scored']} points scored exactly in {seconds:.0f} s, {counts['reused']} read from --scores-from"
          f"{' (all ' + str(len(exact)) + ' searched in-sample)' if args.pool else ''}; ties: {args.prefer}")


def merge_scored_points(sources: list[tuple]) -> tuple[list[dict], "torch.Tensor", dict]:
    """Join the scored points of several CLM score files (`read_search_scores` results, one mixing mode) into one
    pool: (points, [P, N, 3] scores, {knob: fingerprint}). A knob is known by its fingerprint: where two files hold
    different weights under one name, the later one is renamed `name@<first 8 hex digits>`; a point in two files
    (same knobs, same alphas) is kept once (its scores are the same: the same weights on the same questions)."""
    import torch

    modes = {labels.get("interpolation") or "logits" for labels, _, _ in sources}  # knob-search: logits only
    if len(modes) > 1:
        raise SystemExit(f"--scores-from: the files were scored in different mixing modes {sorted(modes)}; give "
                         "files of one mode")
    knobs: dict = {}  # name in the pool -> fingerprint
    pool: dict = {}  # the point's identity -> (point, scores)
    for labels, points, scores in sources:
        rename = {}
        for name, sha in labels.get("knobs", {}).items():
            taken = knobs.get(name)
            rename[name] = name if taken in (None, sha) else f"{name}@{sha[:8]}"
            if knobs.get(rename[name], sha) != sha:
                raise SystemExit(f"--scores-from: two knobs named {name} whose fingerprints start alike; score them "
                                 "into one file")
            knobs[rename[name]] = sha
        for point, s in zip(points, scores):
            unknown = [k for k, a in point.items() if float(a) != 0.0 and k not in rename]
            if unknown:
                raise SystemExit(f"--scores-from: a point sets {unknown}, which its file does not fingerprint; "
                                 "score it again")
            named = {rename[k]: float(a) for k, a in point.items() if float(a) != 0.0}
            pool.setdefault(json.dumps(sorted(named.items())), (named, s))
    names = list(knobs)
    points = [{k: p.get(k, 0.0) for k in names} for p, _ in pool.values()]
    return points, torch.stack([s for _, s in pool.values()]), knobs


def routed_leakage(combos: list[dict], points: list[dict], scores, row_domains: list[str],
                   routes: list[str]) -> dict:
    """Leakage under routing, per domain and level: in the combination that sets that domain alone (the others
    generic), every question answered at its route's point, the largest change of another domain's mean level (-1
    avoid, 0 generic, +1 expert) from the base model, as a fraction of the domain's own change; only misrouted
    questions can move another domain."""
    import torch

    from peft_clm.tools.levels import levels_from_scores

    levels = levels_from_scores(scores)  # [P, N]
    index = {json.dumps(p, sort_keys=True): j for j, p in enumerate(points)}
    base = index[json.dumps({k: 0.0 for k in points[0]}, sort_keys=True)]

    def mean_levels(assign) -> dict:
        row_level = levels[torch.tensor(assign), torch.arange(len(routes))].float() - 1.0
        return {d: float(row_level[torch.tensor([rd == d for rd in row_domains])].mean()) for d in DOMAINS}

    at_base = mean_levels([base] * len(routes))
    out = {}
    for c in combos:
        set_ = [d for d, lv in c["targets"].items() if lv != "generic"]
        if len(set_) != 1:
            continue
        d = set_[0]
        route_point = {r: index[json.dumps(p, sort_keys=True)] for r, p in c["points"].items()}
        moved = mean_levels([route_point.get(r, base) for r in routes])
        own = moved[d] - at_base[d]
        others = {o: moved[o] - at_base[o] for o in DOMAINS if o != d}
        out[f"{d}_{c['targets'][d]}"] = {
            "own_change": own, "others_change": others,
            "leakage": max(abs(v) for v in others.values()) / abs(own) if own else None}
    return out


def cmd_routed(args) -> None:
    """The 27 combinations with a router: each held-out question gets the knob setting of the domain a router
    (`peft_clm.tools.router.PromptRouter`, fitted on --router-data's questions, never the held-out ones) sends it
    to, instead of one setting for all. Reads scored points (--scores-from, repeatable: a knob-search's --results,
    or the scores file of the knob stage; `merge_scored_points`): no knob is run here, only the base model to
    route. Three searches (`peft_clm.tools.levels.routed_combinations`), each in-sample and two-fold: "own" (a
    domain's route sets only that domain's two knobs), "any" (any scored point, all six knobs), and "own" with
    every question routed to its true domain (what a perfect router would give). Writes routed.json,
    routed_combinations.csv (the 27 rows of "own") and the router (router/) under --results."""
    from peft_clm.tools.levels import routed_combinations

    if args.pick == "specific":
        raise SystemExit("routed: --pick accuracy (the most accurate point) or weakest (the point nearest the base "
                         "that reaches 0.8); specific reads leakage, which routing takes away")
    prefer = args.pick
    from peft_clm.tools.loading import load_model
    from peft_clm.tools.router import PromptRouter, routing_report

    if not args.scores_from:
        raise SystemExit("routed reads scored points: give --scores-from (a knob-search's --results, or a "
                         "knob_<knob>_scores.safetensors the knob stage wrote) at least once")
    rows = read_jsonl(Path(args.data) / "heldout.jsonl")
    row_domains = [r["domain"] for r in rows]
    sources = [Path(p) if p.endswith(".safetensors") else search_scores_path(Path(p), "clm") for p in args.scores_from]
    points, scores, knobs = merge_scored_points(
        [read_search_scores(path, rows_fingerprint(rows), len(rows)) for path in sources])
    train = read_jsonl(Path(args.router_data))
    overlap = {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in rows}
    if overlap:
        raise SystemExit(f"--router-data shares {len(overlap)} questions with the held-out ones; fit the router on "
                         "other questions")
    model, tokenizer = load_model("smollm2")
    t0 = time.perf_counter()
    router = PromptRouter.fit(model, tokenizer, [r["prompt"] for r in train], [r["domain"] for r in train])
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    routes = router.route(model, tokenizer, [r["prompt"] for r in rows])
    route_seconds = time.perf_counter() - t0
    router.save(Path(args.results) / "router")
    report = routing_report(routes, row_domains)
    confusion, routing_accuracy = report["confusion"], report["accuracy"]
    knobs_of = {d: [k for k in knobs if k.split("@")[0].rsplit("_", 1)[0] == d] for d in REGULATED}
    controls = {"general": "generic"}
    selects = fold_selects(row_domains)

    def count(route_of, own):
        def search(select=None):
            return routed_combinations(scores, row_domains, route_of, points, REGULATED, select=select,
                                       controls=controls, knobs_of=knobs_of if own else None, prefer=prefer)
        combos = search()
        add_twofold(combos, [search(selects[fold]) for fold in (0, 1)])
        return {"combinations": combos, "reached": sum(c["reached"] for c in combos),
                "twofold_reached": sum(c["twofold_reached"] for c in combos)}

    searches = {"own": count(routes, True), "any": count(routes, False), "own_true_routes": count(row_domains, True)}
    leakage = routed_leakage(searches["own"]["combinations"], points, scores, row_domains, routes)
    result = {"scores_from": [str(p) for p in sources], "knobs": knobs, "n_points": len(points), "leakage": leakage,
              "pick": prefer,
              "router": {"labels": router.labels, "layers": router.layers, "fitted_on": args.router_data,
                         "n_fitted": len(train), "accuracy": routing_accuracy, "confusion": confusion,
                         "fit_seconds": fit_seconds, "route_seconds": route_seconds,
                         "misrouted": [{"domain": d, "route": r, "question": row["prompt"][-1]["content"]}
                                       for d, r, row in zip(row_domains, routes, rows) if d != r]},
              **searches}
    write_json(Path(args.results) / "routed.json", result)
    with open(Path(args.results) / "routed_combinations.csv", "w", newline="") as f:  # the 27 rows, "own" search
        writer = csv.writer(f)
        writer.writerow([*(f"{d}_target" for d in REGULATED), *(f"{d}_accuracy" for d in DOMAINS),
                         *(f"{d}_twofold" for d in DOMAINS), "reached", "twofold_reached",
                         *(f"{d}_route_point" for d in REGULATED)])
        for c in searches["own"]["combinations"]:
            writer.writerow([*(c["targets"][d] for d in REGULATED), *(f"{c['accuracy'][d]:.4f}" for d in DOMAINS),
                             *(f"{c['twofold_accuracy'][d]:.4f}" for d in DOMAINS), c["reached"], c["twofold_reached"],
                             *(" ".join(f"{k}={a:g}" for k, a in c["points"][d].items() if a) or "base"
                               for d in REGULATED)])
    print(f"router: {routing_accuracy:.3f} of {len(rows)} held-out questions to their domain (fitted on "
          f"{len(train)} others in {fit_seconds:.1f} s; routing took {route_seconds:.1f} s); rows: true domain, "
          f"columns: route {router.labels}")
    for d, row in confusion.items():
        print(f"  {d:10s} " + " ".join(f"{row[lb]:3d}" for lb in router.labels))
    for name, found in searches.items():
        print(f"{name}: {found['reached']}/27 reached in-sample, {found['twofold_reached']}/27 two-fold")
    print("leakage under routing (one domain set, the others generic; all questions routed): " + "; ".join(
        f"{k} {v['leakage']:.2f}" if v["leakage"] is not None else f"{k} -" for k, v in leakage.items()))
    for c in searches["own"]["combinations"]:
        print(" ".join(f"{d[:3]} {lv:7s}" for d, lv in c["targets"].items()) + " | "
              + " ".join(f"{d[:3]}: " + (",".join(f"{k}={a:g}" for k, a in p.items() if a) or "base")
                         for d, p in c["points"].items()) + " | "
              + " ".join(f"{d[:3]} {a:.2f}" for d, a in c["accuracy"].items())
              + (" | reached" if c["reached"] else "") + (" (two-fold)" if c["twofold_reached"] else ""))
    print(f"wrote {Path(args.results) / 'routed.json'}")


# ----------------------------------------------------------------------------------------------------- report
def score_gaps(runs: Path, kind: str, results: Path) -> list[str]:
    """Along each knob alone (the scored points with the other knobs at 0), the mean over its own domain's held-out
    questions of (avoid - generic) and (expert - generic) mean per-token log-likelihood: how far each level is from
    being the argmax; and, per domain, how far the knob moved these gaps from the base. Written to gaps_<kind>.json;
    returns markdown rows for the summary."""
    path = runs / f"grid_scores_{kind}.safetensors"
    if not path.exists():
        return []
    from safetensors.torch import load_file

    scores = load_file(str(path))["scores"]
    meta = json.loads((runs / f"grid_scores_{kind}.json").read_text())
    by_domain = {d: [i for i, rd in enumerate(meta["row_domains"]) if rd == d] for d in DOMAINS}

    def mean_gaps(s, d) -> dict:
        s = s[by_domain[d]]
        return {"avoid_minus_generic": float((s[:, 0] - s[:, 1]).mean()),
                "expert_minus_generic": float((s[:, 2] - s[:, 1]).mean())}

    base = next(scores[j] for j, p in enumerate(meta["points"]) if all(v == 0.0 for v in p.values()))
    gaps = {}
    for d in REGULATED:
        gaps[d] = {}
        for j, p in enumerate(meta["points"]):
            if all(v == 0.0 for k, v in p.items() if k != d):
                # every domain's gaps moved from the base: a knob can leave another domain at its level (no level
                # leakage) and still push its gaps, which shows when knobs are combined
                at = {o: mean_gaps(scores[j], o) for o in DOMAINS}
                moved = {o: {g: v - mean_gaps(base, o)[g] for g, v in at[o].items()} for o in DOMAINS}
                gaps[d][p[d]] = {**at[d], "change_by_domain": moved}
    write_json(results / f"gaps_{kind}.json", {d: {str(a): g for a, g in v.items()} for d, v in gaps.items()})
    alphas = sorted(set.intersection(*(set(by) for by in gaps.values())))  # alphas every knob was scored at alone
    md = [
        f"| {kind} knob: own domain's mean log-likelihood gap, avoid - generic / expert - generic, at alpha | "
        + " | ".join(f"{a:g}" for a in alphas)
        + " |",
        "| --- " * (len(alphas) + 1) + "|",
    ]
    for d, by in gaps.items():
        md.append(
            f"| {d} | "
            + " | ".join(f"{by[a]['avoid_minus_generic']:+.2f} / {by[a]['expert_minus_generic']:+.2f}" for a in alphas)
            + " |"
        )
    return md + [""]


def cmd_report(args) -> None:
    results = Path(args.results)
    kinds = [k for k in ("clm", "vectors") if (results / f"levels_{k}.json").exists()]
    data = {k: json.loads((results / f"levels_{k}.json").read_text()) for k in kinds}
    lines = []
    for k in kinds:
        r = data[k]
        lines.append(f"## {k}: level shares per domain along each knob (held-out, {r['n_questions']})")
        header = "knob alpha | " + " | ".join(f"{d} a/g/e" for d in DOMAINS)
        lines.append(header)
        rows_csv = []
        for knob, sweep in r["sweeps"].items():
            for s in sweep:
                cells = " | ".join("{avoid:.2f}/{generic:.2f}/{expert:.2f}".format(**s["levels"][d]) for d in DOMAINS)
                lines.append(f"{knob} {s['alpha']:g} | {cells}")
                rows_csv.append(
                    {
                        "kind": k,
                        "knob": knob,
                        "alpha": s["alpha"],
                        **{f"{d}_{lv}": s["levels"][d][lv] for d in DOMAINS for lv in ("avoid", "generic", "expert")},
                    }
                )
        with (results / f"sweep_{k}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows_csv[0]))
            w.writeheader()
            w.writerows(rows_csv)
        lines.append("")
        lines.append("knob | avoid alpha (acc) | generic 0 (acc) | expert alpha (acc) | leakage max at avoid / expert")
        for d, kn in r["knobs"].items():
            la, le = kn["leakage_at_avoid"]["max"], kn["leakage_at_expert"]["max"]
            lines.append(
                f"{d} | {kn['avoid']['alpha']:g} ({kn['avoid']['accuracy']:.2f}) | "
                f"{kn['generic']['accuracy']:.2f} | {kn['expert']['alpha']:g} ({kn['expert']['accuracy']:.2f})"
                f" | {la if la is None else round(la, 2)} / {le if le is None else round(le, 2)}"
            )
        lines.append("")
        lines.append(
            f"27 combinations ({k}, grid {r['grid_alphas']} per knob, {r['n_points']} points): "
            f"{r['reached']}/27 reached; {r['twofold_reached']}/27 with two-fold selection"
            + (f"; the additive prediction from the 1-D sweeps, {r['predicted']['reached']}/27 on its "
               f"{r['predicted']['grid_points']}-point grid, added its picks" if "predicted" in r else "")
        )
        combo_csv = []
        for c in r["combinations"]:
            t = c["targets"]
            acc = c["accuracy"]
            lines.append(
                f"{t['medical']:7s} {t['legal']:7s} {t['financial']:7s} | point "
                + ",".join(f"{c['point'][d]:g}" for d in REGULATED)
                + " | acc "
                + " ".join(f"{acc[d]:.2f}" for d in DOMAINS)
                + f" | {'reached' if c['reached'] else '-'} | twofold min "
                f"{min(c['twofold_accuracy'][d] for d in REGULATED):.2f}"
            )
            combo_csv.append(
                {
                    "kind": k,
                    **{f"target_{d}": t[d] for d in REGULATED},
                    **{f"alpha_{d}": c["point"][d] for d in REGULATED},
                    **{f"acc_{d}": acc[d] for d in DOMAINS},
                    "min_acc": c["min_accuracy"],
                    "reached": c["reached"],
                    "twofold_min_acc": min(c["twofold_accuracy"][d] for d in REGULATED),
                    "twofold_reached": c["twofold_reached"],
                }
            )
        with (results / f"combinations_{k}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(combo_csv[0]))
            w.writeheader()
            w.writerows(combo_csv)
        lines.append("")
    for name in ("train_clm.json", "train_full.json", "train_clm_pooled.json"):
        if (results / name).exists():
            t = json.loads((results / name).read_text())
            kind = "full" if "full" in name else "clm"
            for d, v in t.items():
                weights = Path(args.runs) / kind / d
                disk = dir_bytes(weights) if weights.exists() else v["disk_bytes"]
                lines.append(
                    f"{name}: {d}: {v['steps']} steps in {v['seconds']:.0f} s ({v['seconds_per_step']:.1f} s/step), "
                    f"{v['trainable_params']:,} trainable params, weights on disk {disk / 1e6:.1f} MB"
                )
    for vector in sorted((Path(args.runs) / "vectors").glob("*.safetensors")):  # stored wide (float64) for exactness
        lines.append(f"vector {vector.stem}: {vector.stat().st_size / 1e6:.1f} MB on disk")
    for k in kinds:
        # retraining per combination: one pooled run where measured, else the longest per-domain run of the same
        # kind (CLM knobs against CLM training, vectors against full DPO, as the seed compares them)
        trained = "clm" if k == "clm" else "full"
        pooled = results / f"train_{trained}_pooled.json"
        if pooled.exists():
            unit, what = next(iter(json.loads(pooled.read_text()).values())), f"one pooled {trained} run"
        elif (results / f"train_{trained}.json").exists():
            per_domain = json.loads((results / f"train_{trained}.json").read_text()).values()
            unit, what = max(per_domain, key=lambda v: v["seconds"]), f"the longest per-domain {trained} run"
        else:
            continue
        one = unit["seconds"]
        lines.append(
            f"{k}: search {data[k]['search_seconds']:.0f} s for all 27 vs retraining 27 x {one:.0f} s ({what}, "
            f"{unit['steps']} steps) = {27 * one:.0f} s ({27 * one / data[k]['search_seconds']:.1f}x)"
        )
    # A markdown summary for the README: own-domain level shares along each knob, leakage, combinations.
    md = []
    for k in kinds:
        r = data[k]
        alphas = [s["alpha"] for s in next(iter(r["sweeps"].values()))]
        md.append(
            f"| {k} knob: own domain avoid / generic / expert at alpha | "
            + " | ".join(f"{a:g}" for a in alphas)
            + " |"
        )
        md.append("| --- " * (len(alphas) + 1) + "|")
        for knob, sweep in r["sweeps"].items():
            md.append(
                f"| {knob} | "
                + " | ".join("{avoid:.2f} / {generic:.2f} / {expert:.2f}".format(**s["levels"][knob]) for s in sweep)
                + " |"
            )
        for knob, sweep in r["sweeps"].items():
            md.append(
                f"| (other domains' mean level, {knob} knob) | "
                + " | ".join(
                    " ".join(f"{s['levels'][d]['mean_level']:+.2f}" for d in DOMAINS if d != knob) for s in sweep
                )
                + " |"
            )
        md.append("")
        md.append(
            "| knob | avoid alpha (own accuracy) | generic at 0 | expert alpha (own accuracy) | "
            "leakage at avoid alpha | leakage at expert alpha |"
        )
        md.append("| --- | --- | --- | --- | --- | --- |")
        for d, kn in r["knobs"].items():

            def fmt(x):
                return "n/a (no own change)" if x is None else f"{x:.2f}"

            md.append(
                f"| {d} | {kn['avoid']['alpha']:g} ({kn['avoid']['accuracy']:.2f}) | "
                f"{kn['generic']['accuracy']:.2f} | {kn['expert']['alpha']:g} ({kn['expert']['accuracy']:.2f}) | "
                f"{fmt(kn['leakage_at_avoid']['max'])} | {fmt(kn['leakage_at_expert']['max'])} |"
            )
        md.append("")
        md.append(
            f"Combinations reached ({k}; grid {r['grid_alphas']} per knob): **{r['reached']}/27** with the point "
            f"chosen on the same {r['n_questions']['medical']} questions per domain, "
            f"**{r['twofold_reached']}/27** two-fold (chosen on half, reported on the other half); "
            f"{r.get('n_points_scored', r['n_points'])} points scored and searched in "
            f"{r['search_seconds']:.0f} s."
            + (f" The grid also holds each combination's best point of the full {r['predicted']['grid_points']}-point "
               f"grid as predicted additively from the 1-D sweeps (the prediction: {r['predicted']['reached']}/27)."
               if "predicted" in r else "")
        )
        md.append("")
    for k in kinds:
        md += score_gaps(Path(args.runs), k, results)
    (results / "summary.md").write_text("\n".join(md) + "\n")
    text = "\n".join(lines)
    (results / "report.md").write_text(text + "\n")
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: CSV only")
        return
    for k in kinds:
        r = data[k]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
        for ax, (knob, sweep) in zip(axes[0], r["sweeps"].items()):
            alphas = [s["alpha"] for s in sweep]
            for lv, style in (("avoid", "v-"), ("generic", "o-"), ("expert", "^-")):
                ax.plot(alphas, [s["levels"][knob][lv] for s in sweep], style, label=f"{knob}: {lv}")
            ax.plot(
                alphas,
                [max(abs(s["levels"][d]["mean_level"]) for d in DOMAINS if d != knob) for s in sweep],
                "k:",
                label="max |mean level| other domains",
            )
            ax.set_xlabel("alpha" if k == "clm" else "vector scale")
            ax.set_ylabel("share of held-out questions")
            ax.set_title(f"{k} knob: {knob}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results / f"levels_{k}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "stage",
        choices=["pairs", "handcheck", "train", "score", "knob-search", "knob", "routed", "markers", "decompose",
                 "report"],
    )
    parser.add_argument("--data", default=str(ROOT / "data" / "domains"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "domains"))
    parser.add_argument("--results", default=str(ROOT / "results" / "domains"))
    parser.add_argument("--kind", choices=["clm", "full", "vectors"], default="clm")
    parser.add_argument("--domains", default=",".join(REGULATED))
    parser.add_argument("--pooled", action="store_true")
    parser.add_argument(
        "--design",
        choices=["ordinal", "two-ended", "two-ended-held", "expert-avoid", "per-level"],
        default="ordinal",
        help="pairs stage; per-level also tells the score and markers stages that each domain has two knobs, "
        "<domain>_avoid and <domain>_expert, read as one signed dial (alpha < 0: the avoid knob at -alpha)",
    )
    parser.add_argument(
        "--interpolation",
        choices=["logits", "hidden"],
        default="logits",
        help="train, score, knob and markers stages: the CLM mixing mode a knob is trained and used in (its "
        "negative end is learnt for that mode)",
    )
    parser.add_argument("--pairs", default="pairs", help="the pairs' folder under --data (pairs and train stages)")
    parser.add_argument("--anchors", type=int, default=15, help="pairs stage: anchor questions per other domain")
    parser.add_argument("--hold", action="store_true",
                        help="pairs stage, per-level: hold the other domains by a KL term (hold.jsonl), not by pairs")
    parser.add_argument("--hold-weight", type=float, default=1.0,
                        help="train stage: weight of the KL term on a knob's hold.jsonl, where the pairs have one")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0,
                        help="train stage: the training seed (set_seed: data order and any random initialisation); "
                             "give another --runs/--results to keep the first seed's knob")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--alphas", default="-3,-2,-1.5,-1,-0.5,0,0.5,1,1.5,2,3")
    parser.add_argument("--grid-alphas", default=None, help="per knob for the 3-knob grid (default: --alphas)")
    parser.add_argument(
        "--grid-picks",
        action="store_true",
        help="score stage: each knob's grid is its avoid alpha, 0 and its expert alpha from its own sweep",
    )
    parser.add_argument(
        "--grid-predicted",
        action="store_true",
        help="score stage: also score, for each combination, the best point of the full grid of --alphas as "
        "predicted from the 1-D sweeps (peft_clm.tools.levels.additive_scores)",
    )
    parser.add_argument(
        "--pick",
        choices=["accuracy", "specific", "weakest"],
        default="accuracy",
        help="score, markers and routed stages: a knob's avoid/expert alpha is the one of highest own accuracy, or "
        "of the alphas reaching 0.8 the one of lowest leakage (specific) or the smallest (weakest) "
        "(peft_clm.tools.levels.pick_alpha; routed: routed_combinations' prefer, accuracy or weakest)",
    )
    parser.add_argument(
        "--reuse-scores",
        action="store_true",
        help="score stage: start from the points saved by an earlier score run under --runs (re-analysis)",
    )
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout",
                        help="knob and decompose stages: the questions to read (train: against held-out, memorising)")
    parser.add_argument("--knob-level", choices=["avoid", "expert"], default=None,
                        help="decompose stage: also read each domain's <domain>_<level> knob under --runs at --alphas")
    parser.add_argument("--refine", type=int, default=0,
                        help="knob-search stage: for each combination whose exactly scored best point is below 0.8 "
                             "on the questions it is chosen on, also score its next REFINE best predicted points")
    parser.add_argument("--prefer", choices=["base", "margin"], default="base",
                        help="knob-search stage: among points of equal worst and mean accuracy, the one nearest the "
                             "base (smallest sum of |alpha|) or the one whose worst domain's target level wins by the "
                             "widest mean log-likelihood margin")
    parser.add_argument("--scores-from", action="append", metavar="RESULTS",
                        help="knob-search stage: an earlier knob-search's --results (repeatable); its exactly scored "
                             "points are read, not scored again, where its knobs' weights and questions are these")
    parser.add_argument("--router-data", default=str(ROOT / "data" / "domains_more" / "train.jsonl"),
                        help="routed stage: the labelled questions (a jsonl with prompt and domain) the router is "
                             "fitted on")
    parser.add_argument("--pool", action="store_true",
                        help="knob-search stage: search (in-sample) over every point of --scores-from too; the "
                             "two-fold check keeps to the points each fold chose on its own half")
    parser.add_argument("--sweeps-only", action="store_true",
                        help="knob-search stage: each knob's 1-D sweep and leakage only, no combination search")
    parser.add_argument("--max-per-domain", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    if args.refine < 0:
        parser.error(f"--refine must be 0 or more, got {args.refine}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {
        "pairs": cmd_pairs,
        "handcheck": cmd_handcheck,
        "train": cmd_train,
        "score": cmd_score,
        "knob": cmd_knob,
        "markers": cmd_markers,
        "decompose": cmd_decompose,
        "knob-search": cmd_knob_search,
        "routed": cmd_routed,
        "report": cmd_report,
    }[args.stage](args)


if __name__ == "__main__":
    main()
