"""Level scoring (peft_clm.tools.levels) on tiny random models: the k + 1 pass logits-mode scores equal a naive
one-sequence-at-a-time loop at every grid point, the argmax and accuracies, the 27-combination search, bad input;
the level pairs (ordinal, target, anchor) and the anchors' zero-then-restoring DPO gradient."""

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import perturb, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from peft_clm import ClmConfig
from peft_clm.tools.levels import (
    LEVELS,
    additive_scores,
    anchor_pairs,
    combinations,
    dial_alphas,
    end_pairs,
    grid_points,
    held_pairs,
    knob_leakage,
    level_accuracy,
    level_scores,
    levels_from_scores,
    mean_level,
    ordinal_pairs,
    pick_alpha,
    search_combinations,
    target_pairs,
)
from peft_clm.tools.preference import _completion_logprob, completion_batches


ROWS = [
    {
        "prompt": "tell me about the sea ?",
        "avoid": "no , sorry .",
        "generic": "the sea is good .",
        "expert": "the sea is very very great , indeed , because of the moon and the sun .",
    },
    {
        "prompt": "why is the sky blue ?",
        "avoid": "ask a friend .",
        "generic": "the sky is blue .",
        "expert": "because the sun and the sky , one two three .",
    },
    {
        "prompt": "what about the cat ?",
        "avoid": "no .",
        "generic": "the cat is fine , thank you .",
        "expert": "the cat is a bird ? no , the cat is a cat .",
    },
]


def _plain_model(tokenizer, seed=0):
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    model = get_peft_model(_plain_model(tokenizer), ClmConfig(interpolation="logits"), adapter_name="x")
    model.add_adapter("y", ClmConfig(interpolation="logits"))
    model.add_adapter("z", ClmConfig(interpolation="logits"))
    for seed, name in enumerate("xyz"):
        perturb(model, seed=seed, scale=0.3, adapter=name)
    model.base_model.set_adapter(["x", "y", "z"])
    return model.eval(), tokenizer


@torch.no_grad()
def naive_scores(model, tokenizer, rows, point):
    """One sequence at a time, no padding: mean log p(answer token | everything before) at `point`."""
    out = []
    for row in rows:
        per_level = []
        for level in LEVELS:
            p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            a = tokenizer(row[level], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([p + a])
            kwargs = {} if point is None else {"clm_alpha": point}
            logp = torch.log_softmax(model(input_ids=ids, **kwargs).logits[0].float(), -1)
            per_level.append(sum(logp[len(p) + t - 1, tok].item() for t, tok in enumerate(a)) / len(a))
        out.append(per_level)
    return torch.tensor(out)


def test_logits_mode_three_knob_grid_equals_a_naive_loop_per_point(setup):
    model, tokenizer = setup
    points = grid_points({"x": [-1.5, 0.0, 1.0], "y": [0.0, 2.0], "z": [-0.5, 0.0]})
    fast = level_scores(model, tokenizer, ROWS, points, batch_size=4)  # batches cut across rows: padding is used
    assert fast.shape == (12, 3, 3)
    for j, point in enumerate(points):
        torch.testing.assert_close(fast[j], naive_scores(model, tokenizer, ROWS, point), atol=1e-4, rtol=1e-4)
    # the knob matters: different points give different scores
    assert not torch.allclose(fast[0], fast[2])


@pytest.mark.parametrize("mode", ["hidden", "weights"])
def test_other_modes_run_one_pass_per_point_and_agree_with_the_loop(setup, mode):
    model, tokenizer = setup
    model.set_interpolation(mode)
    try:
        points = [{"x": 0.5, "y": -1.0, "z": 0.3}, {"x": 0.0}]
        scores = level_scores(model, tokenizer, ROWS, points, batch_size=5)
        torch.testing.assert_close(scores[0], naive_scores(model, tokenizer, ROWS, points[0]), atol=1e-4, rtol=1e-4)
        # a partial dict means what it means in a forward call or generate: the other knobs keep their alpha (1)
        kept = {"x": 0.0, "y": 1.0, "z": 1.0}
        torch.testing.assert_close(scores[1], naive_scores(model, tokenizer, ROWS, kept), atol=1e-4, rtol=1e-4)
        zero = {"x": 0.0, "y": 0.0, "z": 0.0}
        assert not torch.allclose(scores[1], naive_scores(model, tokenizer, ROWS, zero), atol=1e-3)
    finally:
        model.set_interpolation("logits")


def test_a_plain_model_and_a_single_adapter_take_none_and_numbers():
    tokenizer = tiny_tokenizer()
    plain = _plain_model(tokenizer, seed=3)
    torch.testing.assert_close(
        level_scores(plain, tokenizer, ROWS, [None])[0],
        naive_scores(plain, tokenizer, ROWS, None),
        atol=1e-4,
        rtol=1e-4,
    )
    single = get_peft_model(_plain_model(tokenizer, seed=3), ClmConfig(interpolation="logits"))
    perturb(single, seed=2, scale=0.3)
    single.eval()
    scores = level_scores(single, tokenizer, ROWS, [0.0, -2.0, 1.0], batch_size=2)
    torch.testing.assert_close(scores[0], naive_scores(plain, tokenizer, ROWS, None), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores[1], naive_scores(single, tokenizer, ROWS, -2.0), atol=1e-4, rtol=1e-4)


def test_argmax_accuracy_and_mean_level():
    scores = torch.tensor([[[0.0, -1.0, -2.0], [-1.0, -3.0, -0.5], [-1.0, -0.2, -0.9]]])  # avoid, expert, generic
    assert levels_from_scores(scores).tolist() == [[0, 2, 1]]
    assert level_accuracy(scores, "avoid").tolist() == pytest.approx([1 / 3])
    assert level_accuracy(scores, 2).tolist() == pytest.approx([1 / 3])
    assert mean_level(scores).tolist() == pytest.approx([0.0])
    assert levels_from_scores(torch.zeros(1, 1, 3)).tolist() == [[0]]  # ties go to the lower level


def test_search_finds_the_point_that_reaches_each_combination():
    # two domains, two rows each; knob d moves only domain d: alpha -1 -> avoid, 0 -> generic, 1 -> expert
    points = grid_points({"a": [-1.0, 0.0, 1.0], "b": [-1.0, 0.0, 1.0]})
    row_domains = ["a", "a", "b", "b"]
    scores = torch.full((len(points), 4, 3), -5.0)
    for j, p in enumerate(points):
        for i, d in enumerate(row_domains):
            scores[j, i, int(p[d]) + 1] = -1.0
    combos = search_combinations(scores, row_domains, points, ["a", "b"])
    assert len(combos) == 9 == len(combinations(["a", "b"]))
    for c in combos:
        assert c["reached"] and c["min_accuracy"] == 1.0
        assert c["point"] == {d: float(LEVELS.index(lv) - 1) for d, lv in c["targets"].items()}
    # held-out reporting: choose on rows 0 and 2, report on rows 1 and 3; break row 3 at every point
    broken = scores.clone()
    broken[:, 3] = torch.tensor([-1.0, -5.0, -5.0])  # always avoid
    split = search_combinations(broken, row_domains, points, ["a", "b"], select=[True, False, True, False])
    assert [c["reached"] for c in split] == [c["targets"]["b"] == "avoid" for c in split]
    # three domains: 27 combinations, every one reached at its own point of a 27-point grid
    points3 = grid_points({d: [-1.0, 0.0, 1.0] for d in "abc"})
    doms3 = ["a", "b", "c"]
    scores3 = torch.full((27, 3, 3), -5.0)
    for j, p in enumerate(points3):
        for i, d in enumerate(doms3):
            scores3[j, i, int(p[d]) + 1] = -1.0
    combos3 = search_combinations(scores3, doms3, points3, doms3)
    assert len(combos3) == 27 and sum(c["reached"] for c in combos3) == 27
    assert len({json.dumps(c["point"], sort_keys=True) for c in combos3}) == 27
    # a control domain is reported, not searched
    with_control = search_combinations(scores, row_domains, points, ["a"], controls={"b": "generic"})
    assert len(with_control) == 3 and all(c["accuracy"]["b"] == 1.0 for c in with_control)
    # top_k: the chosen point first, then the next best by the same order; the accuracy it was chosen on
    ranked = search_combinations(broken, row_domains, points, ["a", "b"], select=[True, False, True, False], top_k=3)
    levels = broken.argmax(-1)
    for c, one in zip(ranked, split):
        assert len(c["candidates"]) == 3 and c["candidates"][0] == c["point"] == one["point"]
        assert c["selected_min_accuracy"] == 1.0  # rows 0 and 2 are never broken

        def order(j, targets=c["targets"]):  # worst, then mean accuracy on the choosing rows 0 and 2, then nearness
            acc = [float(levels[j, r] == LEVELS.index(targets[d])) for d, r in (("a", 0), ("b", 2))]
            return (min(acc), sum(acc) / 2, -sum(abs(v) for v in points[j].values()))

        expected = sorted(range(len(points)), key=order, reverse=True)
        assert [order(points.index(p)) for p in c["candidates"]] == [order(j) for j in expected[:3]]
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        search_combinations(scores, row_domains, points, ["a"], top_k=0)


def test_search_prefer_margin_breaks_accuracy_ties_by_the_worst_domains_margin():
    """prefer="margin": among points of equal worst and mean accuracy, the one whose worst domain's target level
    wins by most (mean over its rows of the target's score minus the best other level's); "base" keeps the nearest."""
    points = [{"a": 0.5}, {"a": 1.0}, {"a": 2.0}]
    row_domains = ["a", "a"]
    # every point puts both rows at expert; the margins over the best other level: 0.1, 0.8 (row means) and 0.5
    scores = torch.tensor([
        [[-3.0, -1.1, -1.0], [-3.0, -1.1, -1.0]],
        [[-3.0, -1.8, -1.0], [-3.0, -1.8, -1.0]],
        [[-3.0, -1.2, -1.0], [-3.0, -1.8, -1.0]],
    ])
    expert = lambda combos: next(c for c in combos if c["targets"]["a"] == "expert")  # noqa: E731
    assert expert(search_combinations(scores, row_domains, points, ["a"]))["point"] == {"a": 0.5}
    by_margin = expert(search_combinations(scores, row_domains, points, ["a"], prefer="margin", top_k=3))
    assert by_margin["point"] == {"a": 1.0} and by_margin["candidates"] == [{"a": 1.0}, {"a": 2.0}, {"a": 0.5}]
    # two levels tied for the top: neither wins, both margins 0 (and accuracy goes to the lower level, generic)
    tied = scores.clone()
    tied[0] = torch.tensor([-3.0, -1.0, -1.0])
    generic_tied = next(c for c in search_combinations(tied, row_domains, points, ["a"], prefer="margin", top_k=3)
                        if c["targets"]["a"] == "generic")
    assert generic_tied["point"] == {"a": 0.5} and generic_tied["selected_min_accuracy"] == 1.0
    # a target that loses has a negative margin: generic trails expert by 0.1 at point 0, by 0.8 at point 1
    generic = next(c for c in search_combinations(scores, row_domains, points, ["a"], prefer="margin", top_k=3)
                   if c["targets"]["a"] == "generic")
    assert generic["candidates"] == [{"a": 0.5}, {"a": 2.0}, {"a": 1.0}]
    # accuracy still comes first: a wider margin does not beat a higher accuracy
    worse = scores.clone()
    worse[1, 1] = torch.tensor([-3.0, -0.5, -1.0])  # point 1's second row now generic
    assert expert(search_combinations(worse, row_domains, points, ["a"], prefer="margin"))["point"] == {"a": 2.0}
    with pytest.raises(ValueError, match="prefer must be 'base'"):
        search_combinations(scores, row_domains, points, ["a"], prefer="nearest")


def test_refine_adds_candidates_only_where_the_choosing_rows_fall_short():
    """knob-search --refine: a combination whose best pooled point is short of 0.8 on the rows it is chosen on gets
    its next predicted points; one already at 0.8 gets none; each pool is judged on its own select."""
    script = _domains_script()
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    pools = {"all": [{"a": 0.0}], 0: [{"a": 0.0}], 1: [{"a": 0.0}]}
    candidates = {"all": [[{"a": 1.0}, {"a": 2.0}], [{"a": 0.0}, {"a": 3.0}]],
                  0: [[{"a": 1.0}, {"a": 4.0}], [{"a": 0.0}, {"a": 5.0}]],
                  1: [[{"a": 1.0}, {"a": 6.0}], [{"a": 0.0}, {"a": 7.0}]]}
    selects = {"all": None, 0: (True, False), 1: (False, True)}
    # combination j's accuracy on the rows each select chooses on: fold 0 and fold 1 disagree
    short = {None: [0.5, 0.9], (True, False): [0.9, 0.7], (False, True): [0.7, 0.9]}

    def search(pool, select):
        return [{"selected_min_accuracy": a} for a in short[select]]

    out = script.refine_pools(pools, candidates, selects, search, key)
    assert out["all"] == [{"a": 0.0}, {"a": 2.0}]
    assert out[0] == [{"a": 0.0}, {"a": 5.0}]  # fold 0 refines what its own half shows short
    assert out[1] == [{"a": 0.0}, {"a": 6.0}]


def _sweep(rows):
    """A 1-D sweep of a knob on domain "a" with "b" beside it: rows (alpha, a's expert share, b's mean level)."""
    return [
        {"alpha": a, "levels": {"a": {"avoid": 0.0, "expert": e, "mean_level": e}, "b": {"mean_level": lb}}}
        for a, e, lb in rows
    ]


def test_the_weakest_pick_is_the_smallest_alpha_that_reaches_the_level():
    sweep = [{"alpha": a, "levels": {"med": {"expert": e, "mean_level": e}, "law": {"expert": 0, "mean_level": l}}}
             for a, e, l in [(0, 0, 0), (1, 0.8, 0.5), (2, 1.0, 0.0), (3, 1.0, 0.9)]]
    assert pick_alpha(sweep, "med", "expert", 1, "weakest") == {"alpha": 1, "accuracy": 0.8}
    assert pick_alpha(sweep, "med", "expert", 1, "accuracy")["alpha"] == 2
    assert pick_alpha(sweep, "med", "expert", 1, "weakest", reached=0.9)["alpha"] == 2
    assert pick_alpha(sweep, "med", "expert", 1, "weakest", reached=1.1)["alpha"] == 2  # none reaches: accuracy


def test_knob_leakage_and_the_two_pick_rules():
    sweep = _sweep([(-1, 0.0, 0.0), (0, 0.0, 0.1), (1, 0.8, 0.3), (2, 1.0, 0.6), (3, 1.0, 0.6)])
    leak = knob_leakage(sweep, "a", 2)
    assert leak["own_change"] == pytest.approx(1.0) and leak["b"]["change"] == pytest.approx(0.5)
    assert leak["max"] == pytest.approx(0.5)
    assert knob_leakage(sweep, "a", 1)["max"] == pytest.approx(0.25)
    assert knob_leakage(sweep, "a", -1)["max"] is None  # no own change: leakage undefined, not 0 or inf
    # highest accuracy, ties to the smaller |alpha|; "specific" trades accuracy for the least leakage above 0.8
    assert pick_alpha(sweep, "a", "expert", 1) == {"alpha": 2, "accuracy": 1.0}
    assert pick_alpha(sweep, "a", "expert", 1, "specific") == {"alpha": 1, "accuracy": 0.8}
    assert pick_alpha(sweep, "a", "expert", 1, "specific", reached=0.9)["alpha"] == 2
    # nothing reaches the level: "specific" falls back to the most accurate alpha
    assert pick_alpha(sweep, "a", "avoid", -1, "specific") == {"alpha": -1, "accuracy": 0.0}


def test_knob_leakage_and_pick_alpha_refuse_bad_input():
    sweep = _sweep([(0, 0.0, 0.0), (1, 0.8, 0.3)])
    with pytest.raises(ValueError, match="needs alpha 0 and alpha 2"):
        knob_leakage(sweep, "a", 2)
    with pytest.raises(ValueError, match="needs alpha 0"):
        knob_leakage(sweep[1:], "a", 1)
    with pytest.raises(ValueError, match="rule must be 'accuracy', 'specific' or 'weakest'; got 'best'"):
        pick_alpha(sweep, "a", "expert", 1, "best")
    with pytest.raises(ValueError, match="no alpha on the side of sign -1"):
        pick_alpha(sweep, "a", "avoid", -1)


def test_additive_prediction_uses_each_knobs_own_sweep_and_refuses_a_missing_alpha():
    """Knob y is left at identity, so a two-knob point must score as knob x alone: the prediction from the 1-D
    sweeps is then exact, which checks that each alpha is looked up in its own knob's sweep."""
    tokenizer = tiny_tokenizer()
    model = get_peft_model(_plain_model(tokenizer, seed=3), ClmConfig(interpolation="hidden"), adapter_name="x")
    model.add_adapter("y", ClmConfig(interpolation="hidden"))
    perturb(model, seed=5, scale=0.3, adapter="x")
    model.base_model.set_adapter(["x", "y"])
    model.eval()
    alphas = [-1.0, 0.5, 2.0]
    one_d = [{"x": 0.0, "y": 0.0}] + [{"x": a, "y": 0.0} for a in alphas] + [{"x": 0.0, "y": a} for a in alphas]
    scores = level_scores(model, tokenizer, ROWS, one_d)
    base = scores[0]
    sweeps = {"x": dict(zip(alphas, scores[1:4])), "y": dict(zip(alphas, scores[4:7]))}
    grid = grid_points({"x": [-1.0, 0.0, 2.0], "y": [0.5, -1.0]})
    predicted = additive_scores(base, sweeps, grid)
    real = level_scores(model, tokenizer, ROWS, grid)
    torch.testing.assert_close(predicted, real, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(real[0], real[2])  # x moves the scores: the check is not vacuous
    # where both knobs move the scores, both effects are added (y's is zero above, so check the sum on its own)
    moved = {"x": {1.0: base + 1.0}, "y": {-1.0: base - 3.0}}
    torch.testing.assert_close(additive_scores(base, moved, [{"x": 1.0, "y": -1.0}])[0], base - 2.0)
    with pytest.raises(ValueError, match=r"knob 'x' has no 1-D score at alpha 1.5; it has \[-1.0, 0.5, 2.0\]"):
        additive_scores(base, sweeps, [{"x": 1.5}])
    with pytest.raises(ValueError, match=r"base must be \[questions, levels\]"):
        additive_scores(scores, sweeps, grid)


def test_a_signed_dial_drives_one_of_two_one_ended_knobs():
    knobs = {"m": ("m_avoid", "m_expert"), "l": ("l_avoid", "l_expert")}
    expected = {"m_avoid": 1.5, "m_expert": 0.0, "l_avoid": 0.0, "l_expert": 0.5}
    assert dial_alphas({"m": -1.5, "l": 0.5}, knobs) == expected
    assert dial_alphas({}, knobs) == dict.fromkeys(["m_avoid", "m_expert", "l_avoid", "l_expert"], 0.0)
    with pytest.raises(ValueError, match=r"names \['x'\], which have no dial; dials: \['l', 'm'\]"):
        dial_alphas({"x": 1.0}, knobs)
    # on a tiny model with both knobs of one dial: -a scores as the avoid knob alone at a, +a as the expert knob
    tokenizer = tiny_tokenizer()
    model = get_peft_model(_plain_model(tokenizer, seed=3), ClmConfig(), adapter_name="m_avoid")
    model.add_adapter("m_expert", ClmConfig())
    perturb(model, seed=5, scale=0.3, adapter="m_avoid")
    perturb(model, seed=6, scale=0.3, adapter="m_expert")
    model.base_model.set_adapter(["m_avoid", "m_expert"])
    model.eval()
    one = {"m": knobs["m"]}
    dialled = level_scores(model, tokenizer, ROWS, [dial_alphas({"m": a}, one) for a in (-1.5, 0.0, 2.0)])
    direct = level_scores(
        model, tokenizer, ROWS, [{"m_avoid": 1.5, "m_expert": 0.0}, {"m_avoid": 0.0, "m_expert": 0.0},
                                 {"m_avoid": 0.0, "m_expert": 2.0}]
    )
    torch.testing.assert_close(dialled, direct)
    assert not torch.allclose(dialled[0], dialled[1]) and not torch.allclose(dialled[0], dialled[2])


def _domains_script():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "domains_experiment.py"
    spec = importlib.util.spec_from_file_location("domains_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vector_knobs_read_as_dials_score_as_the_weights_they_stand_for(tmp_path):
    """The knob-search stage with --kind vectors: a signed dial over two full-checkpoint vectors scores as the base
    plus that vector at that scale, built by hand; the model is back to its base weights afterwards."""
    from peft_clm.tools.vectors import extract

    script = _domains_script()
    tokenizer = tiny_tokenizer()
    base = _plain_model(tokenizer, seed=3)
    base.save_pretrained(tmp_path / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    vectors = {}
    for seed, knob in enumerate(("m_avoid", "m_expert")):
        aligned = _plain_model(tokenizer, seed=3)
        torch.manual_seed(10 + seed)
        with torch.no_grad():
            for w in aligned.parameters():
                w.add_(0.2 * torch.randn_like(w))
        aligned.save_pretrained(tmp_path / knob)
        vectors[knob] = str(tmp_path / f"{knob}.safetensors")
        extract(tmp_path / "base", tmp_path / knob, vectors[knob])
    knobs = {"m": ("m_avoid", "m_expert")}
    got = script.score_points("vectors", base, tokenizer, ROWS, [{"m": -1.5}, {"m": 0.0}, {"m": 0.5}],
                              vectors, knobs=knobs)
    for i, (knob, scale) in enumerate((("m_avoid", 1.5), (None, 0.0), ("m_expert", 0.5))):
        by_hand = _plain_model(tokenizer, seed=3)
        if knob is not None:
            aligned = AutoModelForCausalLM.from_pretrained(tmp_path / knob).state_dict()
            by_hand.load_state_dict({k: v + scale * (aligned[k] - v) for k, v in base_state.items()})
        torch.testing.assert_close(got[i], naive_scores(by_hand, tokenizer, ROWS, None), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], got[1]) and not torch.allclose(got[2], got[1])
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_knob_search_scores_are_saved_and_read_back_only_for_the_same_knobs_and_questions(tmp_path):
    """knob-search keeps its exact scores in one safetensors file (--scores-from reads them instead of scoring
    again): a round trip gives the same tensors under the same keys; other knob weights or settings, other questions
    or a damaged file are refused by name."""
    import json as json_module
    from types import SimpleNamespace

    from safetensors.torch import save_file

    script = _domains_script()
    args = SimpleNamespace(design="per-level", runs=str(tmp_path / "runs"))
    names = script.knob_names(args)
    for i, name in enumerate(names):
        (tmp_path / "runs" / "clm" / name).mkdir(parents=True)
        (tmp_path / "runs" / "clm" / name / "adapter_model.safetensors").write_bytes(bytes([i]) * 10)
        (tmp_path / "runs" / "clm" / name / "adapter_config.json").write_text('{"r": 0}')
    knobs = script.knob_fingerprints(args, "clm")
    assert len(set(knobs.values())) == len(names)
    (tmp_path / "runs" / "clm" / "legal_expert" / "adapter_config.json").write_text('{"r": 16}')
    changed = script.knob_fingerprints(args, "clm")  # a knob's settings are part of what its scores belong to
    assert [k for k in names if changed[k] != knobs[k]] == ["legal_expert"]
    rows_sha = script.rows_fingerprint(ROWS)
    zero = {k: 0.0 for k in names}
    points = [zero, {**zero, "medical_expert": 1.5}, {**zero, "legal_avoid": -0.5, "financial_expert": 2.0}]
    exact = {script.key_of(p, names): torch.randn(len(ROWS), 3) for p in points}
    path = script.search_scores_path(tmp_path / "res", "clm")
    script.save_search_scores(path, exact, {"knobs": knobs, "rows": rows_sha, "row_domains": ["m"] * len(ROWS)})
    assert [f.name for f in (tmp_path / "res").iterdir()] == ["knob_search_scores.safetensors"]
    back = script.load_search_scores(path, knobs, rows_sha, len(ROWS), names)
    assert list(back) == list(exact) and all(torch.equal(back[k], exact[k]) for k in exact)
    # a retrained knob: only the points that leave it at 0 are read (a knob at 0 takes no part in a score)
    retrained = {**knobs, "legal_avoid": "0" * 64}
    partial = script.load_search_scores(path, retrained, rows_sha, len(ROWS), names)
    assert list(partial) == [script.key_of(p, names) for p in points[:2]]
    other_rows = script.rows_fingerprint([{**ROWS[0], "expert": ROWS[0]["expert"] + " more"}, *ROWS[1:]])
    with pytest.raises(SystemExit, match="scored on 3 other questions, not the 3 of"):
        script.load_search_scores(path, knobs, other_rows, len(ROWS), names)
    with pytest.raises(SystemExit, match="no saved scores at"):
        script.load_search_scores(tmp_path / "nowhere.safetensors", knobs, rows_sha, len(ROWS), names)
    labels = {"knobs": knobs, "rows": rows_sha, "points": points}  # one point more than scores
    save_file({"scores": torch.zeros(2, len(ROWS), 3)}, str(path), metadata={"labels": json_module.dumps(labels)})
    with pytest.raises(SystemExit, match=r"damaged \(3 points, scores \(2, 3, 3\)\)"):
        script.load_search_scores(path, knobs, rows_sha, len(ROWS), names)


def test_knob_search_stage_end_to_end_and_again_from_its_saved_scores(tmp_path, monkeypatch):
    """The knob-search stage on a tiny model with six perturbed CLM knobs: it writes 27 combinations and its exact
    scores; run again with --scores-from it scores nothing and finds the same points; --pool searches an earlier
    point in-sample and leaves every two-fold figure as it was; --prefer margin changes chosen points."""
    from types import SimpleNamespace

    script = _domains_script()
    tokenizer = tiny_tokenizer()
    names = script.knob_names(SimpleNamespace(design="per-level"))
    model = get_peft_model(_plain_model(tokenizer, seed=3), ClmConfig(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, ClmConfig())
    for i, name in enumerate(names):
        perturb(model, seed=30 + i, scale=0.3, adapter=name)
    model.save_pretrained(tmp_path / "runs" / "clm")  # runs/clm/<knob>/: PEFT's folder per named adapter
    model.base_model.set_adapter(names)
    model.eval()
    data = tmp_path / "data"
    data.mkdir()
    rows = [{**r, "domain": d} for d in script.DOMAINS for r in ROWS[:2]]  # two questions a domain: one per half
    (data / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = []
    real_score_points = script.score_points

    def counting_score_points(kind, m, tok, rws, points, vectors=None, **kw):
        scored.append(len(points))
        return real_score_points(kind, m, tok, rws, points, vectors, **kw)

    monkeypatch.setattr(script, "load", lambda kind, args: (model, tokenizer, None))
    monkeypatch.setattr(script, "score_points", counting_score_points)

    def run(results, output="knob_search.json", **over):
        args = SimpleNamespace(kind="clm", design="per-level", interpolation="logits", alphas="0,1,2",
                               runs=str(tmp_path / "runs"), data=str(data), results=str(tmp_path / results),
                               refine=1, sweeps_only=False, prefer="base", scores_from=None, pool=False)
        for k, v in over.items():
            setattr(args, k, v)
        script.cmd_knob_search(args)
        return json.loads((tmp_path / results / output).read_text())

    first = run("first")
    assert len(first["combinations"]) == 27 and sum(scored) == first["n_points_scored"] == first["n_points_exact"]
    assert first["n_points_scored"] > 1 + 6 * 2  # the sweeps and more
    scored.clear()
    again = run("again", scores_from=[str(tmp_path / "first")])
    assert sum(scored) == 0 and again["n_points_reused"] == first["n_points_scored"]
    for key in ("combinations", "reached", "twofold_reached", "sweeps"):
        assert again[key] == first[key], key
    # an earlier point that puts every question at expert: --pool finds it for all-expert, in-sample only
    path = script.search_scores_path(tmp_path / "first", "clm")
    knobs = script.knob_fingerprints(SimpleNamespace(design="per-level", runs=str(tmp_path / "runs")), "clm")
    meta = {"knobs": knobs, "rows": script.rows_fingerprint(rows), "row_domains": [r["domain"] for r in rows]}
    saved = script.load_search_scores(path, knobs, meta["rows"], len(rows), names)
    planted = {k: 0.125 for k in names}
    saved[script.key_of(planted, names)] = torch.tensor([[-9.0, -9.0, -1.0]] * len(rows))
    script.save_search_scores(script.search_scores_path(tmp_path / "planted", "clm"), saved, meta)
    scored.clear()
    pooled = run("pooled", scores_from=[str(tmp_path / "planted")], pool=True)
    assert sum(scored) == 0 and pooled["pooled"]
    all_expert = next(c for c in pooled["combinations"] if set(c["targets"].values()) == {"expert"})
    assert all_expert["point"] == planted and all_expert["reached"]
    twofold = [[c["twofold_accuracy"] for c in r["combinations"]] for r in (pooled, first)]
    assert twofold[0] == twofold[1]
    not_pooled = run("not_pooled", scores_from=[str(tmp_path / "planted")])
    assert planted not in [c["point"] for c in not_pooled["combinations"]]
    margin = run("margin", scores_from=[str(tmp_path / "first")], prefer="margin")
    assert margin["prefer"] == "margin"
    assert [c["point"] for c in margin["combinations"]] != [c["point"] for c in first["combinations"]]
    # a search that reads and saves into one folder keeps the points it did not use
    run("planted", scores_from=[str(tmp_path / "planted")], prefer="margin")
    kept = script.load_search_scores(script.search_scores_path(tmp_path / "planted", "clm"), meta["knobs"],
                                     meta["rows"], len(rows), names)
    assert script.key_of(planted, names) in kept
    # one knob retrained: the points that leave it at 0 are read, the rest scored, and the search is what a search
    # from scratch finds, to the bit
    perturb(model, seed=99, scale=0.3, adapter="legal_avoid")
    model.save_pretrained(tmp_path / "runs" / "clm", selected_adapters=["legal_avoid"])
    scored.clear()
    swapped = run("swapped", scores_from=[str(tmp_path / "first")])
    assert 0 < swapped["n_points_reused"] and 0 < sum(scored) == swapped["n_points_scored"]
    fresh = run("fresh")
    for key in ("combinations", "reached", "twofold_reached", "sweeps", "n_points_exact"):
        assert swapped[key] == fresh[key], key
    assert swapped["sweeps"]["legal_avoid"] != first["sweeps"]["legal_avoid"]  # the retrained knob does differ
    with pytest.raises(SystemExit, match="--pool searches the points of --scores-from runs too"):
        run("bad", pool=True)
    with pytest.raises(SystemExit, match="--pool searches combinations; --sweeps-only stops before any search"):
        run("bad", pool=True, sweeps_only=True, scores_from=[str(tmp_path / "first")])
    # --sweeps-only keeps its points too; a search stopped (Ctrl-C) while scoring keeps what it scored before, and a
    # rerun reads those back and ends where an uninterrupted search ends
    sweeps = run("sweeps", sweeps_only=True, output="knob_search_sweeps.json")
    assert sweeps["n_points_scored"] == 1 + 6 * 2 and sweeps["sweeps"] == fresh["sweeps"]
    calls = []

    def interrupted(kind, m, tok, rws, points, vectors=None, **kw):
        calls.append(len(points))
        if len(calls) == 2:  # the first exact points after the sweeps
            raise KeyboardInterrupt
        return real_score_points(kind, m, tok, rws, points, vectors, **kw)

    monkeypatch.setattr(script, "score_points", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("stopped")
    knobs_now = script.knob_fingerprints(SimpleNamespace(design="per-level", runs=str(tmp_path / "runs")), "clm")
    kept = script.load_search_scores(script.search_scores_path(tmp_path / "stopped", "clm"), knobs_now, meta["rows"],
                                     len(rows), names)
    assert len(kept) == calls[0] == 1 + 6 * 2
    monkeypatch.setattr(script, "score_points", counting_score_points)
    resumed = run("resumed", scores_from=[str(tmp_path / "stopped")])
    assert resumed["n_points_reused"] == 1 + 6 * 2
    for key in ("combinations", "reached", "twofold_reached", "n_points_exact"):
        assert resumed[key] == fresh[key], key


def test_knob_vectors_are_extracted_once_and_again_after_a_retrain(tmp_path):
    """The vectors stage's files: a missing checkpoint is one clear error; each vector is extracted on first use,
    reused while its checkpoint is older, and extracted again when the knob was retrained after it."""
    import os
    from types import SimpleNamespace

    from safetensors.torch import load_file

    script = _domains_script()
    tokenizer = tiny_tokenizer()
    _plain_model(tokenizer, seed=3).save_pretrained(tmp_path / "base")
    args = SimpleNamespace(design="per-level", runs=str(tmp_path / "runs"))
    with pytest.raises(SystemExit, match="no full-DPO checkpoint for knob medical_avoid at .*full/medical_avoid"):
        script.knob_vectors(args, base=tmp_path / "base")
    names = script.knob_names(args)
    for i, name in enumerate(names):
        _plain_model(tokenizer, seed=20 + i).save_pretrained(tmp_path / "runs" / "full" / name)
    paths = script.knob_vectors(args, base=tmp_path / "base")
    assert sorted(paths) == sorted(names) and all(Path(v).exists() for v in paths.values())
    first = load_file(paths["legal_expert"])
    stamp = os.stat(paths["legal_expert"]).st_mtime
    assert script.knob_vectors(args, base=tmp_path / "base") == paths  # reused: no checkpoint is newer
    assert os.stat(paths["legal_expert"]).st_mtime == stamp
    retrained = tmp_path / "runs" / "full" / "legal_expert"
    _plain_model(tokenizer, seed=99).save_pretrained(retrained)
    for f in retrained.glob("*.safetensors"):
        os.utime(f, (stamp + 10, stamp + 10))
    script.knob_vectors(args, base=tmp_path / "base")
    again = load_file(paths["legal_expert"])
    assert any(not torch.equal(first[k], again[k]) for k in first)


def test_bad_input_is_one_clear_error(setup):
    model, tokenizer = setup
    with pytest.raises(ValueError, match="lacks \\['expert'\\]"):
        level_scores(model, tokenizer, [{"prompt": "hi", "avoid": "no", "generic": "hi"}], [{"x": 1.0}])
    with pytest.raises(ValueError, match="empty"):
        level_scores(model, tokenizer, [{**ROWS[0], "generic": " "}], [{"x": 1.0}])
    with pytest.raises(ValueError, match="no rows"):
        level_scores(model, tokenizer, [], [{"x": 1.0}])
    with pytest.raises(ValueError, match="no points"):
        level_scores(model, tokenizer, ROWS, [])
    with pytest.raises(ValueError, match="not active"):
        level_scores(model, tokenizer, ROWS, [{"w": 1.0}])
    with pytest.raises(ValueError, match="one active adapter"):
        level_scores(model, tokenizer, ROWS, [1.0])
    with pytest.raises(ValueError, match="finite"):
        level_scores(model, tokenizer, ROWS, [{"x": float("nan")}])
    with pytest.raises(ValueError, match="plain model"):
        level_scores(_plain_model(tokenizer), tokenizer, ROWS, [0.5])
    model.set_alpha([0.0, 1.0])  # per sequence: a left-out adapter has no one alpha to keep
    try:
        with pytest.raises(ValueError, match=r"leaves out \['y', 'z'\].*one per sequence"):
            level_scores(model, tokenizer, ROWS, [{"x": 1.0}])
        full = level_scores(model, tokenizer, ROWS, [{"x": 1.0, "y": 0.0, "z": 0.0}])  # naming all of them works
        assert full.shape == (1, len(ROWS), 3)
    finally:
        model.set_alpha(1.0)
    with pytest.raises(ValueError, match="unknown level"):
        level_accuracy(torch.zeros(1, 2, 3), "expertise")
    with pytest.raises(ValueError, match="dimension of 3"):
        levels_from_scores(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="do not match"):
        search_combinations(torch.zeros(2, 3, 3), ["a"] * 3, [{"a": 0.0}], ["a"])
    with pytest.raises(ValueError, match="no rows"):
        search_combinations(torch.zeros(1, 2, 3), ["a", "a"], [{"a": 0.0}], ["a", "b"])


def _texts(pairs):
    return [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]


def test_ordinal_and_target_pairs_order_the_levels():
    row = ROWS[0]
    assert _texts(ordinal_pairs([row])) == [(row["expert"], row["generic"]), (row["generic"], row["avoid"])]
    assert _texts(target_pairs([row], "avoid")) == [(row["avoid"], row["generic"]), (row["avoid"], row["expert"])]
    assert all(p["prompt"] == row["prompt"] for p in ordinal_pairs([row]) + target_pairs([row], 2))
    assert len(ordinal_pairs(ROWS)) == len(target_pairs(ROWS, "generic")) == 2 * len(ROWS)


def test_end_and_held_pairs_name_the_end_they_train():
    row = ROWS[1]

    def with_alpha(pairs):
        return [(*t, p["alpha"]) for t, p in zip(_texts(pairs), pairs)]

    a, g, e = row["avoid"], row["generic"], row["expert"]
    assert with_alpha(end_pairs([row])) == [(e, g, 1.0), (a, g, -1.0)]
    assert with_alpha(held_pairs([row])) == [(g, e, 1.0), (g, a, -1.0)]
    assert with_alpha(held_pairs([row], both_levels=True)) == [(g, e, 1.0), (g, a, 1.0), (g, e, -1.0), (g, a, -1.0)]


def test_anchor_pairs_hold_both_orders_and_alternate_the_other_level():
    texts = _texts(anchor_pairs(ROWS))
    assert texts[:4] == [
        (ROWS[0]["generic"], ROWS[0]["avoid"]),
        (ROWS[0]["avoid"], ROWS[0]["generic"]),
        (ROWS[1]["generic"], ROWS[1]["expert"]),
        (ROWS[1]["expert"], ROWS[1]["generic"]),
    ]
    assert sorted(texts) == sorted((r, c) for c, r in texts)


def _dpo_loss(model, tokenizer, pairs, beta=0.1):
    """TRL's sigmoid DPO loss with the policy at alpha 1 and the reference at alpha 0 (what training optimises)."""

    def logps(side, alpha):
        prompts, answers = [p["prompt"] for p in pairs], [p[side][0]["content"] for p in pairs]
        (ids, mask, target), *_ = completion_batches(tokenizer, prompts, answers, len(pairs), 64, torch.device("cpu"))
        return _completion_logprob(model(input_ids=ids, attention_mask=mask, clm_alpha=alpha).logits, ids, target)

    with torch.no_grad():
        ref = logps("chosen", 0.0) - logps("rejected", 0.0)
    margin = beta * (logps("chosen", 1.0) - logps("rejected", 1.0) - ref)
    return -torch.nn.functional.logsigmoid(margin).mean(), margin.detach()


def test_anchor_pairs_have_zero_gradient_at_the_reference_and_pull_a_drifted_margin_back():
    tokenizer = tiny_tokenizer()
    model = get_peft_model(_plain_model(tokenizer), ClmConfig(interpolation="logits"))
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_norm(pairs):
        model.zero_grad()
        _dpo_loss(model, tokenizer, pairs)[0].backward()
        return torch.cat([p.grad.flatten() for p in params]).norm().item()

    # at the identity initialisation the policy is the reference: ordinal pairs push, anchors cancel exactly
    assert grad_norm(ordinal_pairs(ROWS)) > 1e-4
    assert grad_norm(anchor_pairs(ROWS)) < 1e-7
    # a policy that drifted (a stand-in for training on another domain) is pulled back towards margin 0
    perturb(model, seed=3, scale=0.3)
    one_sided = anchor_pairs(ROWS)[::2]  # generic over the other level, the margins anchors hold at 0
    before = _dpo_loss(model, tokenizer, one_sided)[1].abs().sum()
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        _dpo_loss(model, tokenizer, anchor_pairs(ROWS))[0].backward()
        optimizer.step()
    after = _dpo_loss(model, tokenizer, one_sided)[1].abs().sum()
    assert before > 1e-3 and after < 0.5 * before


def test_pairs_refuse_a_row_without_the_level():
    with pytest.raises(ValueError, match="no 'generic' answer"):
        ordinal_pairs([{"prompt": "q", "avoid": "a", "expert": "e"}])
    with pytest.raises(ValueError, match="unknown level"):
        target_pairs(ROWS, "expertise")


def _leaky_scores():
    """Three domains and a control, two rows each; knob `<d>_up` at 1 puts domain d at expert and, leaking, the
    next domain too (a at 1 moves b); `<d>_down` at 1 puts d at avoid and leaks the same way. Returns points, row
    domains, scores."""
    doms = ["a", "b", "c"]
    row_domains = [d for d in [*doms, "g"] for _ in range(2)]
    names = [f"{d}_{end}" for d in doms for end in ("down", "up")]
    points = [{k: 0.0 for k in names}] + [{**{k: 0.0 for k in names}, k: 1.0} for k in names]
    scores = torch.full((len(points), len(row_domains), 3), -5.0)
    scores[:, :, 1] = -1.0  # generic everywhere at the base
    for j, p in enumerate(points[1:], start=1):
        knob = next(k for k, a in p.items() if a)
        d, end = knob.split("_")
        moved = [d, doms[(doms.index(d) + 1) % 3]]
        for i, rd in enumerate(row_domains):
            if rd in moved:
                scores[j, i] = torch.tensor([-5.0, -5.0, -5.0])
                scores[j, i, 0 if end == "down" else 2] = -0.5
    return points, row_domains, scores, names


def test_routed_search_answers_each_question_at_its_routes_point():
    from peft_clm.tools.levels import routed_combinations

    points, row_domains, scores, names = _leaky_scores()
    doms = ["a", "b", "c"]
    # one point for all: a leaky knob moves its neighbour too, so only all-generic and the six combinations with a
    # domain and its neighbour at one end and the third generic are reached
    one = search_combinations(scores, row_domains, points, doms, controls={"g": "generic"})
    assert sum(c["reached"] for c in one) == 7
    # routed on the true domains: every combination, with any point for a route (a's leaky knob serves b as well
    # as b's own) or with each domain's own knobs only, then its own knob (or the base) for its route
    routed = routed_combinations(scores, row_domains, row_domains, points, doms, controls={"g": "generic"})
    assert len(routed) == 27 and all(c["reached"] and c["accuracy"]["g"] == 1.0 for c in routed)
    own = {d: [f"{d}_down", f"{d}_up"] for d in doms}
    routed = routed_combinations(scores, row_domains, row_domains, points, doms, knobs_of=own)
    assert all(c["reached"] for c in routed)
    for c in routed:
        for d, lv in c["targets"].items():
            expected = {k: 0.0 for k in names}
            if lv != "generic":
                expected[f"{d}_{'down' if lv == 'avoid' else 'up'}"] = 1.0
            assert c["points"][d] == expected
    # a misrouted question is answered at its route's point: an a-question sent to the control gets the base
    routes = list(row_domains)
    routes[0] = "g"
    missed = routed_combinations(scores, row_domains, routes, points, doms, controls={"g": "generic"})
    for c in missed:
        assert c["accuracy"]["a"] == (1.0 if c["targets"]["a"] == "generic" else 0.5)
    # an a-question sent to c gets c's point: right only where c's knob (or the base) puts an a-question at a's
    # target (c's knobs leak into a); with c generic it stays generic
    routes[0] = "c"
    crossed = routed_combinations(scores, row_domains, routes, points, doms, knobs_of=own)
    for c in crossed:
        ta, tc = c["targets"]["a"], c["targets"]["c"]
        assert c["accuracy"]["a"] == (1.0 if ta == tc else 0.5)
    # knobs_of: a's route may only use a's knobs; with c's knobs only (which reach a by leaking from c), a still
    # reaches its levels, but b's route cannot reach anything but generic
    limited = routed_combinations(scores, row_domains, row_domains, points, doms,
                                  knobs_of={"a": ["a_down", "a_up"], "b": [], "c": ["c_down", "c_up"]})
    assert [c["reached"] for c in limited] == [c["targets"]["b"] == "generic" for c in limited]
    # two-fold: chosen on rows 0, 2, 4 (and the control's 6), reported on the others; break row 1 (domain a) so that
    # a's expert is never reached on the report half although the choosing half shows it
    broken = scores.clone()
    broken[:, 1] = torch.tensor([-1.0, -5.0, -5.0])
    select = [i % 2 == 0 for i in range(len(row_domains))]
    split = routed_combinations(broken, row_domains, row_domains, points, doms, select=select)
    for c in split:
        assert c["reached"] == (c["targets"]["a"] == "avoid")
        assert c["accuracy"]["a"] == (1.0 if c["targets"]["a"] == "avoid" else 0.0)  # row 1 alone, not rows 0-1
        assert c["selected_min_accuracy"] == 1.0
    with pytest.raises(ValueError, match="select has 3 values for 8 rows"):
        routed_combinations(scores, row_domains, row_domains, points, doms, select=[True] * 3)
    with pytest.raises(ValueError, match=r"control\(s\) \['g'\] have no rows to report on"):
        routed_combinations(scores, row_domains, row_domains, points, doms, controls={"g": "generic"},
                            select=[i % 2 == 0 or rd == "g" for i, rd in enumerate(row_domains)])
    with pytest.raises(ValueError, match="needs the base point"):
        routed_combinations(scores[1:], row_domains, row_domains, points[1:], doms)
    with pytest.raises(ValueError, match="prefer must be 'accuracy'"):
        routed_combinations(scores, row_domains, row_domains, points, doms, prefer="strongest")
    # weakest: of two points that reach a's expert, the one nearer the base, even when the other is more accurate
    strong = {**points[0], "a_up": 2.0}
    more = torch.cat([scores, scores[names.index("a_up") + 1 : names.index("a_up") + 2]])
    more[-1, :2] = torch.tensor([-5.0, -5.0, -0.5])
    weak = scores.clone()
    weak[names.index("a_up") + 1, 1] = torch.tensor([-5.0, -0.5, -5.0])  # a_up at 1: one of a's two rows at expert
    weak = torch.cat([weak, more[-1:]])
    for prefer, want, threshold in (("accuracy", 2.0, 0.5), ("weakest", 1.0, 0.5), ("weakest", 2.0, 0.8)):
        picked = routed_combinations(weak, row_domains, row_domains, [*points, strong], doms, knobs_of=own,
                                     prefer=prefer, threshold=threshold)
        c = next(c for c in picked if c["targets"] == {"a": "expert", "b": "generic", "c": "generic"})
        assert c["points"]["a"]["a_up"] == want, (prefer, threshold)
    with pytest.raises(ValueError, match="domain 'a' has no rows routed to it"):
        routed_combinations(scores, row_domains, ["g"] * 2 + row_domains[2:], points, doms)
    with pytest.raises(ValueError, match=r"do not match 7 points x 8 rows \(7 routes\)"):
        routed_combinations(scores, row_domains, row_domains[:7], points, doms)


def test_routed_stage_end_to_end_merges_score_files_and_routes_with_the_base_model(tmp_path, monkeypatch):
    """The routed stage on a tiny model: it fits a router on other questions, routes the held-out ones, merges a
    knob-search's scores with a knob stage's (a retrained knob kept apart by its fingerprint) and writes the three
    searches; questions it was fitted on may not be the held-out ones."""
    from types import SimpleNamespace

    import peft_clm.tools.loading as loading

    script = _domains_script()
    tokenizer = tiny_tokenizer()
    model = _plain_model(tokenizer, seed=3)
    monkeypatch.setattr(loading, "load_model", lambda name: (model, tokenizer))
    topic = {"medical": "sea sky sun", "legal": "hello dear sir", "financial": "one two three",
             "general": "cat dog bird"}
    data = tmp_path / "data"
    data.mkdir()
    rows = [{**ROWS[i % 3], "prompt": [{"role": "user", "content": f"{topic[d]} {w} ?"}], "domain": d}
            for d in script.DOMAINS for i, w in enumerate(["tree", "river", "moon", "madam"])]
    train = [{"prompt": [{"role": "user", "content": f"{w} {topic[d]} {w}"}], "domain": d}
             for d in script.DOMAINS for w in ["tree", "river", "moon", "why", "what", "good"]]
    (data / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    names = script.knob_names(SimpleNamespace(design="per-level"))
    zero = {k: 0.0 for k in names}
    row_domains = [r["domain"] for r in rows]
    rows_sha = script.rows_fingerprint(rows)
    generic = torch.tensor([[-5.0, -1.0, -5.0]] * len(rows))

    def at(level, domain):  # scores with `domain`'s questions at `level`, the rest generic
        s = generic.clone()
        for i, d in enumerate(row_domains):
            if d == domain:
                s[i] = torch.tensor([-5.0, -5.0, -5.0])
                s[i, ("avoid", "generic", "expert").index(level)] = -1.0
        return s

    points = {script.key_of(zero, names): generic}
    for d in script.REGULATED:
        points[script.key_of({**zero, f"{d}_avoid": 1.0}, names)] = at("avoid", d)
        if d != "financial":
            points[script.key_of({**zero, f"{d}_expert": 1.0}, names)] = at("expert", d)
    points[script.key_of({**zero, "financial_expert": 1.0}, names)] = generic  # a weak financial expert knob
    knobs = {k: f"{i:064x}" for i, k in enumerate(names)}
    meta = {"knobs": knobs, "rows": rows_sha, "row_domains": row_domains}
    script.save_search_scores(script.search_scores_path(tmp_path / "search", "clm"), points, meta)
    # the knob stage's file of a retrained financial expert knob that works (another fingerprint, same name)
    knob_file = tmp_path / "knob" / "knob_financial_expert_scores.safetensors"
    script.save_search_scores(knob_file, {script.key_of({"financial_expert": a}, ["financial_expert"]): s
                                          for a, s in [(0.0, generic), (2.0, at("expert", "financial"))]},
                              {**meta, "knobs": {"financial_expert": "f" * 64}})

    def run(results, *sources, router_data=data / "train.jsonl", pick="accuracy"):
        args = SimpleNamespace(data=str(data), scores_from=[str(s) for s in sources], results=str(tmp_path / results),
                               router_data=str(router_data), pick=pick)
        script.cmd_routed(args)
        return json.loads((tmp_path / results / "routed.json").read_text())

    first = run("one", tmp_path / "search")
    assert first["router"]["accuracy"] == 1.0 and first["n_points"] == len(points)
    assert first["own"]["reached"] == first["own_true_routes"]["reached"] == 18  # no financial expert
    assert (tmp_path / "one" / "router" / "router.safetensors").is_file()
    table = (tmp_path / "one" / "routed_combinations.csv").read_text().splitlines()
    assert len(table) == 28 and table[0].startswith("medical_target,legal_target,financial_target,medical_accuracy")
    both = run("both", tmp_path / "search", knob_file)
    assert both["n_points"] == len(points) + 1  # the base point is in both files, kept once
    assert both["knobs"]["financial_expert@ffffffff"] == "f" * 64 and both["knobs"]["financial_expert"] == knobs[
        "financial_expert"]
    assert both["own"]["reached"] == both["own"]["twofold_reached"] == 27
    # leakage under routing: each domain set alone moves only its own questions (the router makes no error here)
    assert sorted(both["leakage"]) == sorted(f"{d}_{lv}" for d in script.REGULATED for lv in ("avoid", "expert"))
    assert all(v["leakage"] == 0.0 and abs(v["own_change"]) == 1.0 for v in both["leakage"].values())
    assert first["leakage"]["financial_expert"]["leakage"] is None  # the weak knob never moved its own domain
    fin_expert = next(c for c in both["own"]["combinations"] if c["targets"]["financial"] == "expert")
    assert fin_expert["points"]["financial"]["financial_expert@ffffffff"] == 2.0
    with pytest.raises(SystemExit, match="shares 16 questions with the held-out ones"):
        run("bad", tmp_path / "search", router_data=data / "heldout.jsonl")
    with pytest.raises(SystemExit, match="give --scores-from"):
        run("bad")
    with pytest.raises(SystemExit, match="specific reads leakage, which routing takes away"):
        run("bad", tmp_path / "search", pick="specific")
    assert run("weakest", tmp_path / "search", knob_file, pick="weakest")["pick"] == "weakest"


def test_markers_read_each_knobs_alpha_from_a_search_or_its_sweeps_only_run(tmp_path):
    from types import SimpleNamespace

    script = _domains_script()
    names = script.knob_names(SimpleNamespace(design="per-level"))

    def sweep(own, best):  # a knob's 1-D sweep: its own domain at its level on every question from `best` on
        domain, level = own.rsplit("_", 1)
        rows = []
        for a in (0.0, 1.0, 2.0):
            levels = {d: {"avoid": 0.0, "generic": 1.0, "expert": 0.0, "mean_level": 0.0} for d in script.DOMAINS}
            if a >= best:
                levels[domain] = {**levels[domain], "generic": 0.0, level: 1.0}
            rows.append({"alpha": a, "levels": levels})
        return rows

    sweeps = {k: sweep(k, 1.0 if "medical" in k else 2.0) for k in names}
    (tmp_path / "knob_search_sweeps.json").write_text(json.dumps(
        {"sweeps": sweeps, "runs": str(tmp_path / "runs"), "interpolation": "logits"}))
    args = SimpleNamespace(design="per-level", results=str(tmp_path), runs=str(tmp_path / "runs"),
                           interpolation="logits", pick="accuracy")
    picks, source = script.level_alphas(args)
    assert source == "knob_search_sweeps.json sweeps, --pick accuracy"
    assert picks["medical"] == {"generic": 0.0, "avoid": -1.0, "expert": 1.0}
    assert picks["legal"] == {"generic": 0.0, "avoid": -2.0, "expert": 2.0}
    args.runs = str(tmp_path / "other")
    with pytest.raises(SystemExit, match="knob_search_sweeps.json swept the knobs of"):
        script.level_alphas(args)
