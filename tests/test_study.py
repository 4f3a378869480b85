"""The whole study on a tiny model: index, SFT, CPT → SFT, RL after SFT, six evaluations, the comparison; then
nothing is redone on a second run. It also checks the CPT → SFT chain: stage 2 trains on stage 1's merged weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from medadapt.eval.tasks import TASKS

from .conftest import DATA, REPO

METHODS = ["base", "rag", "sft", "cpt_sft", "sft_rag", "sft_rl"]


def fit_config(model: str, data: dict) -> dict:
    return {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0, "limit_val_batches": 1, "enable_progress_bar": False},
        "model": {"model": {"name_or_path": model, "load_in_4bit": True, "compute_dtype": "float32"},
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                  "optim": {"lr": 5e-2, "warmup_steps": 0, "fused": False}},
        "data": data,
    }


def write_configs(tmp_path, model: str, sft_file: str) -> None:
    configs = {
        "cpt.yaml": fit_config(model, {"class_path": "medadapt.data.textbooks.TextbooksDataModule", "init_args": {
            "data_files": str(DATA / "corpus" / "textbooks_sample.json"), "block_size": 128, "max_docs": 12,
            "val_fraction": 0.1, "batch_size": 2}}),
        "sft.yaml": fit_config(model, {"class_path": "medadapt.data.reasoning.ReasoningSFTDataModule", "init_args": {
            "data_files": sft_file, "max_length": 256, "val_fraction": 0.125, "batch_size": 2}}),
        "eval.yaml": {"trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False},
                      "model": {"model": {"name_or_path": model, "compute_dtype": "float32",
                                          "gradient_checkpointing": False}},
                      "data": {"class_path": "medadapt.eval.data.BenchmarkDataModule",
                               "init_args": {"local_dir": str(DATA / "benchmarks"), "limit": 2, "batch_size": 4}}},
        "rl.yaml": {**fit_config(model, {"class_path": "medadapt.rl.data.VerifiableQADataModule", "init_args": {
            "sources": [{"name": "o1", "data_files": str(DATA / "sft" / "medical_o1_reasoning_sample.json"),
                         "options_field": "options", "answer_field": "answer_idx", "answer_format": "letter",
                         "on_bad_row": "skip"}],
            "decontaminate": False, "max_questions": 8, "heldout": 2, "batch_size": 2, "open_think": False}}),
                    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "num_sanity_val_steps": 0,
                                "limit_val_batches": 1, "enable_progress_bar": False}},
        "rag.yaml": {"corpus": {"data_files": str(DATA / "corpus" / "medquad.jsonl"), "text_fields": ["answer"],
                                "title_field": "focus", "max_docs": 24},
                     "index": {"dir": "index", "chunk_size": 16}, "model": {"name_or_path": model}},
        "study.yaml": {"work_dir": "study", "methods": METHODS, "baseline": "base", "index_config": "rag.yaml",
                       "sft_config": "sft.yaml", "cpt_config": "cpt.yaml", "eval_config": "eval.yaml",
                       "rl_config": "rl.yaml",
                       "retrieval": {"top_k": 2}, "max_context_tokens": 128, "shared_data": str(DATA)},
    }
    rl = configs["rl.yaml"]
    rl["model"] = {"class_path": "medadapt.rl.module.GRPOModule",
                   "init_args": {**rl["model"], "rl": {"group_size": 2, "max_new_tokens": 4, "truncation": "keep",
                                                       "validation": {"max_new_tokens": 4, "answer_budget": 0}}}}
    configs["study.yaml"].update(modes=["loglikelihood", "generate"],
                                 generate_args=["--data.init_args.generation", "{max_new_tokens: 6, answer_budget: 2}"])
    for name, cfg in configs.items():
        (tmp_path / name).write_text(yaml.safe_dump(cfg))


def run_study(tmp_path, *extra) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medadapt", "study", "--config", "study.yaml", *extra], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def snapshot(root) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "comparison" not in p.name}


@pytest.mark.slow
def test_study_end_to_end_then_reuses_everything(tiny_qwen, short_sft_file, tmp_path):
    write_configs(tmp_path, tiny_qwen, short_sft_file)
    out = run_study(tmp_path, "--push_to", "me/demo", "--push_dry_run", "pushed")
    work = tmp_path / "study"
    comparison = (work / "comparison.md").read_text()
    likelihood, generative = comparison.split("## Generative")
    assert likelihood.startswith("## Log-likelihood")  # both protocols, each labelled, each with its own tests
    for section in (likelihood, generative):
        table = section[section.index("| method |") : section.index("\nChart:")]
        assert table in out  # printed
        header = table.splitlines()[0]
        assert header.split(" | ")[1 : 1 + len(TASKS)] == sorted(TASKS)  # nine task columns (+ method, macro avg)
        for method in METHODS:
            assert sum(line.startswith(f"| {method} | ") and line.count("[") == 9 for line in table.splitlines()) == 1
    assert "unparsable replies" in generative and "unparsable" not in likelihood
    for mode in ("loglikelihood", "generate"):
        assert (work / f"comparison-{mode}.png").stat().st_size > 1000
    assert json.loads((work / "results" / "sft_rl-generate" / "results.json").read_text())["data"]["mode"] == "generate"
    for method in ("rag", "sft_rag"):
        preds = [json.loads(line) for line in open(work / "results" / method / "predictions.jsonl")]
        assert len(preds) == 18 and all(p["retrieved_ids"] for p in preds)
    sft_results = json.loads((work / "results" / "sft_rag" / "results.json").read_text())
    assert sft_results["adapter"].endswith("sft/sft/adapter")
    # RL after SFT: the RL LoRA trained with the SFT arm's adapter stacked under it, and evaluated on that stack
    rl = json.loads((work / "results" / "sft_rl" / "results.json").read_text())
    assert rl["adapter"].endswith("sft_rl/rl/adapter")
    assert [(tmp_path / a).resolve() for a in rl["model"]["base_adapters"]] == [(work / "sft" / "sft" / "adapter").resolve()]

    # CPT → SFT: the SFT stage trained a fresh LoRA on the base with the CPT adapter stacked under it, and
    # the cpt_sft arm evaluated that stack (the SFT adapter's metadata names its base adapter)
    chain = work / "cpt_sft"
    cpt_adapter = str(tmp_path / "study" / "cpt_sft" / "cpt" / "adapter")
    stage_two = yaml.safe_load((chain / "sft" / "config.yaml").read_text())["model"]["model"]
    assert stage_two["name_or_path"] == tiny_qwen and [str(tmp_path / a) for a in stage_two["base_adapters"]] == [
        cpt_adapter]
    ckpt = torch.load(chain / "sft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["medadapt"]["base"]["base_adapters"] == stage_two["base_adapters"]
    evaluated = json.loads((work / "results" / "cpt_sft" / "results.json").read_text())["model"]
    assert evaluated["base_adapters"] == stage_two["base_adapters"] and evaluated["load_in_4bit"] is True
    from medadapt.model import load_model
    from medadapt.model_config import ModelConfig

    x = torch.randint(0, 5000, (1, 16))
    nf4 = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=True, compute_dtype="float32", gradient_checkpointing=False)
    with torch.no_grad():
        cpt_only = load_model(nf4, adapter=cpt_adapter, training=False)(input_ids=x).logits
        plain = load_model(nf4, training=False)(input_ids=x).logits
    assert (cpt_only - plain).abs().max() > 1e-3  # CPT moved the model that stage 2 built on

    # --push_to: every trained arm with its card (both modes' results, the comparison) and, for stacks, its base
    from huggingface_hub import ModelCard

    pushed = tmp_path / "pushed"
    assert sorted(p.name for p in pushed.iterdir()) == ["cpt_sft", "sft", "sft_rl"]
    assert sorted(p.name for p in (pushed / "cpt_sft" / "base_adapters").iterdir()) == ["0-cpt"]
    assert sorted(p.name for p in (pushed / "sft_rl" / "base_adapters").iterdir()) == ["0-sft"]
    for arm in ("sft", "cpt_sft", "sft_rl"):
        card = ModelCard.load(pushed / arm / "README.md")
        assert card.data.model_name == f"demo-{arm.replace('_', '-')}" and "## In the study" in card.text
        for mode in ("", "-generate"):
            tasks = json.loads((work / "results" / f"{arm}{mode}" / "results.json").read_text())["tasks"]
            got = {r.dataset_name: r.metric_value for r in card.data.eval_results
                   if r.metric_name.startswith(f"acc ({arm}{mode}:")}
            assert got == {task: m["acc"] for task, m in tasks.items()}

    before = snapshot(tmp_path)
    again = run_study(tmp_path)
    assert generative[generative.index("| method |") : generative.index("\nChart:")] in again
    assert snapshot(tmp_path) == before  # wrote nothing: no embedding, no training, no evaluation
