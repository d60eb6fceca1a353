"""The generate and sweep commands on a tiny random model: tables, JSON, CSV and a valid PNG."""

import csv
import json

import pytest
import torch
from peft import get_peft_model
from tiny_models import perturb, preference_rows, save_tiny_model_dir
from transformers import AutoModelForCausalLM

from peft_clm import ClmConfig
from peft_clm.tools.cli import main
from peft_clm.tools.sweep import spearman
from peft_clm.tools.text_metrics import casualness, word_count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    save_tiny_model_dir(root / "model")
    for name, seed in (("adapter", 0), ("adapter2", 1)):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"), ClmConfig(interpolation="logits"))
        perturb(model, seed=seed, scale=0.3)
        model.save_pretrained(root / name)
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(6)))
    return root


@pytest.mark.parametrize("mode", ["logits", "hidden", "weights"])
def test_sweep_writes_table_json_csv_and_png(tiny, tmp_path, capsys, mode):
    alphas = [-0.5, 0.0, 0.5, 1.0, 2.0]
    out = tmp_path / "sweep"
    (tmp_path / "full_dpo.json").write_text(
        json.dumps({"words_mean": 3.0, "reward_accuracy": 0.8, "label": "full DPO"})
    )
    code = main(
        [
            "sweep",
            "--model",
            str(tiny / "model"),
            "--adapter",
            str(tiny / "adapter"),
            "--alphas",
            ",".join(map(str, alphas)),
            "--prompts",
            str(tiny / "heldout.jsonl"),
            "--out",
            str(out),
            "--interpolation",
            mode,
            "--max-new-tokens",
            "6",
            "--metric",
            "words",
            "--reference",
            str(tmp_path / "full_dpo.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Spearman rho" in printed
    result = json.loads((out / "sweep.json").read_text())
    assert [r["alpha"] for r in result["rows"]] == alphas and result["interpolation"] == mode
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 for r in result["rows"])
    assert -1.0 <= result["spearman_rho_margin"] <= 1.0 and "reward margin" in printed
    zero = next(r for r in result["rows"] if r["alpha"] == 0.0)
    assert zero["dpo_loss"] == pytest.approx(0.6931, abs=1e-4)  # alpha 0 is the reference itself
    # fluency at every alpha, the usable range and per-prompt reliability, in the JSON, the CSV and the table
    for row in result["rows"]:
        assert 0.0 <= row["degenerate_rate"] <= 1.0 and 0.0 <= row["distinct2"] <= 1.0 and row["base_nll"] > 0
    assert result["usable"]["range"][0] <= 0.0 <= result["usable"]["range"][1]
    rel = result["reliability"]
    assert len(rel["per_prompt"]) == 6 and len(rel["values"]) == len(alphas)
    assert rel["wrong_way_fraction"] + rel["unmoved_fraction"] + rel["aligned_way_fraction"] == pytest.approx(1.0)
    assert rel["per_prompt"][0]["prompt"] == "tell me about the cat ?"
    assert [v[0] for v in rel["values"]] == [word_count(result["answers"][str(a)][0]) for a in alphas]
    assert "usable range" in printed and "move the wrong way" in printed and "per-prompt Spearman rho" in printed
    with (out / "sweep.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
        assert len(csv_rows) == len(alphas) and {"degenerate_rate", "distinct2", "base_nll"} <= set(csv_rows[0])
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    import matplotlib.image

    assert matplotlib.image.imread(out / "sweep.png").shape[0] > 100


def test_generate_prints_answers_side_by_side(tiny, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny / "model"),
                "--adapter",
                str(tiny / "adapter"),
                "--alpha",
                "0",
                "--alpha",
                "1.5",
                "--max-new-tokens",
                "4",
                "tell me about the sea ?",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[alpha=0]" in out and "[alpha=1.5]" in out


def test_two_adapters_generate(tiny, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny / "model"),
                "--adapter",
                str(tiny / "adapter"),
                "--adapter",
                str(tiny / "adapter2"),
                "--alpha",
                "0.5",
                "--max-new-tokens",
                "4",
                "hello",
            ]
        )
        == 0
    )
    assert "[alpha=0.5]" in capsys.readouterr().out


def test_metrics_and_spearman():
    assert word_count("One two, three.") == 3
    assert casualness("Hey, that's awesome!") > 0 > casualness("Therefore, the result is significant.")
    # 's is a contraction only after the words it contracts with; a possessive is not casual
    assert casualness("The Earth's crust") == 0.0 and casualness("The item's cost, that's all") == pytest.approx(20.0)
    assert casualness("It's there's let's") == pytest.approx(100.0) and casualness("I'd you're we've") == 100.0
    assert casualness("LET'S What's Who's") == pytest.approx(100.0) and casualness("Earth's 1990's") == 0.0
    assert casualness("The biscuit's crumbs") == 0.0  # "it" inside a word is no host
    assert spearman([0, 1, 2, 3], [1, 2, 3, 5]) == pytest.approx(1.0)
    assert spearman([0, 1, 2, 3], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0, 1, 2], [1, 1, 2]) == pytest.approx(0.8660, abs=1e-3)


def test_bad_sweep_input_is_one_clear_error(tiny, tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                "--model",
                str(tiny / "model"),
                "--adapter",
                str(tiny / "adapter"),
                "--alphas",
                "0,x",
                "--prompts",
                str(tiny / "heldout.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--alphas" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "--model",
                str(tiny / "nope"),
                "--adapter",
                str(tiny / "adapter"),
                "--prompts",
                str(tiny / "heldout.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_logits_mode_logprobs_from_two_passes_equal_one_pass_per_alpha(tiny):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from peft_clm.tools.preference import sequence_logprobs_at

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), tiny / "adapter").eval()
    rows = preference_rows(5)
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    alphas = [-0.5, 0.0, 0.3, 1.0, 2.0]
    fast = sequence_logprobs_at(model, tokenizer, prompts, completions, alphas, batch_size=2)
    model.set_interpolation("hidden")  # hidden mode runs one pass per alpha; at 0 and 1 it equals logits mode
    slow = sequence_logprobs_at(model, tokenizer, prompts, completions, [0.0, 1.0], batch_size=2)
    torch.testing.assert_close(fast[[1, 3]], slow, atol=1e-4, rtol=1e-5)
    model.set_interpolation("logits")
    for j, a in enumerate(alphas):
        one = sequence_logprobs_at(model, tokenizer, prompts, completions, [a], batch_size=2)[0]
        torch.testing.assert_close(fast[j], one, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["logits", "weights"])
def test_two_adapter_grid_writes_heat_map_and_table(tiny, tmp_path, capsys, mode):
    out = tmp_path / "grid"
    code = main(
        [
            "sweep",
            "--model",
            str(tiny / "model"),
            "--adapter",
            str(tiny / "adapter"),
            "--adapter",
            str(tiny / "adapter2"),
            "--alphas",
            "0,1,2",
            "--alphas",
            "-1,0,1",
            "--metric",
            "words",
            "--metric",
            "casualness",
            "--target",
            "words=3",
            "--prompts",
            str(tiny / "heldout.jsonl"),
            "--interpolation",
            mode,
            "--max-new-tokens",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Spearman rho(alpha_adapter" in printed and "<- best" in printed
    result = json.loads((out / "grid.json").read_text())
    assert result["knobs"] == {"adapter": [0.0, 1.0, 2.0], "adapter2": [-1.0, 0.0, 1.0]}
    assert len(result["rows"]) == 9 and result["pareto_front"] and 0 <= result["best"] < 9
    assert {"alpha_adapter", "alpha_adapter2", "words_mean", "casualness_mean"} == set(result["rows"][0])
    with (out / "grid.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 9
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_rows_match_single_adapter_generation(tiny, tmp_path):
    """A grid point (a, 0) gives exactly what the first adapter alone gives at a: the per-row alphas are right."""
    from peft import PeftModel

    from peft_clm.tools.generation import generate_answers
    from peft_clm.tools.sweep import grid_sweep

    prompts = [r["prompt"] for r in preference_rows(4)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "model"), tiny / "adapter", adapter_name="x"
    )
    model.load_adapter(tiny / "adapter2", adapter_name="y")
    model.base_model.set_adapter(["x", "y"])
    model.eval()
    result = grid_sweep(
        model,
        tok,
        {"x": [0.0, 1.5], "y": [0.0, 1.0]},
        {"x": "words", "y": "words"},
        prompts,
        tmp_path,
        max_new_tokens=6,
    )
    examples = result["examples"]
    model.base_model.set_adapter("x")
    alone = generate_answers(model, tok, prompts, [1.5], max_new_tokens=6)[0]
    assert examples[json.dumps({"x": 1.5, "y": 0.0})] == alone[:2]
    from peft_clm.tools.sweep import pareto_front

    assert pareto_front([{"a": 1, "b": 2}, {"a": 2, "b": 1}, {"a": 2, "b": 2}], ["a", "b"]) == [0, 1]


def test_bad_grid_input_is_one_clear_error(tiny, tmp_path, capsys):
    common = [
        "sweep",
        "--model",
        str(tiny / "model"),
        "--adapter",
        str(tiny / "adapter"),
        "--adapter",
        str(tiny / "adapter2"),
        "--prompts",
        str(tiny / "heldout.jsonl"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(common + ["--metric", "words"]) == 2
    assert "--metric once per adapter" in capsys.readouterr().err
    assert main(common + ["--metric", "words", "--metric", "casualness", "--target", "words"]) == 2
    assert "METRIC=VALUE" in capsys.readouterr().err
    assert main(common + ["--metric", "words", "--metric", "nope"]) == 2
    assert "'nope' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_vector_grid_applies_each_point_and_restores_the_model(tiny, tmp_path):
    """Full-checkpoint vectors as knobs: point (1, 0) answers as the first aligned checkpoint does, exactly."""
    from transformers import AutoTokenizer

    from peft_clm.tools.generation import generate_answers
    from peft_clm.tools.sweep import vector_grid_sweep
    from peft_clm.tools.vectors import extract

    for name, seed in (("a", 2), ("b", 3)):
        m = AutoModelForCausalLM.from_pretrained(tiny / "model")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        m.save_pretrained(tmp_path / name)
        extract(tiny / "model", tmp_path / name, tmp_path / f"{name}.safetensors")
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [r["prompt"] for r in preference_rows(3)]
    result = vector_grid_sweep(
        model,
        tok,
        {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"},
        {"a": [0.0, 1.0], "b": [0.0, 0.5]},
        {"a": "words", "b": "casualness"},
        prompts,
        tmp_path / "grid",
        targets={"words": 2.0},
        max_new_tokens=5,
    )
    assert len(result["rows"]) == 4 and result["interpolation"] == "vectors" and 0 <= result["best"] < 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    aligned = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert (
        result["examples"][json.dumps({"a": 1.0, "b": 0.0})]
        == generate_answers(aligned, tok, prompts, [None], max_new_tokens=5)[0][:2]
    )
    assert (tmp_path / "grid" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="one vector per knob"):
        vector_grid_sweep(
            model,
            tok,
            {"a": tmp_path / "a.safetensors"},
            {"a": [0.0], "b": [0.0]},
            {"a": "words", "b": "words"},
            prompts,
            tmp_path / "g2",
        )


def test_vectors_grid_cli(tiny, tmp_path, capsys):
    from peft_clm.tools.vectors import extract

    m = AutoModelForCausalLM.from_pretrained(tiny / "model")
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
    m.save_pretrained(tmp_path / "aligned")
    extract(tiny / "model", tmp_path / "aligned", tmp_path / "v.safetensors")
    common = [
        "vectors",
        "grid",
        "--base",
        str(tiny / "model"),
        "--vector",
        f"x={tmp_path / 'v.safetensors'}",
        "--vector",
        f"y={tmp_path / 'v.safetensors'}",
        "--metric",
        "words",
        "--metric",
        "casualness",
        "--prompts",
        str(tiny / "heldout.jsonl"),
        "--max-prompts",
        "2",
        "--max-new-tokens",
        "4",
    ]
    assert main(common + ["--scales", "-1,0,1", "--out", str(tmp_path / "g")]) == 0
    assert "Spearman rho(alpha_x" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "g" / "grid.json").read_text())["rows"]) == 9
    assert (
        main(common[:4] + ["--vector", "nonsense"] + common[6:] + ["--scales", "0,1", "--out", str(tmp_path / "h")])
        == 2
    )
    assert "NAME=PATH" in capsys.readouterr().err and not (tmp_path / "h").exists()


def test_vectors_grid_rejects_a_name_given_twice(tiny, tmp_path, capsys):
    assert (
        main(
            [
                "vectors",
                "grid",
                "--base",
                str(tiny / "model"),
                "--vector",
                "x=a.safetensors",
                "--vector",
                "x=b.safetensors",
                "--scales",
                "0,1",
                "--metric",
                "words",
                "--metric",
                "words",
                "--prompts",
                str(tiny / "heldout.jsonl"),
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "g").exists()
