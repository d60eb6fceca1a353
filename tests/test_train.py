"""Training the CLM layer through the CLI and TRL on a tiny random model."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tiny_models import preference_rows, save_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_clm import ClmConfig
from peft_clm.tools.cli import main
from peft_clm.tools.data import DataError, read_jsonl
from peft_clm.tools.hold import hold_kl, hold_rows_from, token_kl
from peft_clm.tools.preference import completion_batches, preference_metrics
from peft_clm.tools.train import train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_model_dir(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_dpo_trains_only_the_layer_and_lowers_the_loss(tiny_dir, tmp_path, capsys):
    rows = preference_rows(16)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "adapter"
    code = main(["train", "--model", str(tiny_dir), "--data", str(data), "--method", "dpo", "--out", str(out),
                 "--max-steps", "12", "--batch-size", "4", "--lr", "5e-3", "--beta", "0.5", "--seed", "0", "--quiet"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "trained DPO for 12 steps" in summary and "trainable params" in summary and "reward accuracy" in summary
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = PeftModel.from_pretrained(base, out)
    for name, p in model.named_parameters():
        if ".clm_layers." not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(p, original[key]), name  # the base is bit-identical
    layer = model.base_model.clm_layer()
    identity = layer.identity_parameters()
    changed = [n for n, p in layer.adapter_parameters("default").items() if not torch.equal(p, identity[n])]
    assert changed  # the identity layer moved
    before = preference_metrics(model, tokenizer, rows, beta=0.5, alpha=0.0)
    after = preference_metrics(model, tokenizer, rows, beta=0.5, alpha=1.0)
    assert before["dpo_loss"] == pytest.approx(0.6931, abs=1e-4)  # alpha 0 is the reference itself
    assert after["dpo_loss"] < before["dpo_loss"] - 0.05
    assert after["reward_accuracy"] > 0.5


def test_training_with_trl_both_paths(tiny_dir, tmp_path):
    """DPOTrainer given a peft_config, and given an already-wrapped CLM model (TRL then adds a `ref` copy)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    dataset = Dataset.from_list(preference_rows(8))
    args = {
        "output_dir": str(tmp_path),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "report_to": [],
        "use_cpu": True,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    trainer = DPOTrainer(
        model=base,
        args=DPOConfig(**args),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=ClmConfig(interpolation="hidden"),
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)

    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), ClmConfig(interpolation="logits"))
    trainer = DPOTrainer(model=wrapped, args=DPOConfig(**args), train_dataset=dataset, processing_class=tokenizer)
    assert "ref" in wrapped.peft_config
    trainer.train()
    layer = wrapped.base_model.clm_layer()
    identity = layer.identity_parameters()
    ref = layer.adapter_parameters("ref")
    assert all(torch.equal(ref[n], identity[n]) for n in ref)  # the frozen reference copy did not move
    assert any(not torch.equal(p, identity[n]) for n, p in layer.adapter_parameters("default").items())


def test_cli_sft(tiny_dir, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(8)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "sft_adapter"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_dir),
                "--data",
                str(data),
                "--method",
                "sft",
                "--out",
                str(out),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    assert (out / "adapter_model.safetensors").is_file()


def test_bad_rows_are_reported_with_line_numbers(tmp_path, tiny_dir, capsys):
    good = json.dumps(preference_rows(1)[0])
    lines = [
        good,
        "{not json",
        json.dumps({"prompt": "x", "chosen": "y"}),
        json.dumps({"prompt": "x", "chosen": " ", "rejected": "z"}),
        "",
        good,
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl(path, "dpo")
    msg = str(err.value)
    assert "3 bad row(s)" in msg and "line 2: not JSON" in msg and "line 3: missing" in msg and "line 4:" in msg
    out = tmp_path / "never"
    assert main(["train", "--model", str(tiny_dir), "--data", str(path), "--out", str(out), "--quiet"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert not out.exists()  # nothing trains on a half-read file


def test_resume_is_deterministic(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    common = [
        "train",
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--seed",
        "3",
        "--quiet",
        "--max-steps",
        "4",
    ]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()  # same seed, same adapter
    assert (tmp_path / "a" / "checkpoint-4").is_dir()
    # stopping after 2 steps and resuming to 4 gives the straight 4-step run, exactly
    two = common[:-1] + ["2"]
    assert main(two + ["--out", str(tmp_path / "r")]) == 0
    assert main(common + ["--out", str(tmp_path / "r"), "--resume", "last"]) == 0
    assert (tmp_path / "r" / "adapter_model.safetensors").read_bytes() == a


def test_cli_trains_a_low_rank_layer(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(8))
    out = tmp_path / "low"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--rank", "2",
                 "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--quiet"]) == 0
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(".factors." in k for k in saved)
    assert any(k.endswith(".B") and v.abs().sum() > 0 for k, v in saved.items())  # trained from B = 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    assert model.peft_config["default"].r == 2


def test_low_rank_on_the_zeroed_projections_only_and_training_memory(tiny_dir, tmp_path, capsys):
    """`--lowrank-modules` puts factors on the named modules only (the zeroed two: the smallest file), and the run
    reports its peak memory while training, apart from the model's loading."""
    from safetensors.torch import load_file


    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(8))
    out = tmp_path / "out_only"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--rank", "2",
                 "--lowrank-modules", "self_attn.o_proj,mlp.down_proj", "--max-steps", "2", "--batch-size", "4",
                 "--lr", "1e-2", "--quiet"]) == 0
    saved = load_file(out / "adapter_model.safetensors")
    modules = {k.split(".factors.")[1].rsplit(".", 1)[0] for k in saved}
    assert modules == {"self_attn__o_proj", "mlp__down_proj"}
    # exactly rank 2 on o_proj (32 -> 32) and down_proj (64 -> 32) of the tiny Llama
    assert sum(t.numel() for t in saved.values()) == 2 * (32 + 32) + 2 * (64 + 32)
    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out).peft_config[
        "default"].lowrank_modules == ["self_attn.o_proj", "mlp.down_proj"]
    result = train(str(tiny_dir), str(data), str(tmp_path / "full"), max_steps=1, batch_size=4, progress=False)
    if CAN_RESET_PEAK:
        assert 0 < result.train_start_rss_mb <= result.train_peak_rss_mb <= result.peak_rss_mb
        assert "peak memory while training" in result.summary()
    else:
        assert result.train_peak_rss_mb is None and "while training" not in result.summary()
    # a module list without a rank, or naming no module of the layer, is refused before anything is written
    with pytest.raises(ValueError, match="set r too"):
        train(str(tiny_dir), str(data), str(tmp_path / "no_rank"), lowrank_modules=["mlp.down_proj"])
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "bad"), "--rank",
                 "2", "--lowrank-modules", "mlp.nope,self_attn.o_proj,mlp.down_proj", "--max-steps", "1",
                 "--quiet"]) == 2
    assert "'mlp.nope'] are not linear modules" in capsys.readouterr().err
    assert not (tmp_path / "no_rank").exists() and not (tmp_path / "bad").exists()


CAN_RESET_PEAK = os.access("/proc/self/clear_refs", os.W_OK)


@pytest.mark.skipif(not CAN_RESET_PEAK, reason="the peak RSS can be reset on Linux only")
def test_training_peak_memory_excludes_what_came_before_but_the_lifetime_peak_keeps_it():
    import mmap

    from peft_clm.tools.train import _peak_rss_mb, _TrainingPeakMemory

    def touch(megabytes: int) -> mmap.mmap:  # fresh anonymous pages, made resident (malloc could reuse old ones)
        pages = mmap.mmap(-1, megabytes * 2**20)
        for offset in range(0, megabytes * 2**20, mmap.PAGESIZE):
            pages[offset] = 1
        return pages

    touch(256).close()  # a peak before training
    before = _peak_rss_mb()
    memory = _TrainingPeakMemory()
    memory.start()
    during = touch(64)  # 64 MB while "training"
    memory.stop()
    during.close()
    assert memory.peak_mb >= memory.start_mb + 60  # the allocation while training is seen
    assert memory.peak_mb < before - 150  # the earlier 256 MB peak is not
    assert _peak_rss_mb() >= before  # but the lifetime peak still holds it


def test_pairs_with_their_own_alpha_train_both_ends_of_one_knob(tiny_dir, tmp_path):
    """Rows with "alpha": -1 are scored with the policy at alpha -1: one adapter learns one preference at +1 and
    another at -1 (tools.alpha_pairs); the reference is alpha 0 for both, so the first loss is log 2."""

    rows = preference_rows(16)
    up = [{**r, "alpha": 1} for r in rows[:8]]  # concise over verbose at +1
    # at -1: a third answer over the concise one (as avoid over generic at the knob's negative end)
    down = [
        {"prompt": r["prompt"], "chosen": "no , ask a friend .", "rejected": r["chosen"], "alpha": -1}
        for r in rows[8:]
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", up + down)

    def train_on(name):
        return train(str(tiny_dir), str(data), str(tmp_path / name), max_steps=12, batch_size=4, lr=5e-3, beta=0.5,
                     seed=0, progress=False)

    result = train_on("knob")
    assert result.first_loss == pytest.approx(0.6931, abs=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "knob").eval()
    plain = [{k: v for k, v in r.items() if k != "alpha"} for r in up + down]
    at_plus, at_minus = (
        preference_metrics(model, tokenizer, plain[:8], beta=0.5),
        preference_metrics(model, tokenizer, plain[8:], beta=0.5, alpha=-1.0),
    )
    assert at_plus["dpo_loss"] < 0.6931 - 0.05 and at_plus["reward_accuracy"] > 0.5
    assert at_minus["dpo_loss"] < 0.6931 - 0.05 and at_minus["reward_accuracy"] > 0.5
    # rows that keep their alpha are each scored at their own end: the same figures in one call
    both = preference_metrics(model, tokenizer, up + down, beta=0.5)
    assert both["dpo_loss"] == pytest.approx((at_plus["dpo_loss"] + at_minus["dpo_loss"]) / 2, rel=1e-5)
    assert both["n"] == 16
    # the same rows without their alphas train the -1 pairs at +1, which then rank them the wrong way at -1
    write_jsonl(data, plain)
    train_on("one_end")
    one_end = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "one_end").eval()
    assert preference_metrics(one_end, tokenizer, plain[8:], beta=0.5, alpha=-1.0)["dpo_loss"] > 0.6931


def test_pair_alphas_are_checked_before_anything_is_written(tiny_dir, tmp_path):

    rows = preference_rows(4)
    out = tmp_path / "out"
    for bad, match in ((0, "is 0"), ("1", "finite number"), (float("inf"), "finite number")):
        data = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "alpha": bad}] + rows[1:])
        with pytest.raises(DataError, match=f"line 1: .*{match}"):
            train(str(tiny_dir), str(data), str(out), max_steps=1, progress=False)
    data = write_jsonl(tmp_path / "ok.jsonl", [{**rows[0], "alpha": -1}] + rows[1:])
    with pytest.raises(ValueError, match="adapter='lora' has no alpha"):
        train(str(tiny_dir), str(data), str(out), adapter="lora", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="weights mode does not take"):
        train(str(tiny_dir), str(data), str(out), interpolation="weights", max_steps=1, progress=False)
    assert not out.exists()


def test_mirrored_pairs_train_the_negative_end_on_the_swapped_pair():
    """Each pair at +1 and swapped at -1, in order; the input rows are not changed; rows with an alpha are
    refused."""
    from peft_clm.tools.alpha_pairs import mirrored_pairs

    rows = preference_rows(2)
    before = json.dumps(rows)
    out = mirrored_pairs(rows)
    assert json.dumps(rows) == before
    assert [r["alpha"] for r in out] == [1.0, -1.0, 1.0, -1.0]
    for row, plus, minus in zip(rows, out[::2], out[1::2]):
        assert (plus["chosen"], plus["rejected"]) == (row["chosen"], row["rejected"])
        assert (minus["chosen"], minus["rejected"]) == (row["rejected"], row["chosen"])
        assert plus["prompt"] == minus["prompt"] == row["prompt"]
    with pytest.raises(ValueError, match="row 1 already has an 'alpha'"):
        mirrored_pairs([rows[0], {**rows[1], "alpha": -1}])


def test_pair_alphas_on_a_soft_capped_model_train_in_hidden_mode_only(tmp_path):
    """Gemma-2 soft-caps its final logits, so logits mode would mix after TRL's fused head: refused before training,
    with nothing written; hidden mode trains."""

    save_tiny_model_dir(tmp_path / "gemma2", arch="gemma2")
    rows = preference_rows(8)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{**r, "alpha": -1 if i % 2 else 1} for i, r in enumerate(rows)])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="soft-caps its final logits.*'hidden' mode"):
        train(str(tmp_path / "gemma2"), str(data), str(out), max_steps=1, batch_size=4, progress=False)
    assert not out.exists()
    result = train(str(tmp_path / "gemma2"), str(data), str(out), interpolation="hidden", max_steps=2, batch_size=4,
                   progress=False, overwrite=True)
    assert result.steps == 2 and result.first_loss == pytest.approx(0.6931, abs=1e-3)


# ---- the distillation hold (tools.hold): a KL term towards the base on rows the knob must leave alone
def hold_rows(n=12):
    """Rows on six topics, each a word of the tiny tokenizer's vocabulary (other words are all one unknown token)."""
    topics = ["answer", "question", "sentence", "reply", "friend", "word"]
    # answers in the style the pairs reject, on other topics: what DPO on the pairs would move without a hold
    return [
        {
            "prompt": f"what about the {t} ?",
            "completion": f"well , so , perhaps the {t} is very very good and great and fine indeed , thank you .",
        }
        for t in topics * (n // len(topics))
    ]


def mean_hold_kl(model, tokenizer, rows):
    rows = hold_rows_from(rows)
    with torch.no_grad():
        return sum(
            hold_kl(model, *batch).item()
            for batch in completion_batches(
                tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], 64, 256, "cpu"
            )
        )


def test_hold_kl_is_zero_for_a_new_layer_and_is_the_kl_of_the_answer_tokens(tiny_dir):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), ClmConfig()).eval()
    rows = hold_rows(6)
    ids, mask, target = next(
        completion_batches(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], 6, 256, "cpu")
    )
    assert hold_kl(model, ids, mask, target).item() == pytest.approx(0.0, abs=1e-6)  # identity at initialisation
    with torch.no_grad():
        for p in model.base_model.clm_layer().parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    kl = hold_kl(model, ids, mask, target)
    assert kl.requires_grad and kl.item() > 1e-4
    # the same figure written out: F.kl_div over the positions that predict an answer token
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits
    policy = model(input_ids=ids, attention_mask=mask).logits
    keep = target[:, 1:]
    expected = F.kl_div(
        policy[:, :-1][keep].log_softmax(-1),
        base[:, :-1][keep].log_softmax(-1),
        log_target=True,
        reduction="batchmean",
    )
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
    # written out for row 0 at explicit positions: the distributions at prompt_len - 1 .. len - 2 predict the answer
    prompt_len = len(tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"])
    length = int(mask[0].sum())
    positions = list(range(prompt_len - 1, length - 1))
    b, q = base[0, positions].log_softmax(-1), policy[0, positions].log_softmax(-1)
    row0 = (b.exp() * (b - q)).sum(-1)
    first = int(keep[0].sum())
    assert torch.allclose(token_kl(model, ids, mask, target)[:first], row0, rtol=1e-4, atol=1e-7)
    # the prompt's own tokens are not held: changing them changes nothing but the context
    assert keep.sum() == sum(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)


def test_training_with_a_hold_keeps_the_held_rows_at_the_base_and_still_learns_the_pairs(tiny_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    held = hold_rows(12)
    hold = write_jsonl(tmp_path / "hold.jsonl", held)
    common = {"max_steps": 12, "batch_size": 4, "lr": 5e-3, "beta": 0.5, "seed": 0, "progress": False}
    free = train(str(tiny_dir), str(pairs), str(tmp_path / "free"), **common)
    result = train(str(tiny_dir), str(pairs), str(tmp_path / "held"), hold=str(hold), hold_weight=100.0, **common)
    logged = [h["hold/kl"] for h in result.log_history if "hold/kl" in h]
    assert len(logged) == 12 and logged[0] == pytest.approx(0.0, abs=1e-6)  # the first step is at the identity
    assert "hold/kl" not in json.dumps(free.log_history)

    def load(name):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / name).eval()

    kl_free, kl_held = mean_hold_kl(load("free"), tokenizer, held), mean_hold_kl(load("held"), tokenizer, held)
    # 0.0115 and 0.0006 when written; the tiny model's KLs are small, hence the large weight
    assert kl_free > 0.005 and kl_held < 0.1 * kl_free  # the held rows stay where the base puts them
    metrics = preference_metrics(load("held"), tokenizer, preference_rows(16), beta=0.5)
    assert metrics["dpo_loss"] < 0.6931 - 0.05 and metrics["reward_accuracy"] > 0.5  # the pairs are still learnt


def test_hold_on_a_knob_trained_at_its_own_alphas(tiny_dir, tmp_path):
    """The hold composes with pairs that carry their own alpha (tools.alpha_pairs)."""
    rows = [{**r, "alpha": -1 if i % 2 else 1} for i, r in enumerate(preference_rows(8))]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    hold = write_jsonl(tmp_path / "hold.jsonl", hold_rows(6))
    result = train(
        str(tiny_dir),
        str(pairs),
        str(tmp_path / "out"),
        hold=str(hold),
        max_steps=2,
        batch_size=4,
        lr=5e-3,
        seed=0,
        progress=False,
    )
    assert result.steps == 2 and sum("hold/kl" in h for h in result.log_history) == 2


def test_bad_holds_are_refused_before_anything_is_written(tiny_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(4))
    hold = write_jsonl(tmp_path / "hold.jsonl", hold_rows(6))
    out = tmp_path / "out"
    for kwargs, match in (
        ({"method": "sft"}, "needs method 'dpo'.*got method='sft'"),
        ({"adapter": "full"}, "adapter 'clm' or 'lora'"),
        ({"hold_weight": 0.0}, "hold_weight=0.0 .*finite number > 0"),
        ({"hold_weight": float("nan")}, "hold_weight=nan"),
    ):
        with pytest.raises(ValueError, match=match):
            train(str(tiny_dir), str(pairs), str(out), hold=str(hold), max_steps=1, progress=False, **kwargs)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q"}])
    with pytest.raises(ValueError, match="line 1: missing field"):
        train(str(tiny_dir), str(pairs), str(out), hold=str(bad), max_steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="--hold .*missing.jsonl: no such file"):
        train(str(tiny_dir), str(pairs), str(out), hold=str(tmp_path / "missing.jsonl"), max_steps=1, progress=False)
    few = write_jsonl(tmp_path / "few.jsonl", hold_rows(6)[:3])
    with pytest.raises(ValueError, match=r"--hold .*few.jsonl: 3 hold rows are fewer than one batch of them \(4 per"):
        train(str(tiny_dir), str(pairs), str(out), hold=str(few), batch_size=4, max_steps=1, progress=False)
    turned = [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}] * 4
    with pytest.raises(ValueError, match="--hold .*: hold row 1: a 'messages' row must end with the assistant"):
        train(str(tiny_dir), str(pairs), str(out), hold=str(write_jsonl(tmp_path / "turned.jsonl", turned)),
              max_steps=1, progress=False)
    with pytest.raises(ValueError, match="hold_weight=5.0 weighs a hold file, and none was given"):
        train(str(tiny_dir), str(pairs), str(out), hold_weight=5.0, max_steps=1, progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="must end with the assistant's answer"):
        hold_rows_from([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}])
    assert hold_rows_from(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    ) == [{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}]



def test_resume_with_a_hold_holds_the_batches_of_the_uninterrupted_run(tiny_dir, tmp_path):
    """The hold batch of each step follows from the step, so stopping after 2 steps and resuming to 4 (across a pass
    over the 12 hold rows, 3 batches a pass) gives the straight run's adapter, exactly."""
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    hold = write_jsonl(tmp_path / "hold.jsonl", hold_rows(12))
    common = {"batch_size": 4, "lr": 5e-3, "seed": 3, "progress": False, "hold": str(hold), "hold_weight": 5.0}
    train(str(tiny_dir), str(data), str(tmp_path / "a"), max_steps=4, **common)
    train(str(tiny_dir), str(data), str(tmp_path / "r"), max_steps=2, **common)
    train(str(tiny_dir), str(data), str(tmp_path / "r"), max_steps=4, resume="last", **common)
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "r" / "adapter_model.safetensors").read_bytes() == a
