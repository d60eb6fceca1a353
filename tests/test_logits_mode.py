"""Paper-exact logits mode: one batched pass for both paths, per-sequence alpha, generate() in full."""

import threading

import pytest
import torch
from peft import get_peft_model
from tiny_models import inputs, logits, perturb, tiny_model
from transformers.generation.streamers import BaseStreamer

from peft_clm import ClmConfig
from peft_clm.transformers_compat import find_decoder_layers


def clm_model(arch="llama", mode="logits", alpha=0.5, scale=0.2, seed=0):
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode, alpha=alpha))
    perturb(model, seed=seed, scale=scale)
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("mode", ["logits", "hidden"])
def test_per_sequence_alpha_equals_batch_of_one(arch, mode):
    alphas = [0.0, 0.5, 1.5, -0.5]
    ids, mask = inputs(batch=4, left_pad=2)
    model = clm_model(arch, mode)
    model.set_alpha(alphas)
    got = logits(model, ids, mask)
    for i, a in enumerate(alphas):
        model.set_alpha(a)
        torch.testing.assert_close(
            got[i : i + 1], logits(model, ids[i : i + 1], mask[i : i + 1]), atol=2e-5, rtol=1e-5
        )
    # the same per call, without touching the global alpha
    model.set_alpha(0.3)
    torch.testing.assert_close(logits(model, ids, mask, clm_alpha=torch.tensor(alphas)), got, atol=0, rtol=0)
    assert model.get_alpha() == {"default": 0.3}


def test_per_sequence_alpha_errors():
    ids, mask = inputs(batch=2)
    model = clm_model()
    model.set_alpha([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="3 values .* 2 rows"):
        logits(model, ids, mask)
    with pytest.raises(ValueError, match="weights"):
        model.set_interpolation("weights")
    model.set_alpha(0.5)
    model.set_interpolation("weights")
    with pytest.raises(ValueError, match="'hidden' or 'logits'"):
        model.set_alpha([0.1, 0.2])
    with pytest.raises(ValueError, match="'hidden' or 'logits'"):
        logits(model, ids, mask, clm_alpha=[0.1, 0.2])


def _rows_into_layer1(model, ids, mask):
    _, layers = find_decoder_layers(model.base_model.model)
    seen = []
    handle = layers[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    logits(model, ids, mask)
    handle.remove()
    return seen[0]


def test_only_the_needed_paths_run():
    ids, mask = inputs(batch=3)
    model = clm_model()
    for alpha, rows in ((0.0, 3), (1.0, 3), (0.5, 6), ([0.0, 1.0, 0.0], 6), ([1.0, 1.0, 1.0], 3)):
        model.set_alpha(alpha)
        assert _rows_into_layer1(model, ids, mask) == rows, alpha
    model.add_adapter("b", ClmConfig())
    model.base_model.set_adapter(["default", "b"])
    model.set_alpha({"default": 0.5, "b": 0.5})
    assert _rows_into_layer1(model, ids, mask) == 9  # k + 1 = 3 paths
    model.set_alpha({"default": 0.0, "b": 1.0})
    assert _rows_into_layer1(model, ids, mask) == 3


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_loss_with_labels_is_the_loss_of_the_mixed_logits(arch):
    ids, mask = inputs(batch=2)
    model = clm_model(arch, alpha=0.6)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    shift_logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    expected = torch.nn.functional.cross_entropy(shift_logits, ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.base_model.clm_layer().clm_layers["default"].parameters())


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_sampling_and_beam_search_cached_equal_uncached(arch):
    ids, mask = inputs(batch=2, length=5, left_pad=1)
    model = clm_model(arch, alpha=0.7)
    for kw in (
        {"do_sample": True, "top_k": 5},
        {"num_beams": 3, "do_sample": False},
        {"num_beams": 2, "num_return_sequences": 2},
    ):
        outs = []
        for use_cache in (True, False):
            torch.manual_seed(1)
            outs.append(
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, use_cache=use_cache, **kw)
            )
        assert torch.equal(outs[0], outs[1]), kw


@pytest.mark.parametrize("mode", ["logits", "hidden"])
def test_beam_search_with_per_sequence_alpha_equals_batch_of_one(mode):
    alphas = [0.2, 1.4]
    ids, mask = inputs(batch=2, length=5, left_pad=1)
    model = clm_model("qwen2", mode)
    kw = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "num_return_sequences": 2}
    got = model.generate(input_ids=ids, attention_mask=mask, clm_alpha=alphas, **kw)
    for i, a in enumerate(alphas):
        ref = model.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], clm_alpha=a, **kw)
        width = min(ref.shape[1], got.shape[1])
        assert torch.equal(got[2 * i : 2 * i + 2, :width], ref[:, :width])


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


def test_streaming_yields_the_generated_tokens():
    ids, mask = inputs(batch=1, length=5)
    model = clm_model(alpha=0.5)
    streamer = Collect()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([c.view(-1) for c in streamer.chunks[:-1]])
    assert torch.equal(streamed, out.view(-1))


def test_two_threads_never_see_each_others_alpha():
    ids, mask = inputs(batch=2, length=5)
    model = clm_model(alpha=0.5)
    settings = {"t0": [0.0, 1.5], "t1": [1.0, -0.5]}
    expected = {
        k: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, clm_alpha=v)
        for k, v in settings.items()
    }
    assert not torch.equal(expected["t0"], expected["t1"])
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def work(name):
        try:
            barrier.wait()
            for _ in range(3):
                out = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, clm_alpha=settings[name]
                )
                assert torch.equal(out, expected[name])
            results[name] = True
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in settings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {"t0": True, "t1": True}


def test_alpha_changed_mid_cache_is_a_clear_error():
    ids, mask = inputs(batch=1, length=5)
    model = clm_model(alpha=0.5)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    model.set_alpha(1.0)
    with pytest.raises(ValueError, match="alpha changed"):
        model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
def test_alpha_one_equals_the_merged_hidden_model(arch):
    ids, mask = inputs(batch=2, left_pad=1)
    model = clm_model(arch, alpha=1.0)
    got = logits(model, ids, mask)
    model.set_interpolation("hidden")
    merged = model.merge_and_unload()
    torch.testing.assert_close(got, logits(merged, ids, mask), atol=1e-5, rtol=1e-5)


def test_text_iterator_streamer_in_a_thread():
    from tiny_models import tiny_tokenizer
    from transformers import TextIteratorStreamer

    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_model("llama"), ClmConfig(alpha=0.5))
    model.base_model.model.resize_token_embeddings(len(tokenizer))
    perturb(model, scale=0.2)
    batch = tokenizer(["tell me about the sea ?"], return_tensors="pt")
    expected = model.generate(**batch, max_new_tokens=6, do_sample=False, clm_alpha=0.7)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(
        target=model.generate,
        kwargs=dict(**batch, max_new_tokens=6, do_sample=False, clm_alpha=0.7, streamer=streamer),
    )
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text.strip() == tokenizer.decode(expected[0, batch["input_ids"].shape[1] :]).strip()


@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_logits_mode_mixes_after_any_final_norm(arch):
    # Gemma's RMSNorm scales by (1 + w): the mix of the decoder's outputs is exact whatever the norm is.
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, intermediate_size=64, pad_token_id=0)

    def base():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()

    ids, mask = inputs(left_pad=1)
    base_logits = logits(base(), ids, mask)
    model = get_peft_model(base(), ClmConfig(alpha=1.0))
    perturb(model, scale=0.2)
    aligned = logits(model, ids, mask)
    model.set_alpha(0.3)
    torch.testing.assert_close(logits(model, ids, mask), 0.7 * base_logits + 0.3 * aligned, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "qwen2_sliding", "gemma3_text"])
def test_static_cache_with_per_attention_type_masks(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "gemma2":
        base_fn = lambda: tiny_model("gemma2")  # noqa: E731
    else:
        extra = ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
                 if arch == "qwen2_sliding" else {"model_type": "gemma3_text", "sliding_window": 4, "head_dim": 8,
                                                    "query_pre_attn_scalar": 8})
        model_type = extra.pop("model_type")
        config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      pad_token_id=0, **extra)

        def base_fn():
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()

    ids, mask = inputs(batch=2, length=5, left_pad=1)
    model = get_peft_model(base_fn(), ClmConfig(alpha=0.6))
    perturb(model, scale=0.2)
    kw = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False}
    static = model.generate(input_ids=ids, cache_implementation="static", **kw)
    assert torch.equal(static, model.generate(input_ids=ids, use_cache=False, **kw))


@pytest.mark.parametrize("arch", ["gemma2", "gpt2", "llama"])
@pytest.mark.parametrize("mode", ["logits", "hidden", "weights"])
def test_hidden_states_and_attentions_keep_the_base_models_count_and_shapes(arch, mode):
    ids, mask = inputs(batch=2, left_pad=1)
    with torch.no_grad():
        ref = tiny_model(arch)(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    model = clm_model(arch, mode)
    for alpha in (0.0, 0.5, 1.0):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True,
                        clm_alpha=alpha)
        assert [t.shape for t in out.hidden_states] == [t.shape for t in ref.hidden_states], alpha
        assert [t.shape for t in out.attentions] == [t.shape for t in ref.attentions], alpha
        if alpha == 0.0:  # the base model, exactly, entry by entry
            assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))
        decoder = model.base_model.model.get_decoder()
        with torch.no_grad(), model.base_model.alpha_context(alpha):
            alone = decoder(input_ids=ids, attention_mask=mask)
        assert alone.last_hidden_state.shape[0] == ids.shape[0]


def test_soft_capped_labels_with_return_dict_false():
    ids, mask = inputs(batch=2)
    model = clm_model("gemma2", alpha=0.6)
    full = model(input_ids=ids, attention_mask=mask, labels=ids)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, return_dict=False)
    assert isinstance(out, tuple)
    loss, mixed = out[0], out[1]
    assert mixed.shape[0] == ids.shape[0]
    torch.testing.assert_close(loss, full.loss)
    torch.testing.assert_close(mixed, full.logits)
