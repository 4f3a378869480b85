"""The command line: every shipped YAML parses against the code; a real `fit` runs under DDP and alone."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from .cli_parse import parse_fit
from .conftest import DATA, REPO, assert_close_to_scale

SHARED_BENCH = DATA / "benchmarks"

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
RAG_CONFIGS = [c for c in CONFIGS if c.name == "rag.yaml"]  # index/ask configs, not Trainer runs
MULTISTEP_CONFIGS = [c for c in CONFIGS if c.name.startswith("multistep")]  # chains of fit configs
STUDY_CONFIGS = [c for c in CONFIGS if c.name == "study.yaml"]  # the whole comparison
TRAINER_CONFIGS = [c for c in CONFIGS if c not in RAG_CONFIGS + MULTISTEP_CONFIGS + STUDY_CONFIGS]


@pytest.mark.parametrize("config", RAG_CONFIGS, ids=[str(c.relative_to(REPO)) for c in RAG_CONFIGS])
def test_every_rag_config_parses(config, monkeypatch):
    from medadapt.commands.rag import build_parser

    monkeypatch.chdir(REPO)
    parser = build_parser("ask")
    cfg = parser.parse_args(["--config", str(config), "a question"])
    init = parser.instantiate_classes(cfg)
    assert init.index.dir and init.retrieval.top_k > 0 and init.model.name_or_path
    if "demo" in config.parts:  # the offline demo must point at data that exists
        assert Path(init.corpus.data_files).exists(), init.corpus.data_files


@pytest.mark.parametrize("config", MULTISTEP_CONFIGS, ids=[str(c.relative_to(REPO)) for c in MULTISTEP_CONFIGS])
def test_every_multistep_config_names_fit_configs_that_exist(config, monkeypatch):
    from medadapt.commands.multistep import build_parser

    monkeypatch.chdir(REPO)
    p = build_parser()
    stages = p.instantiate_classes(p.parse_args(["--config", str(config)])).stages
    chain = ["sft", "rl"] if config.name == "multistep_rl.yaml" else ["cpt", "sft"]
    assert [s.name for s in stages] == chain and stages[1].from_previous and not stages[0].from_previous
    assert all((REPO / s.config) in TRAINER_CONFIGS for s in stages)
    assert ("demo" in config.parts) == all("demo" in Path(s.config).parts for s in stages)


@pytest.mark.parametrize("config", STUDY_CONFIGS, ids=[str(c.relative_to(REPO)) for c in STUDY_CONFIGS])
def test_every_study_config_points_at_shipped_configs(config, monkeypatch):
    from medadapt.commands.study import DEFAULT_METHODS, build_parser

    monkeypatch.chdir(REPO)
    p = build_parser()
    a = p.instantiate_classes(p.parse_args(["--config", str(config)]))
    assert a.methods == DEFAULT_METHODS and a.baseline == "base"
    assert (REPO / a.index_config) in RAG_CONFIGS
    assert {REPO / a.sft_config, REPO / a.cpt_config, REPO / a.eval_config} <= set(TRAINER_CONFIGS)
    assert ("demo" in config.parts) == all("demo" in Path(c).parts for c in (a.index_config, a.sft_config,
                                                                             a.cpt_config, a.eval_config))


@pytest.mark.parametrize("config", TRAINER_CONFIGS, ids=[str(c.relative_to(REPO)) for c in TRAINER_CONFIGS])
def test_every_shipped_config_parses(config, monkeypatch):
    monkeypatch.chdir(REPO)
    fit = parse_fit(["--config", str(config)])
    data, model = fit["data"], fit["model"]
    assert data["class_path"].startswith("medadapt.")
    rl = data["class_path"] == "medadapt.rl.data.VerifiableQADataModule"
    assert model["class_path"] == ("medadapt.rl.module.GRPOModule" if rl else "medadapt.module.CausalLMModule")
    for key in ("data_files", "local_dir"):  # a shipped demo must point at data that exists
        if data["init_args"].get(key):
            assert Path(data["init_args"][key]).exists(), data["init_args"][key]
    if rl:  # the module steps its optimizer itself: Lightning's clipping and accumulation are refused
        assert not fit["trainer"].get("gradient_clip_val")
        assert fit["trainer"].get("accumulate_grad_batches") in (None, 1)


def test_the_rl_config_runs_a_published_scale_step():
    """configs/rl.yaml: at least 32 questions x 8 completions a step (DeepScaleR: 128 x 8), every setting that makes
    the scored distribution the sampled one, and per-source quotas."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "rl.yaml").read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert data["batch_size"] * model["rl"]["group_size"] >= 32 * 8 and model["rl"]["micro_batch_size"] <= 16
    assert model["lora"]["dropout"] == 0 and model["rl"]["top_k"] == 0 and model["rl"]["temperature"] == 0.6
    assert set(data["quotas"]) == {s["name"] for s in data["sources"]} | {"pubmedqa_pqal"}
    assert sum(data["quotas"].values()) == pytest.approx(1.0)


def test_seed_recipe_values_survive_packing():
    """configs/sft.yaml is the seed recipe: its values, and with packing the seed's examples per optimizer step
    (2 x 4 = 8) and warmup share (300 of 2,375 steps = 12.6%), measured on the shared o1 sample."""
    import math

    import yaml

    from medadapt.data.reasoning import ReasoningSFTDataModule
    from medadapt.optim import OptimConfig, resolve_warmup

    from .conftest import R1_TOKENIZER, SFT_SAMPLE

    cfg = yaml.safe_load((REPO / "configs" / "sft.yaml").read_text())
    model, data, trainer = cfg["model"], cfg["data"]["init_args"], cfg["trainer"]
    assert model["model"]["name_or_path"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert model["model"]["load_in_4bit"] and model["model"]["quant_type"] == "nf4" and model["model"]["double_quant"]
    assert (model["lora"]["r"], model["lora"]["alpha"], model["lora"]["dropout"]) == (16, 32, 0.05)
    assert (model["optim"]["lr"], model["optim"]["weight_decay"]) == (1e-4, 0.01)
    assert (data["max_rows"], data["subset"], data["val_fraction"]) == (20000, "en", 0.05)
    assert (trainer["max_epochs"], cfg["seed_everything"]) == (1, 4242)

    dm = ReasoningSFTDataModule(**{**data, "dataset": "unused", "data_files": str(SFT_SAMPLE), "max_rows": None,
                                   "tokenizer": str(R1_TOKENIZER), "num_workers": 0})
    dm.setup("fit")
    examples_per_row = sum(len(row) for row in dm.train_rows.rows) / len(dm.train_rows)
    examples_per_step = examples_per_row * data["batch_size"] * trainer["accumulate_grad_batches"]
    assert examples_per_step == pytest.approx(8, abs=1)
    # the full run: 19,000 training rows at the sample's packing density
    steps = math.ceil(19000 / examples_per_step)
    share = resolve_warmup(OptimConfig(**model["optim"]), steps) / steps
    assert share == pytest.approx(300 / 2375, abs=0.01)
    assert steps == pytest.approx(2375, rel=0.1)


def fit_metrics(tmp_path: Path, model_path: str, data_file: str, devices: int, batch_size: int) -> list[dict]:
    out = tmp_path / f"run{devices}"
    args = [
        sys.executable, "-m", "medadapt", "fit",
        "--model.model.name_or_path", model_path, "--model.model.load_in_4bit", "true",
        "--model.model.compute_dtype", "float32",
        "--model.lora", json.dumps({"r": 8, "alpha": 16, "dropout": 0.0}),
        "--model.optim.warmup_steps", "0", "--model.optim.fused", "false",
        "--model.adapter_dir", str(out / "adapter"),
        "--data", "medadapt.data.reasoning.ReasoningSFTDataModule",
        "--data.data_files", data_file, "--data.max_length", "256", "--data.val_fraction", "0",
        "--data.batch_size", str(batch_size),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--trainer.max_steps", "3", "--trainer.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    return [r for r in rows if r.get("train/loss")]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tiny_qwen, short_sft_file, tmp_path):
    one = fit_metrics(tmp_path, tiny_qwen, short_sft_file, devices=1, batch_size=2)
    two = fit_metrics(tmp_path, tiny_qwen, short_sft_file, devices=2, batch_size=1)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert float(b["train/loss"]) == pytest.approx(float(a["train/loss"]), rel=1e-5)
        assert float(b["train/grad_norm"]) == pytest.approx(float(a["train/grad_norm"]), rel=1e-4)


@pytest.mark.slow
def test_ddp_test_stage_scores_each_item_once_with_the_same_metrics(tiny_qwen, tmp_path):
    def run(devices: int) -> dict:
        out = tmp_path / f"eval{devices}"
        args = [sys.executable, "-m", "medadapt", "test",
                "--model.model.name_or_path", tiny_qwen, "--model.model.load_in_4bit", "false",
                "--model.model.compute_dtype", "float32", "--model.model.gradient_checkpointing", "false",
                "--model.lora", "null", "--model.results_dir", str(out),
                "--data", "medadapt.eval.data.BenchmarkDataModule",
                "--data.local_dir", str(SHARED_BENCH), "--data.tasks", '["pubmedqa", "mmlu_anatomy"]',
                "--data.limit", "5", "--data.batch_size", "2",  # 10 items over 2 ranks × batch 2: uneven
                "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        preds = [json.loads(line) for line in open(out / "predictions.jsonl")]
        assert len(preds) == 10 and len({(p["task"], p["id"]) for p in preds}) == 10
        return json.loads((out / "results.json").read_text()), preds

    (one, p1), (two, p2) = run(1), run(2)
    assert one["tasks"].keys() == two["tasks"].keys()
    for task in one["tasks"]:
        assert two["tasks"][task]["acc"] == one["tasks"][task]["acc"]
        assert two["tasks"][task]["n"] == one["tasks"][task]["n"] == 5
    for a, b in zip(p1, p2):
        assert (a["task"], a["id"], a["pred"]) == (b["task"], b["id"], b["pred"])
        assert_close_to_scale(torch.tensor(b["loglikelihoods"]), torch.tensor(a["loglikelihoods"]))


def test_one_table_lists_every_command_and_each_documents_its_keys(capsys):
    from medadapt.cli import COMMANDS, main

    main(["--help"])
    listing = capsys.readouterr().out
    assert listing.startswith("usage: python -m medadapt COMMAND")
    for name in ["fit", "validate", "test", "index", "ask", "multistep", "study", "export", "compare", "decontaminate"]:
        assert f"\n  {name} " in listing and name in COMMANDS
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        text = capsys.readouterr().out
        assert done.value.code == 0 and f"python -m medadapt {name}" in text.replace("\n", " ") or \
            (name in ("fit", "validate", "test") and "python -m medadapt" in text), name
        assert "--config" in text and "--print_config" in text, name


def test_commands_that_do_not_train_start_without_lightning():
    """Importing Lightning takes ~6 s (torchmetrics, scipy, dynamo): only fit/validate/test pay it. The command
    table, the other commands' ``--help`` and the study and multistep runners (a process per stage, each of which
    imports what it needs) start without it. One fresh process runs them in turn, ``test --help`` last to show
    the check sees Lightning when it is there."""
    from medadapt.cli import COMMANDS

    runs = [["--help"], *[[name, "--help"] for name, (target, _) in COMMANDS.items() if target != "lightning"],
            ["test", "--help"]]
    code = ("import json, sys\nfrom medadapt.cli import main\nseen = []\n"
            f"for argv in {runs!r}:\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "    seen.append('lightning' in sys.modules)\n"
            "print(json.dumps(seen))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert dict(zip(map(tuple, runs), seen)) == {tuple(argv): argv[0] == "test" for argv in runs}


def test_print_config_round_trips_for_a_non_lightning_command(tmp_path, capsys):
    from medadapt.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--base", "b", "--out", "o", "--trained_in_4bit", "false", "--print_config"])
    printed = capsys.readouterr().out
    assert "trained_in_4bit: false" in printed and "base: b" in printed
    (tmp_path / "export.yaml").write_text(printed)
    from medadapt.commands.export import build_parser

    args = build_parser().parse_args(["--config", str(tmp_path / "export.yaml")])
    assert args.trained_in_4bit is False and args.out == "o"
