"""A steering-vector baseline on the same pairs and model as CLM, with the `steering-vectors` library (Chanin et al.;
contrastive activation addition, Rimsky et al. 2024): the vector is the mean, over the training pairs, of the
difference of the residual stream after one decoder layer between "prompt + chosen" and "prompt + rejected", read at
the last token of each answer (the library's default). At inference `vector.apply(model, multiplier=m)` adds
m x vector to that layer's output at every position; the multiplier is swept over the same grid as CLM's alpha and
scored with the same metrics (`peft_clm.tools.sweep.knob_sweep`: the dimension's metric and its rho, per-prompt
wrong-way fraction, fluency, and held-out reward accuracy of the steered model against the unsteered one).

    python scripts/steering_baseline.py --dimension concise --out results/baselines/concise_steering \\
        --max-new-tokens 64
    python scripts/steering_baseline.py --dimension formal --out results/baselines/formal_steering
    python scripts/steering_baseline.py --dimension formal --train data/formal/train_best_of_8.jsonl \\
        --out results/baselines/formal_best_of_steering

Install: `steering-vectors` 0.12.2 declares `transformers<5` although its code runs on transformers 5.23 (checked
here: training, hooks, generation with a KV cache), so pip's resolver refuses it beside this package; install it
without its dependency pins: `pip install -e ".[baselines]" && pip install --no-deps steering-vectors==0.12.2`.
(`repeng` 0.4.0, the other candidate, needs numpy<2, which pandas 3 here refuses, and uses `np.float_`, gone in
numpy 2.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safetensors.torch import save_file


ROOT = Path(__file__).resolve().parent.parent
METRIC = {"concise": "words", "formal": "casualness"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dimension", required=True, choices=sorted(METRIC))
    parser.add_argument("--out", required=True)
    parser.add_argument("--layer", type=int, default=12,
                        help="decoder layer to steer (default 12 of 30: ~40%% depth, where CAA steers best)")
    parser.add_argument("--multipliers", default="-0.5,0,0.25,0.5,0.75,1,1.5,2")
    parser.add_argument("--max-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--train", help="the training pairs (default: data/DIMENSION/train.jsonl), e.g. "
                        "data/formal/train_best_of_8.jsonl to compare with a CLM knob trained on those")
    args = parser.parse_args()
    try:
        from steering_vectors import SteeringVectorTrainingSample, train_steering_vector
    except ImportError:
        raise SystemExit("steering-vectors is not installed: pip install --no-deps steering-vectors==0.12.2 "
                         "scikit-learn (see this script's docstring)") from None

    from peft_clm.tools.data import read_jsonl
    from peft_clm.tools.generation import chat_text
    from peft_clm.tools.loading import load_model
    from peft_clm.tools.sweep import format_table, knob_sweep

    multipliers = [float(x) for x in args.multipliers.split(",")]
    train_rows = read_jsonl(args.train or ROOT / "data" / args.dimension / "train.jsonl", "dpo")
    heldout = read_jsonl(ROOT / "data" / args.dimension / "heldout.jsonl", "dpo")[: args.max_prompts]
    model, tokenizer = load_model("smollm2")
    model.eval()
    t0 = time.perf_counter()
    tokenizer.padding_side = "left"
    samples = [
        SteeringVectorTrainingSample(chat_text(tokenizer, r["prompt"]) + r["chosen"][-1]["content"],
                                     chat_text(tokenizer, r["prompt"]) + r["rejected"][-1]["content"])
        for r in train_rows
    ]
    vector = train_steering_vector(model, tokenizer, samples, layers=[args.layer], batch_size=8)
    train_s = time.perf_counter() - t0
    norm = float(vector.layer_activations[args.layer].norm())
    print(f"steering vector: layer {args.layer}, norm {norm:.3f}, from {len(samples)} pairs in {train_s:.0f} s")

    def knob(multiplier: float):
        return vector.apply(model, multiplier=multiplier)

    result = knob_sweep(
        model, tokenizer, knob, multipliers, [r["prompt"] for r in heldout], args.out, metric=METRIC[args.dimension],
        pairs=heldout, beta=args.beta, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        label="steering vector", knob_name="multiplier",
        title=f"{METRIC[args.dimension]} vs steering multiplier (layer {args.layer})",
    )
    meta = {"library": "steering-vectors 0.12.2", "layer": args.layer, "vector_norm": norm,
            "train_pairs": len(samples), "train_file": str(args.train or f"data/{args.dimension}/train.jsonl"),
            "train_seconds": train_s}
    result["steering"] = meta
    (Path(args.out) / "steering.json").write_text(json.dumps(meta, indent=1))
    # weights are only ever written as safetensors
    save_file({f"layer_{k}": v.detach().cpu().contiguous() for k, v in vector.layer_activations.items()},
              str(Path(args.out) / "vector.safetensors"))
    print(format_table(result))
    print(f"total {result['total_seconds']:.0f} s; wrote {args.out}/sweep.json, sweep.csv, sweep.png, "
          "vector.safetensors")


if __name__ == "__main__":
    main()
