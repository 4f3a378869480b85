"""The RAG arm of the test stage: snippets before the question, within budget; scoring otherwise untouched."""

from __future__ import annotations

import json

import pytest

from medadapt.eval.data import BenchmarkDataModule
from medadapt.rag.config import RetrievalConfig
from medadapt.rag.context import HEADER, RagArmConfig, format_context

from ..conftest import DATA

BENCH = str(DATA / "benchmarks")
TASKS = ["medqa_4options", "pubmedqa"]


def test_context_fits_the_budget_and_cuts_cleanly(r1_tokenizer):
    snippets = ["Aspirin irreversibly inhibits cyclooxygenase. " * 3, "Heparin potentiates antithrombin. " * 40,
                "Never shown."]
    block, used = format_context(snippets, r1_tokenizer, 120)
    assert block.startswith(HEADER) and used == 2 and "Never shown" not in block
    assert len(r1_tokenizer.encode(block, add_special_tokens=False)) <= 120
    assert block.splitlines()[1].startswith("[1] Aspirin") and block.rstrip().endswith("…")
    assert "antithromb …" not in block  # cut at a word boundary
    assert format_context([], r1_tokenizer, 120) == ("", 0)
    assert format_context(snippets, r1_tokenizer, 5) == ("", 0)


def arm(index_cfg, **kw) -> RagArmConfig:
    return RagArmConfig(index=index_cfg, retrieval=RetrievalConfig(top_k=3), max_context_tokens=200, **kw)


def test_arm_prepends_snippets_and_keeps_items_choices_and_gold(medquad_index, r1_tokenizer, monkeypatch):
    plain = BenchmarkDataModule(tasks=TASKS, local_dir=BENCH, limit=3, tokenizer=str(DATA.parent / "fixtures" /
                                                                                       "deepseek-r1-distill-qwen-tokenizer"))
    rag = BenchmarkDataModule(tasks=TASKS, local_dir=BENCH, limit=3, tokenizer=plain.hparams.tokenizer,
                              rag=arm(medquad_index))
    plain.setup("test")
    rag.setup("test")
    assert len(rag.items) == len(plain.items) == 6
    for p, r in zip(plain.items, rag.items):
        assert (r.task, r.id, r.choices, r.gold, r.question) == (p.task, p.id, p.choices, p.gold, p.question)
        assert r.prompt == r.context + p.prompt and r.context.startswith(HEADER)
        assert len(r1_tokenizer.encode(r.context, add_special_tokens=False)) <= 200
        assert 1 <= len(r.extra["retrieved_ids"]) <= 3
    # retrieval happened once per item and is cached: a second data module does not retrieve
    import medadapt.rag.pipelines as pipelines

    monkeypatch.setattr(pipelines, "HybridRetriever", lambda *a, **k: pytest.fail("retrieved again despite the cache"))
    again = BenchmarkDataModule(tasks=TASKS, local_dir=BENCH, limit=3, tokenizer=plain.hparams.tokenizer,
                                rag=arm(medquad_index))
    again.setup("test")
    assert [i.prompt for i in again.items] == [i.prompt for i in rag.items]


def test_rag_test_stage_stores_retrieved_ids_with_predictions(medquad_index, tiny_qwen, tmp_path):
    from ..conftest import run_test_stage

    run_test_stage(tiny_qwen, tmp_path, tasks=TASKS, limit=2, rag=arm(medquad_index))
    preds = [json.loads(line) for line in open(tmp_path / "results" / "predictions.jsonl")]
    assert len(preds) == 4 and all(p["retrieved_ids"] and len(p["loglikelihoods"]) == p["n_choices"] for p in preds)
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["data"]["rag"]["index"]["dir"] == medquad_index.dir


def test_ask_answers_with_an_adapter_and_prints_its_sources(medquad_index, tiny_qwen, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medadapt.commands.rag import ask_main

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen), LoraConfig(r=4, target_modules="all-linear")) \
        .save_pretrained(adapter)
    question = "What are the treatments for Kaposi Sarcoma ?"
    ask_main(["--index.dir", medquad_index.dir, "--retrieval.top_k", "3", "--model.name_or_path", tiny_qwen,
              "--model.load_in_4bit", "false", "--model.base_adapters", "[]", "--model.compute_dtype", "float32",
              "--init_adapter", str(adapter),
              "--max_new_tokens", "4", "--max_context_tokens", "400", question])
    out = capsys.readouterr().out
    assert "Sources:" in out and "0000003_3-5" in out.split("Sources:")[1]
