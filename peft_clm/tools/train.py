"""Training the CLM layer with TRL's DPOTrainer or SFTTrainer: a thin layer over TRL and transformers."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import ClmConfig
from .data import read_jsonl


@dataclass
class TrainResult:
    """What a training run did."""

    out_dir: str
    method: str
    steps: int
    seconds: float
    seconds_per_step: float
    trainable_params: int
    total_params: int
    final_loss: Optional[float]
    first_loss: Optional[float]
    reward_accuracy: Optional[float]
    peak_rss_mb: float
    log_history: list = field(default_factory=list, repr=False)
    step_seconds: list = field(default_factory=list, repr=False)  # each optimiser step, saving excluded

    def summary(self) -> str:
        lines = [
            f"trained {self.method.upper()} for {self.steps} steps in {self.seconds:.1f} s "
            f"({self.seconds_per_step:.2f} s/step)",
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_params / self.total_params:.2f}%)",
            f"loss: {self.first_loss:.4f} -> {self.final_loss:.4f}" if self.final_loss is not None else "loss: n/a",
        ]
        if self.reward_accuracy is not None:
            lines.append(f"reward accuracy (last logged steps): {self.reward_accuracy:.3f}")
        lines.append(f"peak memory (RSS): {self.peak_rss_mb:.0f} MB")
        lines.append(f"adapter saved to {self.out_dir}")
        return "\n".join(lines)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _StepTimer:
    """Times each optimiser step (forward, backward, update), not checkpoint saving or logging."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.seconds.append(time.perf_counter() - timer.start)

        self.start = 0.0
        self.seconds: list[float] = []
        self.callback = Callback()


def train(
    model: str,
    data: str,
    out: str,
    method: str = "dpo",
    adapter: str = "clm",
    interpolation: str = "logits",
    epochs: float = 1.0,
    max_steps: int = -1,
    lr: float = 5e-4,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    batch_size: int = 4,
    grad_accum: int = 1,
    seed: int = 0,
    max_length: int = 256,
    gradient_checkpointing: bool = False,
    bf16: bool = False,
    resume: Optional[str] = None,
    separate_reference: bool = False,
    logging_steps: int = 1,
    progress: bool = True,
) -> TrainResult:
    """Train a CLM adapter on `data` (JSONL) and save it to `out`.

    `model` is a local HF directory, a `.gguf` file or `smollm2`. `method` is "dpo" (prompt/chosen/rejected) or
    "sft" (prompt/completion or messages). The reference policy of DPO is the same model with the adapter off.
    `resume` is a checkpoint directory under `out`, or "last". `adapter` picks what is trained: "clm" (the
    identity layer), or the baselines "lora" (rank 16 on every linear layer) and "full" (every parameter; TRL then
    keeps a frozen reference copy of the model). `sft_weight` adds the chosen answers' NLL to the DPO loss.
    `separate_reference=True` gives DPO a second, frozen copy of the base model as the reference instead of
    switching the adapter off (what a plain DPO set-up without adapter tricks costs; for benchmarks).

    Example:
        ```py
        >>> result = train("smollm2", "pairs.jsonl", "adapter", method="dpo", max_steps=50)
        >>> print(result.summary())
        ```
    """
    from datasets import Dataset
    from transformers import set_seed

    from .loading import load_model

    rows = read_jsonl(data, method)  # checked in full before anything loads
    set_seed(seed)
    random.seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    base, tokenizer = load_model(model, dtype=dtype)
    dataset = Dataset.from_list(rows)
    if adapter == "clm":
        peft_config = ClmConfig(interpolation=interpolation, alpha=1.0)
    elif adapter == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
        )
    elif adapter == "full":
        peft_config = None
    else:
        raise ValueError(f"adapter={adapter!r} is not one of 'clm', 'lora', 'full'.")
    common = {
        "output_dir": out,
        "num_train_epochs": epochs,
        "max_steps": max_steps,
        "learning_rate": lr,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": logging_steps,
        "save_strategy": "steps",
        "save_steps": max(1, max_steps // 2) if max_steps > 0 else 500,
        "save_total_limit": 1,
        "report_to": [],
        "activation_checkpointing": gradient_checkpointing,  # the current name of gradient checkpointing
        "bf16": bf16,
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": not progress,
        "max_length": max_length,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
    }
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        # sft_weight > 0 adds the NLL of the chosen answers (RPO), which keeps the policy fluent.
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight > 0 else {}
        args = DPOConfig(beta=beta, **losses, **common)
        ref_model = load_model(model, dtype=dtype)[0].eval() if separate_reference else None
        trainer = DPOTrainer(
            model=base,
            ref_model=ref_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common)
        trainer = SFTTrainer(
            model=base, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    timer = _StepTimer()
    trainer.add_callback(timer.callback)
    if not progress:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if resume == "last":
        checkpoints = sorted(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        resume = str(checkpoints[-1]) if checkpoints else None
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if adapter == "full":
        trainable = total = sum(p.numel() for p in trainer.model.parameters())
    else:
        trainable, total = trainer.model.get_nb_trainable_parameters()
    history = [h for h in trainer.state.log_history if "loss" in h]
    accuracies = [h["rewards/accuracies"] for h in history if "rewards/accuracies" in h]
    tail = accuracies[-max(1, len(accuracies) // 4) :]
    steps = output.global_step
    return TrainResult(
        out_dir=out,
        method=method if adapter == "clm" else f"{method}-{adapter}",
        steps=steps,
        seconds=seconds,
        seconds_per_step=seconds / max(1, steps),
        trainable_params=trainable,
        total_params=total,
        final_loss=history[-1]["loss"] if history else None,
        first_loss=history[0]["loss"] if history else None,
        reward_accuracy=sum(tail) / len(tail) if tail else None,
        peak_rss_mb=_peak_rss_mb(),
        log_history=trainer.state.log_history,
        step_seconds=timer.seconds,
    )
