"""The `peft-clm` command as a user runs it: bad input is one clear error, before any model loads when it can be, and
nothing a user has is overwritten or left half-written. One case of each family runs the installed command in a
subprocess; the variants call the same `main()` in this process (same code path, seconds instead of minutes)."""

import contextlib
import io
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import perturb, preference_rows, save_tiny_model_dir
from transformers import AutoModelForCausalLM

from peft_clm import ClmConfig
from peft_clm.tools.cli import main


def run(*args, cwd, fresh=False):
    """(exit code, stdout, stderr) of `peft-clm ARGS`: in a subprocess with `fresh`, else through `main()` here."""
    args = [str(a) for a in args]
    if fresh:
        proc = subprocess.run([sys.executable, "-m", "peft_clm", *args], capture_output=True, text=True, cwd=cwd,
                              timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        return proc.returncode, proc.stdout, proc.stderr
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model_dir(root / "model")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"), ClmConfig())
    perturb(model, scale=0.3)
    model.save_pretrained(root / "adapter")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(root / "lora")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(8)))
    return root


def _train(tiny, out, *extra, fresh=False):
    return run("train", "--model", tiny / "model", "--data", tiny / "pairs.jsonl", "--out", out, "--max-steps", "2",
               "--batch-size", "4", "--quiet", *extra, cwd=tiny, fresh=fresh)


def test_train_never_overwrites_an_adapter_or_the_model(tiny, tmp_path):
    out = tmp_path / "adapter"
    code, _, err = _train(tiny, out)
    assert code == 0, err
    saved = (out / "adapter_model.safetensors").read_bytes()
    code, _, err = _train(tiny, out, fresh=True)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert (out / "adapter_model.safetensors").read_bytes() == saved
    before = sorted(p.name for p in (tiny / "model").iterdir())
    code, _, err = _train(tiny, tiny / "model", "--overwrite")
    assert code == 2 and "model's own directory" in err
    assert sorted(p.name for p in (tiny / "model").iterdir()) == before
    code, _, err = _train(tiny, out, "--overwrite", "--seed", "1", "--lr", "1e-2")
    assert code == 0, err
    assert (out / "adapter_model.safetensors").read_bytes() != saved


def test_train_refuses_non_finite_settings_and_saves_nothing_when_it_diverges(tiny, tmp_path):
    for flag, value in (("--lr", "inf"), ("--sft-weight", "nan"), ("--beta", "-1"), ("--batch-size", "0")):
        code, _, err = _train(tiny, tmp_path / f"bad{flag}", flag, value)
        assert code == 2 and flag.lstrip("-").replace("-", "_") in err, err
        assert not (tmp_path / f"bad{flag}").exists()
    code, _, err = _train(tiny, tmp_path / "diverged", "--lr", "1e38", fresh=True)
    assert code == 1 and "diverged" in err and "nothing was saved" in err, err
    assert not (tmp_path / "diverged").exists()


def test_vectors_extract_never_overwrites_a_file(tiny, tmp_path):
    target = tiny / "model" / "model.safetensors"
    before = target.read_bytes()
    code, _, err = run("vectors", "extract", "--base", tiny / "model", "--aligned", tiny / "model", "--out", target,
                       cwd=tmp_path, fresh=True)
    assert code == 2 and "already exists" in err
    assert target.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"\x93\x12" * 50, os.urandom(64)])
def test_vectors_commands_on_a_file_that_is_not_safetensors(tmp_path, content):
    path = tmp_path / "v.safetensors"
    path.write_bytes(content)
    code, _, err = run("vectors", "inspect", path, cwd=tmp_path)
    assert code == 2 and "not a safetensors file" in err, err


def test_vectors_refuse_another_architecture_and_apply_readable_directories(tmp_path):
    from tiny_models import tiny_model

    llama, qwen = tiny_model("llama"), tiny_model("qwen2")
    for name, model in (("base", llama), ("qwen", qwen)):
        model.save_pretrained(tmp_path / name)
    with torch.no_grad():
        llama.model.layers[0].mlp.down_proj.weight.add_(0.1)
    llama.save_pretrained(tmp_path / "aligned")
    assert run("vectors", "extract", "--base", tmp_path / "base", "--aligned", tmp_path / "aligned", "--out",
               tmp_path / "v.safetensors", cwd=tmp_path)[0] == 0
    code, _, err = run("vectors", "apply", "--base", tmp_path / "qwen", "--vector", f"{tmp_path / 'v.safetensors'}:1",
                       "--out", tmp_path / "mixed", cwd=tmp_path)
    assert code == 2 and "'llama'" in err and "'qwen2'" in err
    old = os.umask(0o022)
    try:
        code, _, err = run("vectors", "apply", "--base", tmp_path / "base", "--vector",
                           f"{tmp_path / 'v.safetensors'}:0.5", "--out", tmp_path / "mixed", cwd=tmp_path)
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "mixed").stat().st_mode) == 0o755


def _sweep(tiny, out, *extra, prompts=None, fresh=False):
    return run("sweep", "--model", tiny / "model", "--adapter", tiny / "adapter", "--prompts",
               prompts or tiny / "pairs.jsonl", "--out", out, "--max-new-tokens", "3", *extra, cwd=tiny, fresh=fresh)


@pytest.mark.parametrize("alphas, message", [("", "comma-separated"), (",", "comma-separated"),
                                             ("0,nan", "finite"), ("0,1e30", "1000"), ("0,x", "not a number"),
                                             ("0,1,1", "twice")])
def test_bad_alphas_are_refused_before_the_model_loads(tiny, tmp_path, alphas, message):
    code, _, err = _sweep(tiny, tmp_path / "out", "--alphas", alphas)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_sweep_outputs_are_all_or_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    code, _, err = _sweep(tiny, out, "--alphas", "0,1", fresh=True)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"sweep.json", "sweep.csv", "sweep.png"}
    (tmp_path / "ref.json").write_text('{"words_mean": "many"}')
    code, _, err = _sweep(tiny, out, "--alphas", "0,0.5", "--reference", tmp_path / "ref.json")
    assert code == 2 and "--reference" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "file").write_text("x")
    code, _, err = _sweep(tiny, tmp_path / "file", "--alphas", "0,1")
    assert code == 2 and "existing file" in err


@pytest.mark.parametrize("content, message", [
    (b"5\n", "line 1: expected a JSON object"),
    (b'{"prompt": ""}\n', "line 1: field 'prompt' is an empty string"),
    (b'{"prompt": [{"role": "user"}]}\n', "line 1: field 'prompt' must be a string or a list"),
    (b'{"prompt": null}\n', "line 1: field 'prompt' must be a string or a list of messages, got NoneType"),
    (b'{"prompt": 3}\n', "got int"),
    ('{"prompt": "hi"}\n'.encode("utf-16"), "not a UTF-8 text file"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a UTF-8 text file"),
])
def test_prompt_files_get_file_and_line_in_their_errors(tiny, tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    code, _, err = _sweep(tiny, tmp_path / "out", "--alphas", "0,1", prompts=path)
    assert code == 2 and message in err and str(path) in err, err


def test_a_utf8_bom_and_over_long_prompts(tiny, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "tell me about the sea ?"}\n')
    assert _sweep(tiny, tmp_path / "ok", "--alphas", "0,1", prompts=path)[0] == 0
    path.write_text(json.dumps({"prompt": "sea " * 5000}) + "\n")
    code, _, err = _sweep(tiny, tmp_path / "long", "--alphas", "0,1", prompts=path)
    assert code == 2 and "exceeds the model's context" in err and "refused, not truncated" in err, err


@pytest.mark.parametrize("config, message", [
    (None, "no adapter_config.json"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"interpolation": "logits"}', "without a peft_type"),
    ('{"peft_type": "clm"}', "'CLM' exactly"),
])
def test_broken_adapter_configs_are_named(tiny, tmp_path, config, message):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((tiny / "adapter" / "adapter_model.safetensors").read_bytes())
    if config is not None:
        (d / "adapter_config.json").write_text(config)
    code, _, err = run("generate", "--model", tiny / "model", "--adapter", d, "hello", cwd=tmp_path)
    assert code == 2 and message in err, err


def test_a_lora_adapter_given_as_a_knob(tiny, tmp_path):
    code, _, err = run("generate", "--model", tiny / "model", "--adapter", tiny / "lora", "hello", cwd=tmp_path,
                       fresh=True)
    assert code == 2 and "a LORA adapter" in err and "CLM adapter" in err, err


def test_a_changed_layer_index_is_named_as_such(tiny, tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    config = json.loads((tiny / "adapter" / "adapter_config.json").read_text())
    config["layer_index"] = 1
    (d / "adapter_config.json").write_text(json.dumps(config))
    (d / "adapter_model.safetensors").write_bytes((tiny / "adapter" / "adapter_model.safetensors").read_bytes())
    code, _, err = run("generate", "--model", tiny / "model", "--adapter", d, "hello", cwd=tmp_path)
    assert code == 2 and "layer_index=1" in err and "decoder layer 0" in err, err
