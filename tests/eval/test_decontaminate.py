"""Decontamination: the report finds the SFT rows that copy benchmark questions, and only those."""

from __future__ import annotations

import json

from medadapt.eval.tasks import load_task
from medadapt.eval.decontaminate import BenchmarkIndex, main, scan

from ..conftest import DATA, SFT_SAMPLE

BENCH = str(DATA / "benchmarks")


def test_finds_the_three_sft_rows_that_repeat_medmcqa_questions(tmp_path):
    report, clean = tmp_path / "report.json", tmp_path / "clean.jsonl"
    main([str(SFT_SAMPLE), "--local_dir", BENCH, "--report", str(report), "--write_clean", str(clean)])
    found = json.loads(report.read_text())
    assert found["rows"] == 198 and found["flagged"] == 3 and found["per_task"] == {"medmcqa": 3}
    rows = json.loads(SFT_SAMPLE.read_text())
    medmcqa = {it.id: it.question for it in load_task("medmcqa", BENCH)}
    for f in found["findings"]:
        assert f["overlap"] == 1.0 and rows[f["row"]]["question"].strip() == medmcqa[f["item_id"]].strip()
    kept = [json.loads(line) for line in clean.read_text().splitlines()]
    assert len(kept) == 195 and {r["question"] for r in kept}.isdisjoint(medmcqa.values())


def test_near_copies_are_flagged_and_shared_phrases_are_not():
    items = load_task("mmlu_anatomy", BENCH)
    index = BenchmarkIndex(items, n=8)
    long = next(i for i, it in enumerate(items) if len(it.question.split()) >= 20)
    q = items[long].question.split()
    edited = " ".join(q[:-2] + ["(edited)"] + q[-1:]) + " Explain the reasoning in a paragraph or two."
    rows = [
        {"prompt": "Here is a question for you: " + edited},          # edited copy inside a longer text
        {"prompt": " ".join(reversed(q))},                              # same words, no shared 8-gram
        {"prompt": "A 45-year-old man presents with chest pain."},     # stock phrasing
        {"prompt": items[7].question.upper(), "n": 3},                  # case and non-text fields
    ]
    flagged = {f.row: f for f in scan(rows, index, threshold=0.5)}
    assert set(flagged) == {0, 3} and flagged[0].item_id == items[long].id and flagged[0].overlap < 1.0
    assert flagged[3].item_id == items[7].id and flagged[3].overlap == 1.0


def test_short_texts_match_whole_only():
    items = load_task("medmcqa", BENCH)[:200]
    short = next(it for it in items if len(it.question.split()) < 8)
    index = BenchmarkIndex(items, n=8)
    assert [f.item_id for f in scan([{"q": short.question}], index)] == [short.id]
    assert scan([{"q": short.question + " and more words here"}], index) == []
