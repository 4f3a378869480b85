"""The comparison report: intervals, paired counts and the exact McNemar p-value."""

from __future__ import annotations

import json
import random

import pytest

from medadapt.eval.compare import main as compare
from medadapt.eval.compare import mcnemar_exact
from medadapt.eval.report import summarize, write_results


@pytest.mark.parametrize("b, c", [(0, 0), (3, 0), (5, 9), (40, 61), (12, 12)])
def test_mcnemar_matches_scipy_binomial_test(b, c):
    from scipy.stats import binomtest

    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


def fake_run(directory, correct: dict[tuple[str, str], bool]):
    records = [{"task": t, "id": i, "gold": 0, "pred": 0 if ok else 1, "pred_norm": 0 if ok else 1,
                "acc": float(ok), "acc_norm": float(ok), "loglikelihoods": [0.0, -1.0]}
               for (t, i), ok in correct.items()]
    write_results(str(directory), summarize(records), records, {"model": "fake"})


def test_compare_writes_table_with_paired_counts_and_chart(tmp_path):
    rng = random.Random(0)
    keys = [(t, str(i)) for t in ("medqa_4options", "pubmedqa") for i in range(50)]
    base = {k: rng.random() < 0.4 for k in keys}
    better = {k: (v or rng.random() < 0.5) for k, v in base.items()}  # only flips wrong → right
    fake_run(tmp_path / "base", base)
    fake_run(tmp_path / "sft", better)
    compare([f"base={tmp_path / 'base'}", f"sft={tmp_path / 'sft'}", "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp.md").read_text()
    assert "| base |" in table and "| sft |" in table
    c = sum(1 for k in keys if k[0] == "pubmedqa" and better[k] and not base[k])
    assert f"| sft | pubmedqa | 50 | 0 | {c} | {mcnemar_exact(0, c):.3g} |" in table
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_chart_marks_chance_per_task_wraps_names_and_adds_the_macro_average(tmp_path):
    from medadapt.eval.compare import chance_levels, task_label

    keys = [(t, str(i)) for t in ("mmlu_professional_medicine", "pubmedqa") for i in range(10)]
    fake_run(tmp_path / "base", {k: i % 2 == 0 for i, k in enumerate(keys)})
    # fake_run's items have 2 choices; PubMedQA's real ones have 3: chance follows each item's own count
    lines = [json.loads(x) for x in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    for r in lines:
        r["n_choices"] = 3 if r["task"] == "pubmedqa" else 4
    (tmp_path / "base" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert chance_levels(str(tmp_path / "base")) == pytest.approx({"mmlu_professional_medicine": 0.25, "pubmedqa": 1 / 3})
    assert all(len(part) <= 12 for part in task_label("mmlu_professional_medicine").split("\n"))
    compare([str(tmp_path / "base"), "--out", str(tmp_path / "cmp")])
    assert (tmp_path / "cmp.png").stat().st_size > 1000
