"""scripts/rescore_sweeps.py: stored sweeps scored again in place, every file checked before any is written."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from peft_clm.tools.sweep import score_sweep, write_sweep


ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("rescore_sweeps", ROOT / "scripts" / "rescore_sweeps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stored_sweep(out: Path) -> dict:
    answers = {0: ["It's cool.", "Yeah."], 1: ["The Earth's crust.", "Hey!"], 2: ["Thus.", "The moon's orbit."]}
    result = score_sweep([0.0, 1.0, 2.0], ["p", "q"], answers, "casualness")
    write_sweep(result, out)
    return json.loads((out / "sweep.json").read_text())


def test_rescore_rewrites_json_csv_and_plot_and_reports_before_after(tmp_path, monkeypatch, capsys):
    script = _script()
    stored = _stored_sweep(tmp_path / "a")
    # figures that disagree with the stored answers (as after a fix of the metric): a re-score restores them
    stale = json.loads(json.dumps(stored))
    stale["rows"][1]["casualness_mean"] = 999.0
    stale["reliability"]["wrong_way_fraction"] = 1.0
    (tmp_path / "a" / "sweep.json").write_text(json.dumps(stale))
    other = tmp_path / "b" / "sweep_r4.json"  # a sweep under another name (compare_ranks' copies): JSON only
    other.parent.mkdir()
    other.write_text(json.dumps(stale))
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "a" / "sweep.json"), str(other)])
    script.main()
    for path in (tmp_path / "a" / "sweep.json", other):
        assert json.loads(path.read_text()) == stored
    rows = list(csv.DictReader((tmp_path / "a" / "sweep.csv").open()))
    assert float(rows[1]["casualness_mean"]) == stored["rows"][1]["casualness_mean"]
    assert (tmp_path / "a" / "sweep.png").stat().st_size > 0 and sorted(p.name for p in other.parent.iterdir()) == [
        "sweep_r4.json"]
    out = capsys.readouterr().out
    new = f"{stored['rows'][0]['casualness_mean']:.2f} / {stored['rows'][1]['casualness_mean']:.2f}"
    assert out.count(" / 999.00, ") == 2 and out.count("wrong way 1.000 -> ") == 2 and out.count(f"-> {new}") == 2


def test_a_file_that_is_not_a_sweep_stops_the_run_before_anything_is_written(tmp_path, monkeypatch):
    script = _script()
    stored = _stored_sweep(tmp_path / "a")
    stale = {**stored, "base_value": -1.0}
    (tmp_path / "a" / "sweep.json").write_text(json.dumps(stale))
    (tmp_path / "bad.json").write_text(json.dumps({"metric": "casualness"}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "short.json").write_text(json.dumps({**stored, "alphas": [0.0, 1.0, 3.0]}))  # no answers at 3
    for bad, message in (("bad.json", "not a sweep"), ("broken.json", "not a readable JSON"),
                         ("short.json", r"cannot be re-scored .*answers missing at \[3.0\].*no file was written")):
        monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "a" / "sweep.json"), str(tmp_path / bad)])
        with pytest.raises(SystemExit, match=message):
            script.main()
        assert json.loads((tmp_path / "a" / "sweep.json").read_text()) == stale  # untouched
    for reference, message in (("missing.json", "not a readable JSON"), ("bad.json", "expected a JSON object")):
        (tmp_path / "bad.json").write_text("[1]")
        monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "a" / "sweep.json"), "--reference",
                                          str(tmp_path / reference)])
        with pytest.raises(SystemExit, match=message):
            script.main()
        assert json.loads((tmp_path / "a" / "sweep.json").read_text()) == stale
