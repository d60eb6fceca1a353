"""`peft-clm` command line: thin shells over the library calls."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _train(args: argparse.Namespace) -> int:
    from .train import train

    result = train(
        model=args.model, data=args.data, out=args.out, method=args.method, interpolation=args.interpolation,
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, beta=args.beta, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seed=args.seed, max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, resume=args.resume,
        progress=not args.quiet,
    )
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-clm", description="Controllable-alignment layers (CLM) for LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a CLM adapter with DPO or SFT (TRL)")
    t.add_argument("--model", required=True, help="local HF directory, a .gguf file, or 'smollm2'")
    t.add_argument("--data", required=True, help="JSONL: prompt/chosen/rejected (dpo) or prompt/completion (sft)")
    t.add_argument("--method", choices=["dpo", "sft"], default="dpo")
    t.add_argument("--out", required=True, help="adapter directory to write")
    t.add_argument("--interpolation", choices=["logits", "hidden", "weights"], default="logits")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=-1)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--beta", type=float, default=0.1)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--resume", help="checkpoint directory, or 'last'")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear message, no traceback
        print(f"peft-clm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
