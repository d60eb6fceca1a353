"""The distillation hold (tools.hold): a KL term towards the base on rows the knob must leave alone."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tiny_models import preference_rows, save_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_clm import ClmConfig
from peft_clm.tools.hold import hold_kl, hold_rows_from
from peft_clm.tools.preference import _batches, preference_metrics
from peft_clm.tools.train import train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_hold")
    save_tiny_model_dir(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hold_rows(n=12):
    topics = ["bread", "train", "rain", "stone", "lamp", "road"]
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
            for batch in _batches(
                tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], 64, 256, "cpu"
            )
        )


def test_hold_kl_is_zero_for_a_new_layer_and_is_the_kl_of_the_answer_tokens(tiny_dir):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), ClmConfig()).eval()
    rows = hold_rows(6)
    ids, mask, target = next(
        _batches(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], 6, 256, "cpu")
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
    # 0.0116 and 0.0004 when written; the tiny model's KLs are small, hence the large weight
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
        ({"method": "sft"}, "needs method 'dpo'"),
        ({"adapter": "full"}, "adapter 'clm' or 'lora'"),
        ({"hold_weight": 0.0}, "hold_weight=0.0 .*finite number > 0"),
        ({"hold_weight": float("nan")}, "hold_weight=nan"),
    ):
        with pytest.raises(ValueError, match=match):
            train(str(tiny_dir), str(pairs), str(out), hold=str(hold), max_steps=1, progress=False, **kwargs)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q"}])
    with pytest.raises(ValueError, match="line 1: missing field"):
        train(str(tiny_dir), str(pairs), str(out), hold=str(bad), max_steps=1, progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="must end with the assistant's answer"):
        hold_rows_from([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}])
    assert hold_rows_from(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    ) == [{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}]
