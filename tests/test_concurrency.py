"""Concurrent and stateful use: threads sharing one model, KV caches shared across calls, weights changed in place."""

import threading

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file
from tiny_models import inputs, logits, perturb, tiny_model

from peft_clm import ClmConfig
from peft_clm.tools.vectors import apply_to_model, extract


def test_weights_mode_is_thread_safe_and_never_writes_the_trained_weights():
    ids, mask = inputs(batch=2, length=5)
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="weights"))
    perturb(model, scale=0.3)
    trained = {k: v.clone() for k, v in model.named_parameters() if ".clm_layers." in k}
    settings = {"a": 0.3, "b": 1.7, "c": None}
    kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False}
    expected = {k: model.generate(input_ids=ids, clm_alpha=a, **kw) for k, a in settings.items()}
    assert not torch.equal(expected["a"], expected["b"])
    errors, barrier = [], threading.Barrier(len(settings))

    def work(name):
        try:
            barrier.wait()
            for _ in range(12):
                assert torch.equal(model.generate(input_ids=ids, clm_alpha=settings[name], **kw), expected[name])
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in settings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, v in model.named_parameters():
        if k in trained:
            assert torch.equal(v, trained[k]), k


@pytest.mark.parametrize("mode", ["hidden", "weights"])
def test_alpha_changed_while_a_kv_cache_is_shared_is_a_clear_error(mode):
    ids, mask = inputs(batch=1, length=5)
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation=mode, alpha=0.5))
    perturb(model, scale=0.2)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    step = {"input_ids": ids[:, -1:], "past_key_values": out.past_key_values, "use_cache": True}
    model(**step)  # the same alpha: fine
    for changed in ({"clm_alpha": 0.0}, {"clm_alpha": 0.7}):
        with pytest.raises(ValueError, match="alpha changed"):
            model(**step, **changed)
    with model.disable_adapter(), pytest.raises(ValueError, match="alpha changed"):
        model(**step)


def test_weights_mode_sees_weights_changed_in_place_by_vectors(tmp_path):
    ids, mask = inputs()
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="weights", alpha=0.5))
    perturb(model)
    before = logits(model, ids, mask)
    # a vector that moves the wrapped layer 0 (w0 of the weights-mode mix), under the wrapped model's own names
    inner = model.base_model.model
    names = [n for n, _ in inner.named_parameters() if ".layers.0.base_layer." in n]
    state = {n: t.detach().clone().contiguous() for n, t in inner.state_dict().items() if n in names}
    for name, shift in (("base", 0.0), ("shifted", 0.05)):
        (tmp_path / name).mkdir()
        save_file({n: t + shift for n, t in state.items()}, tmp_path / name / "model.safetensors")
    extract(tmp_path / "base", tmp_path / "shifted", tmp_path / "v.safetensors")
    handle = apply_to_model(inner, [(tmp_path / "v.safetensors", 1.0)])
    changed = logits(model, ids, mask)
    assert not torch.allclose(changed, before, atol=1e-4)  # the mix follows the new w0
    handle.undo()
    assert torch.equal(logits(model, ids, mask), before)
