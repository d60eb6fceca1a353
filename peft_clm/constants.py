"""What peft-clm knows about architectures, batches and limits, in one place."""

from __future__ import annotations

from .kernels.dispatch import MAX_TERMS


# Inside one decoder layer: the attention output projection and the MLP down projection. Zeroed in the copy, they
# make it exactly the identity through the residual stream (`ClmConfig.zero_modules` overrides this per model).
ZERO_MODULES: dict[str, tuple[str, ...]] = {
    **{
        model_type: ("self_attn.o_proj", "mlp.down_proj")
        for model_type in (
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
            "granite", "smollm3", "stablelm", "helium", "glm", "cohere",
        )
    },
    "starcoder2": ("self_attn.o_proj", "mlp.c_proj"),
    "phi": ("self_attn.dense", "mlp.fc2"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}



def is_in_modules(name: str, modules: tuple[str, ...] | list[str]) -> bool:
    """Whether a module or parameter name lies inside (or is) one of `modules`, e.g. the zeroed projections."""
    return any(name == m or name.startswith(m + ".") for m in modules)


# Layers with a recurrent state (state-space and linear-attention models): the copied layer would need a state slot
# of its own, which their caches do not offer. Refused at injection.
RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "rwkv", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "recurrent_gemma",
    "lfm2", "granitemoehybrid", "qwen3_next", "nemotron_h", "minimax",
})
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})

# Keyword arguments of the decoder stack with one row per sequence: logits mode repeats them once per path.
MODEL_ROW_KWARGS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")

# Keyword arguments of one decoder layer with rows per sequence, which logits mode splits into blocks per path.
# Bloom's `alibi` holds batch x heads rows, so blocks are taken in multiples of the batch.
LAYER_ROW_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "encoder_attention_mask", "alibi")

# At most this many adapters with a non-zero alpha at once: logits mode runs one path per adapter plus the base
# (k + 1 times the batch), and the Triton mixing kernels take up to this many terms (their limit, defined there).
MAX_MIXED_ADAPTERS = MAX_TERMS

# |alpha| above this is refused. Past it the logits of the mix leave every range the model was trained in (alpha
# 1e30 gives NaN or all-zero logits); no experiment here goes beyond |alpha| = 3.
MAX_ABS_ALPHA = 1000.0
