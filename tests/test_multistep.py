"""CPT → SFT in one command: stage 2 trains on stage 1's merged weights; a finished chain is not re-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import yaml

from .conftest import DATA, REPO
from .test_export import logits


def fit_config(model: str, data: dict, name: str) -> dict:
    return {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0, "limit_val_batches": 1, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "lightning_logs", "name": name}}},
        "model": {"model": {"name_or_path": model, "load_in_4bit": True, "compute_dtype": "float32"},
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                  "optim": {"lr": 5e-2, "warmup_steps": 0, "fused": False}},
        "data": data,
    }


def run_chain(tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medadapt", "multistep", "--config", "chain.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def snapshot(root) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_chain_trains_stage_two_on_stage_one_weights_and_skips_when_done(tiny_qwen, short_sft_file, tmp_path):
    cpt = fit_config(tiny_qwen, {"class_path": "medadapt.data.textbooks.TextbooksDataModule", "init_args": {
        "data_files": str(DATA / "corpus" / "textbooks_sample.json"), "block_size": 128, "max_docs": 12,
        "val_fraction": 0.1, "batch_size": 2}}, "cpt")
    sft = fit_config(tiny_qwen, {"class_path": "medadapt.data.reasoning.ReasoningSFTDataModule", "init_args": {
        "data_files": short_sft_file, "max_length": 256, "val_fraction": 0.125, "batch_size": 2}}, "sft")
    (tmp_path / "cpt.yaml").write_text(yaml.safe_dump(cpt))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump({"work_dir": "work", "stages": [
        {"name": "cpt", "config": "cpt.yaml"}, {"name": "sft", "config": "sft.yaml", "from_previous": True}]}))

    first = run_chain(tmp_path)
    assert "cpt: trained" in first.stdout and "sft: trained" in first.stdout
    work = tmp_path / "work"
    merged = work / "cpt-merged"
    merged_name = "work/cpt-merged"  # paths in configs stay relative to where the command runs
    # the SFT stage ran on the merged folder (its own config, its checkpoint's hparams, its adapter's base)
    assert yaml.safe_load((work / "sft" / "config.yaml").read_text())["model"]["model"]["name_or_path"] == merged_name
    ckpt = torch.load(work / "sft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["name_or_path"] == merged_name
    assert json.loads((work / "sft" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == merged_name
    # ... and that folder holds stage 1's result: nf4 base + CPT adapter, merged
    from peft import PeftModel

    from medadapt.model import ModelConfig, load_model

    base = load_model(ModelConfig(name_or_path=tiny_qwen, load_in_4bit=True, compute_dtype="float32",
                                  gradient_checkpointing=False), None, training=False)
    stage_one = PeftModel.from_pretrained(base, str(work / "cpt" / "adapter")).eval()
    x = torch.randint(0, 5000, (1, 16))
    with torch.no_grad():
        expected = stage_one(input_ids=x).logits
    assert (logits(str(merged), x) - expected).abs().max() < 1e-5
    assert (logits(str(merged), x) - logits(tiny_qwen, x, load_in_4bit=True)).abs().max() > 1e-3  # CPT moved it
    # each stage has its own TensorBoard run
    assert (tmp_path / "lightning_logs" / "multistep-cpt").is_dir()
    assert (tmp_path / "lightning_logs" / "multistep-sft").is_dir()

    before = snapshot(tmp_path / "work") | snapshot(tmp_path / "lightning_logs")
    second = run_chain(tmp_path)
    assert "cpt: skipped" in second.stdout and "sft: skipped" in second.stdout
    assert snapshot(tmp_path / "work") | snapshot(tmp_path / "lightning_logs") == before  # nothing trained or written


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    from medadapt import multistep

    stage = multistep.Stage(name="cpt", config="unused.yaml", args=["--trainer.max_steps", "9"])
    stage_dir = tmp_path / "cpt"
    (stage_dir / "checkpoints").mkdir(parents=True)
    (stage_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    seen = []
    monkeypatch.setattr(multistep.subprocess, "run", lambda cmd, **kw: seen.append(cmd))
    multistep.run_stage(stage, stage_dir, {"trainer": {}})
    assert seen[0][-4:] == ["--trainer.max_steps", "9", "--ckpt_path", str(stage_dir / "checkpoints" / "last.ckpt")]
    cfg = multistep.stage_config(multistep.Stage("sft", str(REPO / "configs" / "sft.yaml")), stage_dir, "merged")
    checkpoints = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert len(checkpoints) == 1 and checkpoints[0]["init_args"]["dirpath"] == str(stage_dir / "checkpoints")
    assert cfg["model"]["model"]["name_or_path"] == "merged" and cfg["model"]["adapter_dir"] == str(stage_dir / "adapter")
    assert cfg["trainer"]["logger"]["init_args"]["name"] == "multistep-sft"
