"""Generative mode: answer extraction on realistic outputs, batched generation, unparsable answers counted."""

from __future__ import annotations

import json

import pytest
import torch

from medadapt.data.benchmarks import PUBMEDQA_CHOICES, BenchmarkDataModule, Item, load_task
from medadapt.eval.generative import collate_generate, extract_answer, gen_row, generate, user_message
from medadapt.eval.report import summarize

from ..conftest import DATA
from .test_scoring import run_test_stage

BENCH = str(DATA / "benchmarks")
MCQ = Item("medqa_4options", "0", "", ["A", "B", "C", "D"], 3, "Which infection explains the aplastic crisis?",
           ["Benign genetic carrier condition", "Folate deficiency", "Iron deficiency", "Parvovirus B19 infection"])
YNM = Item("pubmedqa", "1", "", PUBMEDQA_CHOICES, 0, "Does X improve Y?", passages=["Some abstract."])


@pytest.mark.parametrize("text, thinking, expected", [
    ("<think>\nB looks wrong; maybe A.\n</think>\n\nThe answer is \\boxed{D}.", True, 3),
    ("reasoning...</think>\\boxed{\\text{D. Parvovirus B19 infection}}", True, 3),
    ("</think>\n**Final answer: (C)** Iron deficiency", True, 2),
    ("</think>\nThe correct option is B, folate deficiency.", True, 1),
    ("</think>\nThis is a parvovirus B19 infection causing an aplastic crisis.", True, 3),  # option text only
    ("</think>\nA patient like this needs transfusion.", True, None),  # "A patient" is not option A
    ("</think>\nEither folate deficiency or iron deficiency.", True, None),  # two options named
    ("<think>\nThe answer is \\boxed{D} probably, but let me check", True, None),  # budget ran out mid-thought
    ("<think>\nThe answer is D, but wait", False, None),  # the model opened the block itself
    ("D", False, 3),  # a model without a thinking template
    ("C. Iron deficiency", False, 2),
    ("A. Benign genetic carrier condition\nB. Folate deficiency\nC. Iron deficiency\nStep 1:", False, None),
    ("Answer: C.", False, 2),
])
def test_extracts_mcq_answers(text, thinking, expected):
    assert extract_answer(text, MCQ, thinking) == expected


@pytest.mark.parametrize("text, expected", [
    ("</think>\n\\boxed{yes}", 0),
    ("</think>\nThe answer is: No.", 1),
    ("</think>\nmaybe", 2),
    ("</think>\nYes and no; it depends.", None),
])
def test_extracts_yes_no_maybe(text, expected):
    assert extract_answer(text, YNM, thinking=True) == expected


def test_chat_prompt_carries_question_options_and_instruction(r1_tokenizer):
    item = load_task("medqa_4options", BENCH)[0]
    row = gen_row(r1_tokenizer, item, 0)
    text = r1_tokenizer.decode(row.input_ids)
    assert text.endswith("<｜Assistant｜>") and not row.thinking  # this template leaves <think> to the model
    assert user_message(item) in text and "\\boxed{}" in text and "D. " + item.options[3] in text
    assert row.input_ids[0] == r1_tokenizer.bos_token_id and row.input_ids.count(r1_tokenizer.bos_token_id) == 1


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_qwen, r1_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    items = load_task("mmlu_anatomy", BENCH)[:2] + load_task("pubmedqa", BENCH)[:1]
    rows = [[gen_row(r1_tokenizer, it, i)] for i, it in enumerate(items)]
    assert len({len(r[0].input_ids) for r in rows}) == 3  # different lengths: padding is exercised
    batched = generate(model, r1_tokenizer, collate_generate(rows, r1_tokenizer.pad_token_id), 12)
    alone = [generate(model, r1_tokenizer, collate_generate([r], r1_tokenizer.pad_token_id), 12)[0] for r in rows]
    assert batched == alone


def test_generative_test_stage_counts_unparsable_answers(tiny_qwen, tmp_path):
    """Six tokens of a random model name no answer: every answer is unparsable,
    counted per task, scored wrong and kept with its text."""
    run_test_stage(tiny_qwen, tmp_path, tasks=["medmcqa", "pubmedqa"], limit=3, mode="generate",
                   max_new_tokens=6, batch_size=2)
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    preds = [json.loads(line) for line in open(tmp_path / "results" / "predictions.jsonl")]
    assert len(preds) == 6 and all(p["unparsable"] and p["pred"] == -1 and p["generation"] for p in preds)
    for task in ("medmcqa", "pubmedqa"):
        assert results["tasks"][task]["unparsable"] == 3 and results["tasks"][task]["acc"] == 0.0


def test_unparsable_answers_count_as_wrong_not_as_missing():
    records = [{"task": "t", "id": str(i), "gold": 1, "pred": p, "pred_norm": p, "n_choices": 4,
                "loglikelihoods": None, "unparsable": p < 0} for i, p in enumerate([1, 1, -1, 0])]
    m = summarize(records)["tasks"]["t"]
    assert m["n"] == 4 and m["acc"] == 0.5 and m["unparsable"] == 1


def test_generate_mode_parses_from_config():
    data = BenchmarkDataModule(mode="generate", max_new_tokens=64)
    assert data.hparams.mode == "generate" and data.hparams.max_new_tokens == 64
