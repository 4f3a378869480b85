"""What results.json says: plain float64 metrics, only the columns that mean something in the run's mode."""

from __future__ import annotations

import json

from medadapt.eval.report import summarize


def records(preds: list[int], generative: bool) -> list[dict]:
    return [{"task": "t", "id": str(i), "gold": 1, "pred": p, "pred_norm": p, "n_choices": 4,
             "loglikelihoods": None if generative else [-1.0, -2.0, -3.0, -4.0], "unparsable": int(p < 0)}
            for i, p in enumerate(preds)]


def test_accuracy_is_a_python_float_without_float32_artifacts():
    summary = summarize(records([1, 1, 0, 0, 2], generative=False))
    m = summary["tasks"]["t"]
    assert type(m["acc"]) is float and m["acc"] == 2 / 5
    assert '"acc": 0.4,' in json.dumps(m)  # not 0.4000000059604645


def test_log_likelihood_runs_have_no_unparsable_column_and_generative_runs_do():
    assert "unparsable" not in summarize(records([1, 0], generative=False))["tasks"]["t"]
    assert summarize(records([1, -1], generative=True))["tasks"]["t"]["unparsable"] == 1
