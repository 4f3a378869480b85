"""Generative mode: chat prompts, batched generation, unparsable answers counted (the reader: test_answers.py)."""

from __future__ import annotations

import json

import pytest
import torch

from medadapt.eval.data import BenchmarkDataModule
from medadapt.eval.tasks import load_task
from medadapt.eval.generative import GenerationConfig, collate_generate, gen_row, generate, user_message
from medadapt.eval.report import summarize

from ..conftest import DATA, run_test_stage

BENCH = str(DATA / "benchmarks")


GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=12, answer_budget=0)


def test_chat_prompt_carries_question_options_and_instruction_and_opens_the_thought(r1_tokenizer):
    item = load_task("medqa_4options", BENCH)[0]
    row = gen_row(r1_tokenizer, item)
    text = r1_tokenizer.decode(row.input_ids)
    assert text.endswith("<｜Assistant｜><think>\n") and row.thinking  # DeepSeek: start the reply with <think>\n
    assert user_message(item) in text and "\\boxed{}" in text and "D. " + item.options[3] in text
    assert row.input_ids[0] == r1_tokenizer.bos_token_id and row.input_ids.count(r1_tokenizer.bos_token_id) == 1
    assert "<｜System｜>" not in text and "system" not in text.lower()[:40]  # no system prompt
    plain = gen_row(r1_tokenizer, item, GenerationConfig(open_think=False))
    assert r1_tokenizer.decode(plain.input_ids).endswith("<｜Assistant｜>") and not plain.thinking


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_qwen, r1_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    items = load_task("mmlu_anatomy", BENCH)[:2] + load_task("pubmedqa", BENCH)[:1]
    rows = [[gen_row(r1_tokenizer, it, GREEDY)] for it in items]
    assert len({len(r[0].input_ids) for r in rows}) == 3  # different lengths: padding is exercised
    batched = generate(model, r1_tokenizer, collate_generate(rows, r1_tokenizer.pad_token_id, GREEDY))
    alone = [generate(model, r1_tokenizer, collate_generate([r], r1_tokenizer.pad_token_id, GREEDY))[0] for r in rows]
    assert batched == alone


def test_sampling_gives_n_reproducible_replies_and_budget_forcing_closes_the_thought(tiny_qwen, r1_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    rows = [[gen_row(r1_tokenizer, it)] for it in load_task("mmlu_anatomy", BENCH)[:2]]
    g = GenerationConfig(samples=3, max_new_tokens=6, answer_budget=4, seed=5)
    first = generate(model, r1_tokenizer, collate_generate(rows, r1_tokenizer.pad_token_id, g))
    again = generate(model, r1_tokenizer, collate_generate(rows, r1_tokenizer.pad_token_id, g))
    other = generate(model, r1_tokenizer, collate_generate(rows, r1_tokenizer.pad_token_id, GenerationConfig(
        samples=3, max_new_tokens=6, answer_budget=4, seed=6)))
    assert [len(r) for r in first] == [3, 3] and first == again and first != other
    assert len({r.text for r in first[0]}) > 1  # sampled, not greedy
    # a random model never closes its thought in 6 tokens: every reply was closed for it and asked to answer
    assert all(r.ending == "forced" and "</think>\n\nThe final answer is" in r.text for rs in first for r in rs)
    cut = generate(model, r1_tokenizer, collate_generate(rows, r1_tokenizer.pad_token_id, GenerationConfig(
        samples=1, max_new_tokens=6, answer_budget=0)))
    assert all(r.ending == "cut" and "</think>" not in r.text for rs in cut for r in rs)


def test_replies_vote_and_average():
    from medadapt.eval.generative import Reply, decide_generated
    from medadapt.eval.tasks import Item

    item = Item("medqa_4options", "0", "", ["A", "B", "C", "D"], 2, "Q?", ["w", "x", "y", "z"])
    replies = [Reply("</think>The answer is C.", "natural"), Reply("</think>C", "forced"),
               Reply("</think>The answer is B.", "natural"), Reply("still thinking", "cut")]
    record = decide_generated(item, replies, thinking=True)
    assert record["pred"] == 2 and record["acc"] == 1.0 and record["pass1"] == 0.5
    assert (record["unparsable"], record["forced"], record["cut"], record["samples"]) == (1, 1, 1, 4)
    tie = decide_generated(item, replies[2:3] + replies[:1], thinking=True)
    assert tie["pred"] == 1  # a tie goes to the answer seen first


def test_pass_at_1_is_the_mean_over_replies_with_an_interval_over_items():
    import statistics

    rates = [1.0, 0.5, 0.0, 0.25, 0.75]
    records = [{"task": "t", "id": str(i), "gold": 0, "pred": 0 if r >= 0.5 else 1, "pred_norm": 0, "n_choices": 4,
                "loglikelihoods": None, "pass1": r, "samples": 4, "unparsable": 1, "forced": 0, "cut": 0}
               for i, r in enumerate(rates)]
    m = summarize(records)["tasks"]["t"]
    assert m["pass@1"] == pytest.approx(0.5) and m["acc"] == pytest.approx(0.6)
    assert m["pass@1_stderr"] == pytest.approx(statistics.stdev(rates) / len(rates) ** 0.5)
    assert m["unparsable_rate"] == pytest.approx(5 / 20)


def test_generative_test_stage_counts_unparsable_answers_and_records_the_protocol(tiny_qwen, tmp_path):
    """Six tokens of a random model name no answer, and budget forcing is off: every answer is unparsable,
    counted per task, scored wrong and kept with its text; results.json records how replies were made."""
    run_test_stage(tiny_qwen, tmp_path, tasks=["medmcqa", "pubmedqa"], limit=3, mode="generate", batch_size=2,
                   generation={"max_new_tokens": 6, "answer_budget": 0, "samples": 2})
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    preds = [json.loads(line) for line in open(tmp_path / "results" / "predictions.jsonl")]
    assert len(preds) == 6 and all(p["unparsable"] == 2 and p["pred"] == -1 for p in preds)
    assert all(len(p["replies"]) == 2 and all(r["generation"] for r in p["replies"]) for p in preds)
    for task in ("medmcqa", "pubmedqa"):
        assert results["tasks"][task]["unparsable"] == 6 and results["tasks"][task]["acc"] == 0.0
        assert results["tasks"][task]["unparsable_rate"] == 1.0 and results["tasks"][task]["cut"] == 6
    assert results["data"]["generation"]["temperature"] == 0.6 and results["data"]["generation"]["samples"] == 2


def test_unparsable_answers_count_as_wrong_not_as_missing():
    records = [{"task": "t", "id": str(i), "gold": 1, "pred": p, "pred_norm": p, "n_choices": 4,
                "loglikelihoods": None, "unparsable": int(p < 0)} for i, p in enumerate([1, 1, -1, 0])]
    m = summarize(records)["tasks"]["t"]
    assert m["n"] == 4 and m["acc"] == 0.5 and m["unparsable"] == 1


def test_generate_mode_parses_from_config():
    data = BenchmarkDataModule(mode="generate", generation={"max_new_tokens": 64})
    assert data.hparams.mode == "generate" and data.generation.max_new_tokens == 64
