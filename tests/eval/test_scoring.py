"""The test stage agrees with lm-evaluation-harness item by item, and counts every item once under DDP."""

from __future__ import annotations

import json

import pytest
import torch

from medadapt.eval.data import BenchmarkDataModule
from medadapt.eval.tasks import TASKS
from medadapt.eval.scoring import collate_rows, encode_pair, forward_rows, item_rows, score_rows

from ..conftest import DATA, assert_close_to_scale, run_test_stage
from .lm_eval_reference import hub_doc, run_lm_eval

BENCH = str(DATA / "benchmarks")


@pytest.mark.slow
def test_agrees_with_lm_evaluation_harness_on_every_task(tiny_qwen, tmp_path):
    module, data = run_test_stage(tiny_qwen, tmp_path, limit=2, seed=7, batch_size=3)
    ours = {(r["task"], r["id"]): r for r in map(json.loads, open(tmp_path / "results" / "predictions.jsonl"))}
    assert len(ours) == 2 * len(TASKS)

    by_task: dict[str, list] = {}
    for item in data.items:
        by_task.setdefault(item.task, []).append(item)
    ref = run_lm_eval(tiny_qwen, {t: [hub_doc(i) for i in items] for t, items in by_task.items()}, tmp_path)
    for task, items in by_task.items():
        assert len(ref[task]) == len(items)
        for item, sample in zip(items, ref[task]):
            contexts = {a[0] for a in sample["arguments"]}
            assert contexts == {item.prompt}, "prompt differs from lm-eval's rendering"
            assert [a[1] for a in sample["arguments"]] == [" " + c for c in item.choices]
            mine = ours[(task, item.id)]
            theirs = [resp[0] for resp in sample["filtered_resps"]]
            assert_close_to_scale(torch.tensor(mine["loglikelihoods"]), torch.tensor(theirs))
            assert mine["acc"] == sample["acc"]
            if "acc_norm" in sample:
                assert mine["acc_norm"] == sample["acc_norm"]

    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(results["tasks"]) == set(TASKS) and results["n"] == 18
    assert results["data_fingerprint"] and results["model"]["name_or_path"] == tiny_qwen


def test_single_forward_equals_per_choice_forwards(tiny_qwen, r1_tokenizer):
    """The one-pass shortcut for single-token choices gives what one pass per choice gives."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    data = BenchmarkDataModule(tasks=["pubmedqa", "medqa_4options"], local_dir=BENCH, limit=2, tokenizer=tiny_qwen)
    data.setup("test")
    for item in data.items:
        rows = item_rows(r1_tokenizer, item, 4096)
        assert len(rows) == 1 and len(rows[0].targets) == len(item.choices)
        [(scored, shared)] = score_rows(forward_rows(model, collate_rows(rows, 0)), rows)
        assert scored is item
        for c, choice in enumerate(item.choices):
            ctx, cont = encode_pair(r1_tokenizer, item.prompt, " " + choice)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont):]
            ll = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert_close_to_scale(torch.tensor(shared[c][0]), torch.tensor(ll))
