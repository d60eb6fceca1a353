"""The low-rank CLM layer against the full one on SmolLM2, same pairs and budget: adapter file size, trainable
parameters, step time, training peak memory, held-out reward accuracy at alpha 1 and the alpha sweep's rho.

Each row is trained in a fresh process and swept with `peft-clm sweep`; a row whose run directory already holds its
results is reused. Rows are `full`, `r<rank>` (factors on every linear module of the layer) or `r<rank>-out`
(factors on the two zeroed output projections only, the smallest file), optionally `@<lr>` (default: `--lr` for the
full layer, `--lowrank-lr` for the factors). Training memory is measured in a second fresh process per row over the
first `--memory-steps` steps of the same run (same seed, same batches): the peak RSS while training above the RSS
of the loaded model, so the model's loading peak does not hide what the adapter's training state costs.
Writes `<out>/<dimension>/ranks.json` and prints a table, with
the analytic adapter sizes of an 8B Llama shape beside the measured ones.

    python scripts/compare_ranks.py --dimension concise --out runs/ranks --rows full,r4,r16,r64,r16-out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
METRIC = {"concise": "words", "formal": "casualness"}
# the README's sweeps: concise answers may run past the longest chosen one and the base's (~52 words)
MAX_NEW_TOKENS = {"concise": 64, "formal": 48}
ALPHAS = "-0.5,0,0.25,0.5,0.75,1,1.5,2"
# Llama-3.1-8B's decoder shape (no weights are needed to count an adapter's parameters)
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_hidden_layers": 32, "vocab_size": 128256}


def parse_row(spec: str, lr: float, lowrank_lr: float) -> dict:
    """`full`, `r16`, `r16-out` or any of them with `@5e-4` -> {name, rank, modules, lr, dir}."""
    name, _, lr_text = spec.partition("@")
    rank_text, out_only = (name[:-4], True) if name.endswith("-out") else (name, False)
    if name == "full":
        rank = None
    elif rank_text.startswith("r") and rank_text[1:].isdigit() and int(rank_text[1:]) > 0:
        rank = int(rank_text[1:])
    else:
        raise SystemExit(f"row {spec!r}: expected full, r<rank> or r<rank>-out, each optionally with @<lr>")
    row_lr = float(lr_text) if lr_text else (lr if rank is None else lowrank_lr)
    from peft_clm.constants import ZERO_MODULES

    modules = list(ZERO_MODULES["llama"]) if out_only else None
    return {"name": spec, "rank": rank, "modules": modules, "lr": row_lr, "dir": f"{name}_lr{row_lr:g}"}


def run_python(code: str) -> dict:
    """Run `code` in a fresh process; it prints one `RESULT <json>` line."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def train_row(row: dict, args, out: Path, steps: int, summary: Path) -> dict:
    """Train a row into `out` in a fresh process; its TrainResult is kept as JSON in `summary`."""
    if summary.is_file():
        return json.loads(summary.read_text())
    data = str(ROOT / "data" / args.dimension / "train.jsonl")
    code = (
        "import json; from peft_clm.tools.train import train; "
        f"r = train('smollm2', {data!r}, {str(out)!r}, method='dpo', rank={row['rank']!r}, "
        f"lowrank_modules={row['modules']!r}, max_steps={steps}, batch_size={args.batch_size}, lr={row['lr']!r}, "
        f"beta={args.beta!r}, "
        f"sft_weight={args.sft_weight!r}, seed={args.seed}, progress=False, overwrite=True); "
        "d = {k: v for k, v in r.__dict__.items() if k != 'log_history'}; "
        "d['losses'] = [h['loss'] for h in r.log_history if 'loss' in h]; print('RESULT', json.dumps(d))"
    )
    result = run_python(code)
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result, indent=1))
    return result


def training_memory(row: dict, args, out: Path) -> dict:
    """Peak host RSS while training over the first `--memory-steps` steps (fresh process; checkpoint saving included,
    as in a real run), and above the loaded model. A kept measurement is reused only for the same settings."""
    scratch, settings = out / "memory", {"steps": args.memory_steps, "batch_size": args.batch_size, "seed": args.seed}
    kept = scratch / "memory.json"
    if kept.is_file() and json.loads(kept.read_text()).get("settings") != settings:
        kept.unlink()
    result = train_row(row, args, scratch / "adapter", args.memory_steps, kept)
    if result.get("settings") != settings:
        kept.write_text(json.dumps({**result, "settings": settings}, indent=1))
    shutil.rmtree(scratch / "adapter", ignore_errors=True)
    if result["train_peak_rss_mb"] is None:
        raise SystemExit("this OS cannot reset the peak RSS (/proc/self/clear_refs): no training-memory figure")
    return {"train_peak_rss_mb": result["train_peak_rss_mb"],
            "train_rss_over_model_mb": result["train_peak_rss_mb"] - result["train_start_rss_mb"]}


def evaluate_row(args, out: Path) -> dict:
    """Held-out reward accuracy at alpha 1 on every held-out pair, and the sweep (the README's command)."""
    evaluation = out / "heldout.json"
    if not evaluation.is_file():
        heldout = str(ROOT / "data" / args.dimension / "heldout.jsonl")
        code = (
            "import json, peft_clm; from peft import PeftModel; from peft_clm.tools.data import read_jsonl; "
            "from peft_clm.tools.loading import load_model; "
            "from peft_clm.tools.preference import preference_metrics; "
            f"base, tok = load_model('smollm2'); model = PeftModel.from_pretrained(base, {str(out)!r}).eval(); "
            f"m = preference_metrics(model, tok, read_jsonl({heldout!r}, 'dpo'), beta={args.beta!r}, alpha=1.0); "
            "print('RESULT', json.dumps(m))"
        )
        evaluation.write_text(json.dumps(run_python(code), indent=1))
    sweep_dir = out / "sweep"
    if not (sweep_dir / "sweep.json").is_file():
        cmd = [sys.executable, "-m", "peft_clm", "sweep", "--model", "smollm2", "--adapter", str(out),
               f"--alphas={ALPHAS}", "--prompts", str(ROOT / "data" / args.dimension / "heldout.jsonl"),
               "--metric", METRIC[args.dimension], "--max-prompts", str(args.max_prompts),
               "--max-new-tokens", str(MAX_NEW_TOKENS[args.dimension]), "--out", str(sweep_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"sweep of {out} failed:\n{proc.stderr[-3000:]}")
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    return {"heldout": json.loads(evaluation.read_text()), "sweep": sweep}


def adapter_sizes(config: dict, ranks: list[int]) -> dict:
    """Parameters of the full CLM layer and of rank-r factors of one Llama-shaped decoder layer, counted on the meta
    device (no weights): on every linear module (the default), and on the two zeroed projections only
    (`ClmConfig(lowrank_modules=["self_attn.o_proj", "mlp.down_proj"])`, the smallest layer that can leave the
    identity). A file stores 4 bytes a parameter in float32, 2 in bfloat16."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from peft_clm import transformers_compat as compat
    from peft_clm.constants import ZERO_MODULES

    with torch.device("meta"):
        layer = LlamaDecoderLayer(LlamaConfig(**config), 0)
    full = sum(p.numel() for p in layer.parameters())
    linears = compat.linear_modules(layer)
    sizes = {"full_params": full}
    for r in ranks:
        for label, names in (("all_linear", list(linears)), ("zeroed_only", list(ZERO_MODULES["llama"]))):
            params = sum(r * (linears[n][1] + linears[n][2]) for n in names)
            sizes[f"r{r}_{label}_params"] = params
            sizes[f"r{r}_{label}_percent_of_full"] = 100 * params / full
    return sizes


def smollm2_shape() -> dict:
    """SmolLM2's decoder shape, read from its config."""
    from peft_clm.tools.loading import resolve_model_path

    config = json.loads((resolve_model_path("smollm2") / "config.json").read_text())
    return {k: config[k] for k in LLAMA_8B}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dimension", default="concise", choices=sorted(METRIC))
    parser.add_argument("--out", default="runs/ranks")
    parser.add_argument("--rows", default="full,r4,r16,r64")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5, help="the full layer's learning rate")
    parser.add_argument("--lowrank-lr", type=float, default=5e-4, help="the factors' learning rate")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompts", type=int, default=24)
    parser.add_argument("--memory-steps", type=int, default=4, help="steps of the training-memory run of each row")
    parser.add_argument("--results", help="also copy ranks.json and each row's sweep.json here")
    args = parser.parse_args()
    rows = [parse_row(s, args.lr, args.lowrank_lr) for s in args.rows.split(",") if s]
    out = Path(args.out) / args.dimension
    table = []
    for row in rows:
        run = out / row["dir"]
        trained = train_row(row, args, run, args.steps, run / "train_summary.json")
        evaluated = evaluate_row(args, run)
        memory = training_memory(row, args, run)
        timed = trained["step_seconds"][1:] or trained["step_seconds"]  # the first step pays one-off set-up
        table.append({
            "row": row["name"], "rank": row["rank"], "lowrank_modules": row["modules"], "lr": row["lr"],
            "file_bytes": (run / "adapter_model.safetensors").stat().st_size,
            "trainable_params": trained["trainable_params"],
            "step_s": statistics.median(timed), "train_seconds": trained["seconds"],
            "peak_rss_mb": trained["peak_rss_mb"], **memory, "first_loss": trained["first_loss"],
            "final_loss": trained["final_loss"],
            "heldout_reward_accuracy": evaluated["heldout"]["reward_accuracy"],
            "heldout_mean_margin": evaluated["heldout"]["mean_margin"],
            "sweep_rho": evaluated["sweep"]["spearman_rho"],
            "sweep_rho_margin": evaluated["sweep"].get("spearman_rho_margin"),
            "sweep_metric_means": [r[f"{METRIC[args.dimension]}_mean"] for r in evaluated["sweep"]["rows"]],
        })
    full = next((r for r in table if r["rank"] is None), None)
    for r in table:
        r["file_percent_of_full"] = 100 * r["file_bytes"] / full["file_bytes"] if full else None
        for key in ("heldout_reward_accuracy", "sweep_rho", "peak_rss_mb", "train_rss_over_model_mb"):
            r[f"{key}_minus_full"] = r[key] - full[key] if full else None
    ranks = sorted({r["rank"] for r in rows if r["rank"]} | {4, 16, 64})
    result = {
        "dimension": args.dimension, "metric": METRIC[args.dimension],
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "beta": args.beta,
                   "sft_weight": args.sft_weight, "seed": args.seed},
        "alphas": [float(a) for a in ALPHAS.split(",")], "max_prompts": args.max_prompts,
        "rows": table,
        "analytic_llama_8b": adapter_sizes(LLAMA_8B, ranks),
        "analytic_this_model": adapter_sizes(smollm2_shape(), ranks),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "ranks.json").write_text(json.dumps(result, indent=1))
    if args.results:
        dest = Path(args.results) / args.dimension
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "ranks.json").write_text(json.dumps(result, indent=1))
        for row in rows:
            sweep = out / row["dir"] / "sweep" / "sweep.json"
            (dest / f"sweep_{row['dir']}.json").write_text(sweep.read_text())
    m = METRIC[args.dimension]
    print(f"# {args.dimension}: {args.steps} steps x batch {args.batch_size}, beta {args.beta}, RPO weight "
          f"{args.sft_weight}, seed {args.seed}; sweep rho over alphas {ALPHAS} ({m}, {args.max_prompts} prompts)")
    print(f"{'row':<12}{'lr':>8}{'file bytes':>12}{'% full':>8}{'trainable':>12}{'s/step':>8}{'peak MB':>9}"
          f"{'train MB':>10}{'acc@1':>7}{'rho':>8}")
    for r in table:
        pct = f"{r['file_percent_of_full']:.2f}" if r["file_percent_of_full"] is not None else "-"
        print(f"{r['row']:<12}{r['lr']:>8g}{r['file_bytes']:>12,}{pct:>8}{r['trainable_params']:>12,}"
              f"{r['step_s']:>8.2f}{r['peak_rss_mb']:>9.0f}{r['train_rss_over_model_mb']:>10.0f}"
              f"{r['heldout_reward_accuracy']:>7.3f}{r['sweep_rho']:>8.3f}")
    for label in ("analytic_this_model", "analytic_llama_8b"):
        sizes = result[label]
        print(f"{label}: full layer {sizes['full_params']:,} params; " + ", ".join(
            f"r{r} {sizes[f'r{r}_all_linear_params']:,} ({sizes[f'r{r}_all_linear_percent_of_full']:.2f}%; "
            f"o/down only {sizes[f'r{r}_zeroed_only_percent_of_full']:.2f}%)" for r in ranks))


if __name__ == "__main__":
    main()
