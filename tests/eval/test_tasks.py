"""Benchmark loaders on the real shared files: counts, labels, answer mapping, malformed items."""

from __future__ import annotations

import collections
import json

import pytest

from medadapt.eval.tasks import MalformedItemError, load_task, select

from ..conftest import DATA

BENCH = str(DATA / "benchmarks")
COUNTS = {"medqa_4options": 1273, "medmcqa": 4183, "pubmedqa": 500, "mmlu_anatomy": 135,
          "mmlu_clinical_knowledge": 265, "mmlu_college_biology": 144, "mmlu_college_medicine": 173,
          "mmlu_medical_genetics": 100, "mmlu_professional_medicine": 272}


@pytest.mark.parametrize("task", list(COUNTS))
def test_full_sets_load_with_right_counts(task):
    items = load_task(task, BENCH)
    assert len(items) == COUNTS[task]
    assert len({it.id for it in items}) == len(items)
    assert all(0 <= it.gold < len(it.choices) for it in items)


def test_pubmedqa_is_the_official_test_set():
    items = load_task("pubmedqa", BENCH)
    labels = collections.Counter(it.choices[it.gold] for it in items)
    assert labels == {"yes": 276, "no": 169, "maybe": 55}
    truth = json.loads((DATA / "benchmarks" / "pubmedqa_test_ground_truth.json").read_text())
    assert {it.id for it in items} == set(truth)


def test_medmcqa_cop_is_one_based_locally():
    raw = [json.loads(line) for line in open(DATA / "benchmarks" / "medmcqa_dev.jsonl")][:50]
    items = load_task("medmcqa", BENCH)[:50]
    for r, it in zip(raw, items):
        assert it.gold == r["cop"] - 1
        assert f"{'ABCD'[it.gold]}. {[r['opa'], r['opb'], r['opc'], r['opd']][it.gold]}\n" in it.prompt


def test_medqa_and_mmlu_answer_letters_map_to_options():
    raw = [json.loads(line) for line in open(DATA / "benchmarks" / "medqa_us_4options_test.jsonl")][:20]
    for r, it in zip(raw, load_task("medqa_4options", BENCH)):
        assert "ABCD"[it.gold] == r["answer_idx"] and r["options"][r["answer_idx"]] == r["answer"]
    import csv

    rows = list(csv.reader(open(DATA / "benchmarks" / "mmlu" / "anatomy_test.csv")))
    for r, it in zip(rows, load_task("mmlu_anatomy", BENCH)):
        assert "ABCD"[it.gold] == r[5]


def test_hub_layouts_give_the_same_items(monkeypatch):
    """The hub rows (GBaker MedQA, openlifescienceai MedMCQA with 0-based cop, cais/mmlu) normalize alike."""
    import medadapt.data.sources as sources
    from datasets import Dataset

    local = {t: load_task(t, BENCH)[:5] for t in ("medqa_4options", "medmcqa", "mmlu_anatomy")}
    raw_medqa = [json.loads(line) for line in open(DATA / "benchmarks" / "medqa_us_4options_test.jsonl")][:5]
    raw_mcqa = [json.loads(line) for line in open(DATA / "benchmarks" / "medmcqa_dev.jsonl")][:5]
    import csv

    raw_mmlu = list(csv.reader(open(DATA / "benchmarks" / "mmlu" / "anatomy_test.csv")))[:5]
    hub = {
        "GBaker/MedQA-USMLE-4-options-hf": [{"sent1": r["question"], **{f"ending{i}": r["options"][k] for i, k in
                                             enumerate("ABCD")}, "label": "ABCD".index(r["answer_idx"])} for r in raw_medqa],
        "openlifescienceai/medmcqa": [{**r, "cop": r["cop"] - 1} for r in raw_mcqa],
        "cais/mmlu": [{"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in raw_mmlu],
    }
    monkeypatch.setattr(sources, "load_rows", lambda dataset, *a, **k: Dataset.from_list(hub[dataset]))
    for task, items in local.items():
        got = load_task(task, allow_partial=True)
        assert [(g.prompt, g.gold) for g in got] == [(i.prompt, i.gold) for i in items]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["options"].pop("C"), "item 2: option C is missing or empty"),
        (lambda r: r.update(answer_idx="E"), "item 2: answer 'E' is not among the 4 options"),
        (lambda r: r.update(question=""), "item 2: question is missing or empty"),
    ],
)
def test_malformed_items_name_file_and_item(tmp_path, mutate, message):
    rows = [json.loads(line) for line in open(DATA / "benchmarks" / "medqa_us_4options_test.jsonl")][:4]
    mutate(rows[2])
    (tmp_path / "medqa_us_4options_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(MalformedItemError) as err:
        load_task("medqa_4options", str(tmp_path))
    assert "medqa_us_4options_test.jsonl" in str(err.value) and message in str(err.value)


def test_seeded_subset_is_stable_and_ordered():
    items = load_task("mmlu_anatomy", BENCH)
    a, b = select(items, 10, seed=3), select(items, 10, seed=3)
    assert [i.id for i in a] == [i.id for i in b] and len(a) == 10
    assert [int(i.id) for i in a] == sorted(int(i.id) for i in a)
    assert [i.id for i in select(items, 10, seed=4)] != [i.id for i in a]


def test_limit_draws_a_seeded_sample_or_the_first_items_as_lm_eval_does():
    from medadapt.eval.tasks import select

    items = list(range(100))
    assert select(items, 5, 0, "first") == [0, 1, 2, 3, 4]  # lm-eval's --limit 5
    sample = select(items, 5, 0)
    assert sample == sorted(sample) and sample != [0, 1, 2, 3, 4] and sample == select(items, 5, 0)
    assert select(items, None, 0, "first") == items
