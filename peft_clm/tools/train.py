"""Training the CLM layer with TRL's DPOTrainer or SFTTrainer: a thin layer over TRL and transformers.

Several processes (`accelerate launch --multi_gpu --num_processes N -m peft_clm train ...`, or `torchrun`) train
one adapter with DDP: accelerate starts the process group (gloo on CPU, NCCL on GPUs), the Trainer wraps the model
after the CLM layer is injected and shards each global batch; this module only keeps the file work (the output
directory's checks, the GGUF conversion, saving, cleaning up after a failure) on the main process.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
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
    peak_rss_mb: float  # host RSS of this process, over its whole life (model loading included)
    num_processes: int = 1
    global_batch_size: int = 0  # pairs (or examples) per optimiser step, over every process
    is_main_process: bool = True
    log_history: list = field(default_factory=list, repr=False)
    step_seconds: list = field(default_factory=list, repr=False)  # each optimiser step, saving excluded
    # host RSS when training started (model loaded) and its peak while training; None where the OS cannot reset
    # the peak
    train_start_rss_mb: Optional[float] = None
    train_peak_rss_mb: Optional[float] = None

    def summary(self) -> str:
        lines = [
            f"trained {self.method.upper()} for {self.steps} steps in {self.seconds:.1f} s "
            f"({self.seconds_per_step:.2f} s/step)",
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_params / self.total_params:.2f}%)",
            f"loss: {self.first_loss:.4f} -> {self.final_loss:.4f}" if self.final_loss is not None else "loss: n/a",
        ]
        if self.num_processes > 1:
            lines.append(f"{self.num_processes} processes; global batch {self.global_batch_size} per optimiser step; "
                         "peak memory below is the main process's")
        if self.reward_accuracy is not None:
            lines.append(f"reward accuracy (last logged steps): {self.reward_accuracy:.3f}")
        lines.append(f"peak memory (host RSS): {self.peak_rss_mb:.0f} MB")
        if self.train_peak_rss_mb is not None:
            lines.append(f"peak memory while training: {self.train_peak_rss_mb:.0f} MB "
                         f"({self.train_peak_rss_mb - self.train_start_rss_mb:+.0f} MB over the loaded model)")
        lines.append(f"adapter saved to {self.out_dir}")
        return "\n".join(lines)


def _peak_rss_mb() -> float:
    """This process's peak RSS so far, including peaks from before a `_TrainingPeakMemory` reset."""
    import resource

    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(now, _TrainingPeakMemory.lifetime_mb)


class _TrainingPeakMemory:
    """The peak host RSS of this process while training only, not while the model loads (which dominates the
    lifetime peak and hides what an adapter's training state costs); GPU memory is not counted.

    Lifecycle: `start()` keeps the lifetime peak so far in `lifetime_mb` (the reset below also resets what
    `getrusage` reports, for every later call in the process), resets the kernel's high-water mark
    (`/proc/self/clear_refs`, "5", Linux) and records the RSS; `stop()` reads the mark back. Where the reset is
    not available or does not take (the mark stays far above the RSS), both figures are None.
    """

    lifetime_mb = 0.0  # the process's peak RSS before any reset; class-wide, as the kernel's mark is process-wide

    def __init__(self) -> None:
        self.start_mb: Optional[float] = None
        self.peak_mb: Optional[float] = None

    @staticmethod
    def _status_mb(key: str) -> float:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key + ":"))
        return int(line.split()[1]) / 1024  # kB

    def start(self) -> None:
        _TrainingPeakMemory.lifetime_mb = _peak_rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss, mark = self._status_mb("VmRSS"), self._status_mb("VmHWM")
            self.start_mb = rss if mark - rss < 16 else None  # 16 MB: what the process may allocate in between
        except (OSError, StopIteration, ValueError):
            self.start_mb = None

    def stop(self) -> None:
        try:
            # the kernel's RSS counters are synced lazily: the mark can read a fraction of a MB below the start
            self.peak_mb = max(self._status_mb("VmHWM"), self.start_mb) if self.start_mb is not None else None
        except (OSError, StopIteration, ValueError):
            self.peak_mb = None


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


class TrainingDiverged(RuntimeError):
    """The loss or the trained weights became NaN or infinite; nothing was saved."""


def check_hyperparameters(**values: float) -> None:
    """Refuse non-finite or out-of-range hyper-parameters before anything loads (one error naming each bad one)."""
    rules = {
        "lr": (lambda v: v > 0, "a finite number > 0"),
        "beta": (lambda v: v > 0, "a finite number > 0"),
        "sft_weight": (lambda v: v >= 0, "a finite number >= 0"),
        "epochs": (lambda v: v > 0, "a finite number > 0"),
        "batch_size": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
        "grad_accum": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
        "max_length": (lambda v: v >= 8 and v == int(v), "an integer >= 8"),
        "max_steps": (lambda v: v == -1 or (v >= 1 and v == int(v)), "-1 (use epochs) or an integer >= 1"),
    }
    bad = []
    for name, value in values.items():
        ok, accepted = rules[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            bad.append(f"{name}={value!r} (must be {accepted})")
    if bad:
        raise ValueError("bad training settings: " + "; ".join(bad) + ". Nothing was trained.")


def prepare_output_dir(out: str, model_dir: Optional[Path], resume: Optional[str], overwrite: bool) -> bool:
    """Check where a run may write; returns whether the directory is new (then a failed run removes it).

    `out` must not be (or be inside) the model's own directory, nor a file; an existing non-empty directory is
    refused unless the run resumes from it or `overwrite` is set (then it is emptied first).
    """
    path = Path(out).resolve()
    if model_dir is not None:
        model_dir = Path(model_dir).resolve()
        if path == model_dir or model_dir in path.parents:
            raise ValueError(f"--out {out} is the model's own directory {model_dir} (or inside it); choose another.")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is an existing file; choose a directory.")
    if path.is_dir() and any(path.iterdir()):
        if resume:
            return False
        if not overwrite:
            raise ValueError(f"--out {out} is not empty (it may hold an adapter); choose a new directory, resume from "
                             "it with --resume, or pass --overwrite to replace what is there.")
        shutil.rmtree(path)
    new = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    return new


def _discard_run_output(out: str, new_out: bool, before: set) -> None:
    """Undo what a failed run wrote: remove `out` if the run created it, else only the entries it added."""
    if new_out:
        shutil.rmtree(out, ignore_errors=True)
    elif Path(out).is_dir():
        for item in set(Path(out).iterdir()) - before:
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def _distributed_state():
    """accelerate's process state: starts the process group when launched with several processes (gloo on CPU).

    `accelerate launch --cpu --num_processes N` starts ONE process (accelerate runs several CPU processes only
    through mpirun): it sets MASTER_PORT but no world size. Training then would silently run alone on a global batch
    N times smaller than asked; refused with the commands that do start N processes.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    launched_alone = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in os.environ
    if state.num_processes == 1 and launched_alone and not os.environ.get("WORLD_SIZE"):
        raise ValueError(
            "`accelerate launch --cpu --num_processes N` starts a single process (without mpirun); nothing was "
            "trained. Start N CPU processes with `accelerate launch --multi_gpu --num_processes N -m peft_clm train "
            "...` (gloo when there is no GPU) or `torchrun --nproc-per-node N -m peft_clm train ...`."
        )
    return state


def _main_process_first(state, work):
    """Run `work()` on the main process only and hand its result, or its error, to every process: file work
    (checking and creating --out, converting a GGUF once) must not race, and a process must not wait forever on a
    main process that refused the run."""
    if state.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    outcome = [None]
    if state.is_main_process:
        try:
            outcome = [(True, work())]
        except Exception as e:  # handed to the other processes, then raised everywhere
            outcome = [(False, e)]
    broadcast_object_list(outcome, from_process=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _finite_guard():
    """A callback that stops training at the first non-finite loss, gradient norm or trained weight."""
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        def __init__(self) -> None:
            self.problem: Optional[str] = None

        def _stop(self, control, problem: str):
            self.problem = self.problem or problem
            control.should_training_stop = True
            control.should_save = False
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    return self._stop(control, f"{key} became {value} at step {state.global_step}")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            params = [p for p in (model.parameters() if model is not None else []) if p.requires_grad]
            if any(not torch.isfinite(p).all() for p in params):
                return self._stop(control, f"trained weights became non-finite at step {state.global_step}")

    return FiniteGuard()


def _save_atomically(model, tokenizer, out: str) -> None:
    # written beside `out`, then moved in file by file: a crash never leaves a half-written adapter file
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, Path(out) / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _per_pair_alpha(rows: list[dict], adapter: str, interpolation: str) -> bool:
    """Whether DPO rows name their own alpha (`tools.alpha_pairs`); if so, every row gets a `clm_alpha` (1 where it
    has none). Refuses what cannot score a pair at its own alpha."""
    if not any("alpha" in r for r in rows):
        return False
    if adapter != "clm":
        raise ValueError(
            f"the data's 'alpha' fields score each pair at an alpha of a CLM knob; adapter={adapter!r} has no alpha "
            "(use adapter 'clm', or drop the fields)."
        )
    if interpolation == "weights":
        raise ValueError(
            "the data's 'alpha' fields need one alpha per sequence, which weights mode does not take; train in "
            "'logits' or 'hidden' mode (a negative end is learnt for the mode it is trained in)."
        )
    for r in rows:
        r["clm_alpha"] = float(r.pop("alpha", 1.0))
    return True


def train(
    model: str,
    data: str,
    out: str,
    method: str = "dpo",
    adapter: str = "clm",
    rank: Optional[int] = None,
    lowrank_modules: Optional[list[str]] = None,
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
    overwrite: bool = False,
    hold: Optional[str] = None,
    hold_weight: Optional[float] = None,
) -> TrainResult:
    """Train a CLM adapter on `data` (JSONL) and save it to `out`.

    `model` is a local HF directory, a `.gguf` file or `smollm2`. `method` is "dpo" (prompt/chosen/rejected) or
    "sft" (prompt/completion or messages). The reference policy of DPO is the same model with the adapter off.
    `resume` is a checkpoint directory under `out`, or "last". `adapter` picks what is trained: "clm" (the
    identity layer; with `rank`, a low-rank CLM layer whose file holds only rank-r factors), or the baselines
    "lora" (rank 16 on every linear layer) and "full" (every parameter; TRL then keeps a frozen reference copy of
    the model). `lowrank_modules` names the layer's linear modules that get factors (default: every one; the two
    zeroed projections alone give the smallest file). `sft_weight` adds the chosen answers' NLL to the DPO loss.
    DPO rows with an `alpha` field are scored with the policy at that alpha (`tools.alpha_pairs`: training both
    ends of one knob); rows without one at 1.
    `hold` (DPO with a PEFT adapter) is a JSONL file of prompt/completion (or messages) rows whose answer tokens the
    adapter should leave alone: `hold_weight` (default 1) times the KL from the base to the policy on a batch of them
    (`batch_size` rows a process) is added to each micro-batch's loss (`tools.hold`; where the KL is 0, logits-mode
    knobs leave those tokens where the base puts them at any alpha and when added).
    `separate_reference=True` gives DPO a second, frozen copy of the base model as the reference instead of
    switching the adapter off (what a plain DPO set-up without adapter tricks costs; for benchmarks).
    On Linux the run resets the process's peak-RSS mark when training starts (to report `train_peak_rss_mb`), so
    `resource.getrusage(...).ru_maxrss` read afterwards in the same process no longer includes earlier peaks; the
    result's `peak_rss_mb` does.
    `out` must be new or empty (or `resume` from it, or `overwrite` it), and never the model's own directory. A run
    whose loss or weights become non-finite raises `TrainingDiverged` and saves nothing.

    Example:
        ```py
        >>> result = train("smollm2", "pairs.jsonl", "adapter", method="dpo", max_steps=50)
        >>> print(result.summary())
        ```
    """
    from datasets import Dataset
    from transformers import set_seed

    from .loading import load_model, resolve_model_path

    check_hyperparameters(lr=lr, beta=beta, sft_weight=sft_weight, epochs=epochs, batch_size=batch_size,
                          grad_accum=grad_accum, max_length=max_length, max_steps=max_steps)
    if method not in ("dpo", "sft"):
        raise ValueError(f"method={method!r} is not one of 'dpo', 'sft'.")
    if adapter not in ("clm", "lora", "full"):
        raise ValueError(f"adapter={adapter!r} is not one of 'clm', 'lora', 'full'.")
    if hold is None and hold_weight is not None:
        raise ValueError(f"hold_weight={hold_weight!r} weighs a hold file, and none was given (--hold FILE).")
    if hold is not None and (method != "dpo" or adapter == "full" or separate_reference):
        raise ValueError(
            "a hold file keeps a PEFT adapter's DPO policy at the model with the adapter off: it needs method 'dpo', "
            f"adapter 'clm' or 'lora' and no separate reference (got method={method!r}, adapter={adapter!r}, "
            f"separate_reference={separate_reference})."
        )
    if rank is not None and adapter != "clm":
        raise ValueError("--rank makes a low-rank CLM layer; it does not apply to --adapter-type lora or full.")
    ClmConfig(r=rank, lowrank_modules=lowrank_modules)  # checked before anything loads
    rows = read_jsonl(data, method)  # checked in full before anything loads
    per_pair_alpha = _per_pair_alpha(rows, adapter, interpolation)
    state = _distributed_state()
    hold_rows = None
    if hold is not None:  # checked in full before anything loads
        from .hold import check_hold

        hold_weight = 1.0 if hold_weight is None else hold_weight
        try:
            hold_rows = check_hold(read_jsonl(hold, "sft"), hold_weight, batch_size, state.num_processes)
        except FileNotFoundError:
            raise FileNotFoundError(f"--hold {hold}: no such file (a JSONL of prompt/completion rows).") from None
        except ValueError as e:
            raise ValueError(f"--hold {hold}: {e}") from e

    def prepare() -> tuple[bool, set]:
        new = prepare_output_dir(out, resolve_model_path(model), resume, overwrite)
        return new, set(Path(out).iterdir())

    new_out, before = _main_process_first(state, prepare)
    try:
        set_seed(seed)  # the same seed in every process: the same initial layer (DDP also broadcasts rank 0's)
        random.seed(seed)
        dtype = torch.bfloat16 if bf16 else torch.float32
        base, tokenizer = load_model(model, dtype=dtype)
        dataset = Dataset.from_list(rows)
        if adapter == "clm":
            peft_config = ClmConfig(interpolation=interpolation, alpha=1.0, r=rank, lowrank_modules=lowrank_modules)
        elif adapter == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
            )
        else:
            peft_config = None
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
            "logging_nan_inf_filter": False,  # log the real loss, so a NaN is seen (and stops the run)
            # every trainable parameter (the CLM layer or its factors, LoRA, the whole model) takes part in every
            # forward, so DDP need not walk the graph for unused ones each step
            "ddp_find_unused_parameters": False,
        }
        if method == "dpo":
            from trl import DPOConfig, DPOTrainer

            # sft_weight > 0 adds the NLL of the chosen answers (RPO), which keeps the policy fluent.
            losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight > 0 else {}
            args = DPOConfig(beta=beta, **losses, **common)
            ref_model = load_model(model, dtype=dtype)[0].eval() if separate_reference else None
            if per_pair_alpha:
                from .alpha_pairs import AlphaPairDPOTrainer as DPOTrainer  # noqa: N814
            extra = {}
            if hold_rows is not None:
                from .hold import hold_trainer

                DPOTrainer = hold_trainer(DPOTrainer)  # noqa: N806
                extra = {"hold_rows": hold_rows, "hold_weight": hold_weight, "hold_batch_size": batch_size}
            trainer = DPOTrainer(
                model=base,
                ref_model=ref_model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=peft_config,
                **extra,
            )
        else:
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(**common)
            trainer = SFTTrainer(
                model=base, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
            )
        timer, guard = _StepTimer(), _finite_guard()
        trainer.add_callback(timer.callback)
        trainer.add_callback(guard)
        if not progress:
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        if resume == "last":
            checkpoints = sorted(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            resume = str(checkpoints[-1]) if checkpoints else None
    except Exception:  # a run refused while setting up (a bad module name, data the trainer rejects) writes nothing
        if state.is_main_process:
            _discard_run_output(out, new_out, before)
        raise
    memory = _TrainingPeakMemory()
    memory.start()
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    memory.stop()
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()  # every process has finished (and written its checkpoint part)
    if guard.problem:  # every process sees the same gathered loss and synchronised weights, so all stop here
        if accelerator.is_main_process:
            _discard_run_output(out, new_out, before)
        accelerator.wait_for_everyone()
        raise TrainingDiverged(f"training diverged: {guard.problem}; nothing was saved. Lower --lr or check the data.")
    if accelerator.is_main_process:  # the trained weights are the same in every process: one writer
        _save_atomically(trainer.model, tokenizer, out)
    accelerator.wait_for_everyone()  # no process returns before the adapter is there
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
        peak_rss_mb=max(_peak_rss_mb(), memory.peak_mb or 0.0),
        train_start_rss_mb=memory.start_mb,
        train_peak_rss_mb=memory.peak_mb,
        num_processes=state.num_processes,
        global_batch_size=batch_size * grad_accum * state.num_processes,
        is_main_process=state.is_main_process,
        log_history=trainer.state.log_history,
        step_seconds=timer.seconds,
    )
