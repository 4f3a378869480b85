"""What the test stage loads: the weights an adapter or checkpoint was trained on, and nothing else.

A QLoRA adapter scored on full-precision weights is >10x further off than on the nf4 base it was trained on,
so the quantization follows the adapter's metadata (or the checkpoint's) unless a config sets it, and
results.json records what was used. Explicit settings win over a checkpoint's; a checkpoint or adapter that
does not fit the configured base or LoRA shape is an error, never a silent switch.
"""

from __future__ import annotations

import json

import pytest

from medadapt.cli import main as cli

from .conftest import DATA


@pytest.fixture(scope="module")
def trained(tiny_qwen, short_sft_file, tmp_path_factory):
    """One 4-bit fit through the CLI: its checkpoint folder (last.ckpt) and exported adapter."""
    root = tmp_path_factory.mktemp("fit")
    cli(["fit", "--model.model.name_or_path", tiny_qwen, "--model.model.load_in_4bit", "true",
         "--model.model.compute_dtype", "float32", "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}),
         "--model.optim.lr", "0.05", "--model.optim.warmup_steps", "0", "--model.optim.fused", "false",
         "--data", "medadapt.data.reasoning.ReasoningSFTDataModule", "--data.data_files", short_sft_file,
         "--data.max_length", "256", "--data.val_fraction", "0", "--data.batch_size", "2",
         "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
         "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                             "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}])])
    return {"adapter": root / "ckpt" / "adapter", "ckpt": root / "ckpt" / "last.ckpt", "base": tiny_qwen}


def evaluate(trained, out, *extra) -> dict:
    cli(["test", "--model.model.name_or_path", trained["base"], "--model.model.compute_dtype", "float32",
         "--model.model.gradient_checkpointing", "false", "--model.lora", "null", "--model.results_dir", str(out),
         "--data", "medadapt.data.benchmarks.BenchmarkDataModule", "--data.local_dir", str(DATA / "benchmarks"),
         "--data.tasks", '["pubmedqa"]', "--data.limit", "2", "--trainer.accelerator", "cpu",
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra])
    return json.loads((out / "results.json").read_text())




def test_adapter_metadata_records_what_it_was_trained_on(trained):
    meta = json.loads((trained["adapter"] / "medadapt_adapter.json").read_text())
    assert meta["base"]["load_in_4bit"] is True and meta["base"]["quant_type"] == "nf4"
    assert meta["base"]["name_or_path"] == trained["base"] and meta["base"]["base_adapters"] == []
    assert meta["lora"]["r"] == 4


@pytest.mark.parametrize("source", ["adapter", "ckpt"])
def test_the_test_stage_loads_the_quantization_it_was_trained_with(trained, tmp_path, source):
    arg = ["--model.init_adapter", str(trained["adapter"])] if source == "adapter" else \
        ["--ckpt_path", str(trained["ckpt"])]
    auto = evaluate(trained, tmp_path / "auto", *arg)
    assert auto["model"]["load_in_4bit"] is True and auto["model"]["quant_type"] == "nf4"
    forced = evaluate(trained, tmp_path / "forced", *arg, "--model.model.load_in_4bit", "false")
    assert forced["model"]["load_in_4bit"] is False  # an explicit setting wins, and is what results.json says
    if source == "ckpt":
        assert auto["lora"]["r"] == 4  # the checkpoint's LoRA shape, with --model.lora null
    base = evaluate(trained, tmp_path / "base")
    assert base["model"]["load_in_4bit"] is False and base["adapter"] is None
    preds = [[json.loads(line)["loglikelihoods"] for line in open(tmp_path / d / "predictions.jsonl")]
             for d in ("auto", "forced")]
    assert preds[0] != preds[1]  # the two loads really scored different weights
