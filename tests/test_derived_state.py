"""State derived from the registered adapters (low-rank runners, weights mode's mixed layers, the KV-cache guard)
follows what it is derived from: train/eval mode, deleting and re-adding an adapter, where the layer sits, and
caches that were filled elsewhere."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import MODES, inputs, logits, perturb, tiny_model

from peft_clm import ClmConfig


def test_a_low_rank_runner_follows_train_then_eval():
    ids, mask = inputs()
    base = tiny_model("llama")
    base.config.attention_dropout = 0.5  # train mode then differs from eval mode in every call
    for module in base.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model = get_peft_model(base, ClmConfig(r=4, interpolation="hidden"))
    perturb(model, scale=0.2)
    model.eval()
    ref = logits(model, ids, mask)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(logits(model, ids, mask), ref)  # dropout ran: the runner was built in train mode
    model.eval()
    assert torch.equal(logits(model, ids, mask), ref)  # and a new one in eval mode, not the train-mode one


@pytest.mark.parametrize("rank", [None, 4])
def test_a_deleted_then_re_added_adapter_starts_fresh(rank):
    ids, mask = inputs()
    ref = logits(tiny_model("llama"), ids, mask)
    model = get_peft_model(tiny_model("llama"), ClmConfig(r=rank, interpolation="weights"))
    model.add_adapter("b", ClmConfig(r=rank, interpolation="weights"))
    perturb(model, adapter="b", scale=0.3)
    model.set_adapter("b")
    trained = logits(model, ids, mask)
    assert not torch.equal(trained, ref)
    model.set_adapter("default")
    model.delete_adapter("b")
    model.add_adapter("b", ClmConfig(r=rank, interpolation="weights"))
    model.set_adapter("b")
    assert torch.equal(logits(model, ids, mask), ref)  # the identity again, not the deleted adapter's cached layer


def test_low_cpu_mem_usage_loads_the_same_low_rank_adapter(tmp_path):
    ids, mask = inputs()
    model = get_peft_model(tiny_model("qwen2"), ClmConfig(r=4, train_norms=True))
    perturb(model, scale=0.2)
    ref = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert torch.equal(logits(loaded, ids, mask), ref), low_cpu_mem_usage


@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_with_the_layer_inserted_before_layer_one(mode):
    ids, mask = inputs(batch=3, length=6, left_pad=2)
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation=mode, alpha=0.7, layer_index=1))
    perturb(model, scale=0.2)
    kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False}
    cached = model.generate(input_ids=ids, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(input_ids=ids, use_cache=False, **kw))
    assert not torch.equal(cached, tiny_model("llama").generate(input_ids=ids, **kw))


def test_a_cache_filled_without_the_layer_is_refused():
    ids, mask = inputs(batch=1, length=5)
    model = get_peft_model(tiny_model("llama"), ClmConfig(alpha=0.5))
    perturb(model)
    with torch.no_grad():
        filled = tiny_model("llama")(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="computed without the CLM layer"):
            model(input_ids=ids[:, -1:], past_key_values=filled, use_cache=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_logits_mode_keeps_only_the_asked_positions(arch):
    ids, mask = inputs()
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation="logits", alpha=0.6))
    perturb(model, scale=0.2)
    full = logits(model, ids, mask)
    last = logits(model, ids, mask, logits_to_keep=1)
    assert last.shape[1] == 1
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)
