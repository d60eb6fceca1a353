"""Test helpers: tiny random models of several architectures (the unit-test workhorses, no download), a tiny
tokenizer, synthetic preference pairs, and a stand-in for training."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoConfig, AutoModelForCausalLM


COMMON = {
    "vocab_size": 97,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}

TINY_CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **COMMON),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None, **COMMON),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **COMMON),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=8, **COMMON),
    "gemma2": dict(
        model_type="gemma2",
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=20.0,
        query_pre_attn_scalar=8,
        **COMMON,
    ),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, pad_token_id=0, **COMMON),
    "gpt_neox": dict(model_type="gpt_neox", rotary_pct=0.5, **COMMON),
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 97,
        "n_embd": 32,
        "n_layer": 3,
        "n_head": 4,
        "n_inner": 64,
        "n_positions": 128,
    },
}
ARCHS = list(TINY_CONFIGS)
MODES = ["hidden", "weights", "logits"]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def perturb(peft_model, seed: int = 0, scale: float = 0.05, adapter: str = "default") -> None:
    """Stand-in for training: move every parameter of one adapter's layer."""
    g = torch.Generator().manual_seed(seed)
    layer = peft_model.base_model.clm_layer().clm_layers[adapter]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * scale)  # same draw on any device


def logits(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process (cwd: tests/) and assert that it succeeds."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=TESTS_DIR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    config.pad_token_id = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype)
    model.eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def inputs(batch: int = 2, length: int = 7, vocab: int = 97, seed: int = 1, left_pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[0, :left_pad] = 0
        mask[0, :left_pad] = 0
    return ids, mask


WORDS = (
    "the a an sea sky sun moon tree river cat dog bird answer question short long yes no please thank you very much "
    "indeed certainly perhaps maybe well so because and or but with without good bad fine great hello hi dear sir "
    "madam friend what why how when where who is are was were be do does did can could will would should tell me "
    "about one two three four five word words sentence sentences reply replies formal casual concise verbose"
).split()


def tiny_tokenizer():
    """A small word-level tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS + [".", ",", "?", "!", ":"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_model_dir(path, arch: str = "llama", seed: int = 0) -> None:
    """A tiny random model with a tokenizer, saved as a local HF directory (for CLI and training tests)."""
    tokenizer = tiny_tokenizer()
    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    kwargs["vocab_size"] = len(tokenizer)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def preference_rows(n: int = 24, seed: int = 0):
    """Synthetic preference pairs: concise (chosen) against verbose (rejected) replies."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(["sea", "sky", "sun", "moon", "tree", "river", "cat", "dog", "bird"])
        rows.append(
            {
                "prompt": f"tell me about the {topic} ?",
                "chosen": f"the {topic} is fine .",
                "rejected": f"well , so , perhaps the {topic} is very very good and great and fine indeed , "
                "thank you .",
            }
        )
    return rows
