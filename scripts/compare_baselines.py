"""CLM against full-DPO and LoRA-DPO trained on the same pairs with the same budget (steps, batch, lr, beta).

Trains each (or reuses a finished run), then reports held-out reward accuracy at full strength, the dimension's
metric on held-out prompts, trainable parameters, training time and peak memory; sweeps LoRA's own scale knob like
CLM's alpha, with the same metrics (`out/DIMENSION/lora_scale/sweep.{json,csv,png}`: fluency, per-prompt
reliability, held-out rewards); writes `compare.json`, with full DPO `full_dpo_reference.json` (the line `peft-clm
sweep --reference` draws), and a table.

    python scripts/compare_baselines.py --dimension concise --out runs/compare --steps 40    # ~25 min on 2 cores
    python scripts/compare_baselines.py --dimension formal --methods clm,lora   # without full DPO (the slowest)

A finished run is reused: a run directory holding `train_summary.json` (e.g. a copy of an adapter trained with the
same budget by `scripts/compare_ranks.py`) is not trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
METRIC = {"concise": "words", "formal": "casualness"}


def train_run(kind: str, args, out: Path) -> dict:
    """Train in a fresh process (so its peak memory is its own); return its summary."""
    summary = out / "train_summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    code = (
        "import json, sys; from peft_clm.tools.train import train; "
        f"r = train('smollm2', {str(ROOT / 'data' / args.dimension / 'train.jsonl')!r}, {str(out)!r}, method='dpo', "
        f"adapter={kind!r}, max_steps={args.steps}, batch_size={args.batch_size}, lr={args.lr}, beta={args.beta}, "
        f"sft_weight={args.sft_weight}, "
        "seed=0, progress=False); "
        "d = {k: v for k, v in r.__dict__.items() if k != 'log_history'}; print('RESULT', json.dumps(d))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training {kind} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[7:])
    summary.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dimension", default="concise", choices=sorted(METRIC))
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--sft-weight", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-prompts", type=int, default=24)
    parser.add_argument("--lora-scales", default="-0.5,0,0.25,0.5,0.75,1,1.5,2")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--methods", default="clm,lora,full", help="which of clm, lora, full to train and compare "
                        "(LoRA's scale sweep needs lora)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - {"clm", "lora", "full"}:
        raise SystemExit(f"--methods {args.methods!r}: expected a comma-separated subset of clm, lora, full")
    from peft import PeftModel

    from peft_clm.tools.data import read_jsonl
    from peft_clm.tools.generation import chat_text
    from peft_clm.tools.loading import load_model
    from peft_clm.tools.preference import preference_metrics, preference_metrics_baseline
    from peft_clm.tools.text_metrics import METRICS

    out = Path(args.out) / args.dimension
    heldout = read_jsonl(ROOT / "data" / args.dimension / "heldout.jsonl", "dpo")
    prompts = [r["prompt"] for r in heldout][: args.max_prompts]
    score = METRICS[METRIC[args.dimension]]
    runs = {kind: train_run(kind, args, out / kind) for kind in methods}

    answers_of: dict[str, list[str]] = {}  # kept in compare.json, so that a fixed metric can re-score them

    def metric_mean(model, tokenizer, name: str) -> float:
        tokenizer.padding_side = "left"
        answers = []
        for s in range(0, len(prompts), 24):
            batch = tokenizer([chat_text(tokenizer, p) for p in prompts[s:s + 24]], return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers += [tokenizer.decode(g[batch["input_ids"].shape[1]:], skip_special_tokens=True) for g in gen]
        answers_of[name] = answers
        return sum(map(score, answers)) / len(answers)

    rows = []
    base, tokenizer = load_model("smollm2")
    base_metric = metric_mean(base, tokenizer, "base")
    if "clm" in methods:
        clm = PeftModel.from_pretrained(base, out / "clm").eval()
        rows.append(
            {
                "kind": "clm",
                "method": "CLM (identity layer)",
                "held_out_reward_accuracy": preference_metrics(clm, tokenizer, heldout, beta=args.beta, alpha=1.0)[
                    "reward_accuracy"
                ],
                "metric_mean": metric_mean(clm, tokenizer, "CLM"),
            }
        )
        clm.unload()
    if "lora" in methods:
        lora_sweep, lora_rho = lora_rows(args, out, heldout, prompts, rows, metric_mean)
    else:
        lora_sweep, lora_rho = None, None
    if "full" in methods:
        full, tokenizer = load_model(str(out / "full"))
        reference, _ = load_model("smollm2")
        rows.append(
            {
                "kind": "full",
                "method": "full DPO (all parameters)",
                "held_out_reward_accuracy": preference_metrics_baseline(
                    full, tokenizer, heldout, beta=args.beta, reference_model=reference
                )["reward_accuracy"],
                "metric_mean": metric_mean(full, tokenizer, "full DPO"),
            }
        )
    for row in rows:
        r = runs[row.pop("kind")]
        row.update(
            trainable_params=r["trainable_params"],
            train_seconds=r["seconds"],
            seconds_per_step=r["seconds_per_step"],
            peak_rss_mb=r["peak_rss_mb"],
        )
    result = {
        "dimension": args.dimension,
        "metric": METRIC[args.dimension],
        "base_metric_mean": base_metric,
        "budget": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "beta": args.beta,
            "sft_weight": args.sft_weight,
        },
        "rows": rows,
        "lora_scale_sweep": lora_sweep,
        "lora_scale_spearman_rho": lora_rho,
        "date": time.strftime("%Y-%m-%d"),
        "answers": answers_of,
    }
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    if "full" in methods:
        full_row = next(r for r in rows if r["method"].startswith("full"))
        (out / "full_dpo_reference.json").write_text(json.dumps({
            f"{METRIC[args.dimension]}_mean": full_row["metric_mean"],
            "reward_accuracy": full_row["held_out_reward_accuracy"],
            "label": "full DPO",
        }))
    m = METRIC[args.dimension]
    print(
        f"# {args.dimension}: same pairs, {args.steps} steps x batch {args.batch_size}, lr {args.lr}, "
        f"beta {args.beta}; "
        f"base {m} = {base_metric:.2f}"
    )
    print(
        f"{'method':<30}{'held-out acc':>13}{m + ' mean':>16}{'trainable':>13}{'train s':>9}{'s/step':>8}"
        f"{'peak MB':>9}"
    )
    for r in rows:
        print(
            f"{r['method']:<30}{r['held_out_reward_accuracy']:>13.3f}{r['metric_mean']:>16.2f}"
            f"{r['trainable_params']:>13,}{r['train_seconds']:>9.0f}{r['seconds_per_step']:>8.2f}"
            f"{r['peak_rss_mb']:>9.0f}"
        )
    if lora_sweep is not None:
        print(
            f"LoRA scale sweep ({m}): "
            + ", ".join(f"{r['scale']:g}: {r['metric_mean']:.1f}" for r in lora_sweep)
            + f"; Spearman rho {lora_rho:.3f}"
        )


def lora_rows(args, out: Path, heldout: list, prompts: list, rows: list, metric_mean) -> tuple[list, float]:
    """LoRA-DPO at scale 1 (a row of `rows`) and swept over its scale with a CLM sweep's metrics."""
    from peft import PeftModel

    from peft_clm.tools.loading import load_model
    from peft_clm.tools.preference import preference_metrics_baseline
    from peft_clm.tools.sweep import knob_sweep

    base, tokenizer = load_model("smollm2")
    lora = PeftModel.from_pretrained(base, out / "lora").eval()
    rows.append(
        {
            "kind": "lora",
            "method": "LoRA-DPO (r=16, all linear)",
            "held_out_reward_accuracy": preference_metrics_baseline(lora, tokenizer, heldout, beta=args.beta)[
                "reward_accuracy"
            ],
            "metric_mean": metric_mean(lora, tokenizer, "LoRA-DPO"),
        }
    )
    scales = [float(x) for x in args.lora_scales.split(",")]

    @contextlib.contextmanager
    def lora_scale(scale: float):  # LoRA's own knob: the scale of every LoRA layer, back to 1 afterwards
        layers = [m for m in lora.modules() if hasattr(m, "set_scale") and "default" in getattr(m, "scaling", {})]
        for module in layers:
            module.set_scale("default", scale)
        try:
            yield
        finally:
            for module in layers:
                module.set_scale("default", 1.0)

    # the same metrics as a CLM sweep (fluency, per-prompt reliability, held-out rewards against scale 0)
    scale_sweep = knob_sweep(lora, tokenizer, lora_scale, scales, prompts, out / "lora_scale", metric=METRIC[
        args.dimension], pairs=heldout[: args.max_prompts], beta=args.beta, max_new_tokens=args.max_new_tokens,
        batch_size=24, label="LoRA-DPO", knob_name="LoRA scale", title=f"{METRIC[args.dimension]} vs LoRA scale")
    lora_sweep = [{"scale": r["alpha"], "metric_mean": r[f"{METRIC[args.dimension]}_mean"]} for r in
                  scale_sweep["rows"]]
    return lora_sweep, scale_sweep["spearman_rho"]


if __name__ == "__main__":
    main()
