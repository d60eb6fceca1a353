"""Training in two processes (accelerate launch, DDP over gloo on CPU) on a tiny model: the same adapter and loss
curve as one process with the same global batch and seed; one writer of --out; refusals reach every process."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from tiny_models import preference_rows, save_tiny_model_dir


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import check_multiprocess  # noqa: E402


pytestmark = pytest.mark.slow  # each launch starts two Python processes that import torch, transformers and TRL


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("mp")
    save_tiny_model_dir(path / "tiny")
    (path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(16)))
    return path / "tiny", path / "pairs.jsonl"


def launch(processes: int, args: list, launcher_args: tuple = ()) -> subprocess.CompletedProcess:
    cmd = check_multiprocess.launch_command(processes, [str(a) for a in args])
    if launcher_args:  # replace the multi-process flags, e.g. with accelerate's --cpu
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "-m", "peft_clm", "train",
               *[str(a) for a in args]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_two_processes_give_the_one_process_adapter(inputs, tmp_path):
    model, data = inputs
    common = ["--model", model, "--data", data, "--max-steps", 4, "--lr", 5e-3, "--beta", 0.1, "--sft-weight", 1.0,
              "--seed", 0, "--quiet"]
    one = launch(1, [*common, "--batch-size", 4, "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, [*common, "--batch-size", 2, "--out", tmp_path / "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    # one summary and one writer, though two processes trained
    assert two.stdout.count("adapter saved to") == 1 and "2 processes; global batch 4" in two.stdout
    result = check_multiprocess.compare(tmp_path / "one", tmp_path / "two")
    # DDP averages the gradients of two half batches where one process sums over the whole batch: the same
    # arithmetic in another order, so float32 rounding (~1e-7 relative), not a different update. 4 Adam steps of
    # lr 5e-3 move a weight by up to 2e-2, so 1e-5 is a thousandth of the update.
    assert result["max_abs_diff"] < 1e-5, result
    saved = load_file(tmp_path / "two" / "adapter_model.safetensors")
    zeroed = [v for k, v in saved.items() if k.endswith("o_proj.weight") or k.endswith("down_proj.weight")]
    assert zeroed and max(v.abs().max().item() for v in zeroed) > 1e-3  # it trained away from the identity
    assert len(result["loss_one_process"]) == len(result["loss_multi_process"]) == 4
    assert result["max_loss_diff"] < 1e-5, result


def test_two_processes_give_the_one_process_adapter_with_a_hold(inputs, tmp_path):
    """With a hold (tools.hold) each process holds its slice of the global batch of hold rows and the KL is the mean
    over all processes' tokens: the one-process adapter and loss curve again."""
    model, data = inputs
    hold = tmp_path / "hold.jsonl"
    topics = zip(["answer", "question", "sentence", "reply", "friend", "word"], [1, 2, 1, 3, 1, 2])
    rows = [{"prompt": f"what about the {t} ?", "completion": " ".join([f"perhaps the {t} is good ."] * k)}
            for t, k in topics]
    hold.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", model, "--data", data, "--hold", hold, "--hold-weight", 5.0, "--max-steps", 3, "--lr", 5e-3,
              "--beta", 0.1, "--seed", 0, "--quiet"]
    one = launch(1, [*common, "--batch-size", 4, "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, [*common, "--batch-size", 2, "--out", tmp_path / "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    result = check_multiprocess.compare(tmp_path / "one", tmp_path / "two")
    # the held answers differ in length, so a mean per process would differ from the mean over all tokens
    assert result["max_abs_diff"] < 1e-5 and result["max_loss_diff"] < 1e-5, result
    assert len(result["loss_one_process"]) == 3
    # the hold term was there in both runs, and the same
    kls = [[h["hold/kl"] for h in check_multiprocess.log_history(tmp_path / name) if "hold/kl" in h]
           for name in ("one", "two")]
    assert len(kls[0]) == len(kls[1]) == 3 and kls[0][0] == pytest.approx(0.0, abs=1e-7) and min(kls[0][1:]) > 1e-4
    # KLs of ~2e-4 are differences of nearly equal log-probabilities, computed on differently padded batches: float32
    # rounding reaches ~1e-4 of them (2e-8 measured), a hold term dropped or halved would be off by 50-100%
    assert kls[0] == pytest.approx(kls[1], rel=1e-3, abs=1e-7)


def test_a_refused_run_stops_every_process_and_the_cpu_launcher_is_refused(inputs, tmp_path):
    model, data = inputs
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", model, "--data", data, "--max-steps", 2, "--batch-size", 2, "--quiet"]
    # the main process refuses a non-empty --out; the other process gets the same error instead of waiting forever
    proc = launch(2, [*args, "--out", out])
    assert proc.returncode != 0
    assert proc.stderr.count("is not empty") >= 2, proc.stderr[-3000:]  # printed by each process
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    # `accelerate launch --cpu --num_processes 2` starts one process: refused rather than trained on half the batch
    proc = launch(1, [*args, "--out", tmp_path / "cpu"], launcher_args=("--cpu", "--num_processes", "2"))
    assert proc.returncode != 0 and "starts a single process" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "cpu").exists()
