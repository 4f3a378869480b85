"""Merging an adapter: the merged model computes what base + adapter computed, and stands alone."""

from __future__ import annotations

import json

import pytest
import torch

from medadapt.commands.export import main as export_main
from medadapt.merge import export
from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig

from .conftest import assert_close_to_scale


def trained_adapter(base: str, path, load_in_4bit: bool) -> tuple[ModelConfig, torch.Tensor, torch.Tensor]:
    """A LoRA with non-zero B (as after training), saved; returns its config, an input and its logits."""
    cfg = ModelConfig(name_or_path=base, load_in_4bit=load_in_4bit, compute_dtype="float32",
                      gradient_checkpointing=False, base_adapters=[])  # saved by PEFT alone: no medadapt record
    model = load_model(cfg, LoraConfig(r=8, alpha=16, dropout=0.0), training=False)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(path)
    x = torch.randint(0, 5000, (2, 24))
    with torch.no_grad():
        return cfg, x, model(input_ids=x).logits


def logits(model_dir: str, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def test_merged_export_equals_base_plus_adapter(tiny_qwen, tmp_path):
    cfg, x, before = trained_adapter(tiny_qwen, tmp_path / "adapter", load_in_4bit=False)
    export_main(["--base", tiny_qwen, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
                 "--trained_in_4bit", "false", "--dtype", "float32"])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "merged" / "tokenizer.json").exists()
    after = logits(str(tmp_path / "merged"), x)  # plain transformers, no peft
    assert_close_to_scale(after, before)
    assert (after - logits(tiny_qwen, x)).abs().max() > 1e-3  # the adapter changed something


def test_nf4_adapter_merges_into_the_dequantized_weights_it_was_trained_on(tiny_qwen, tmp_path):
    """Merged (dequantized, fp32) vs base-nf4 + adapter ≤ 1e-5 in logits. (Re-quantizing the merged folder is
    not a way to train on it: see tests/test_cpt_sft.py.)"""
    cfg, x, before = trained_adapter(tiny_qwen, tmp_path / "adapter", load_in_4bit=True)
    export(cfg, str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype="float32")
    merged = logits(str(tmp_path / "merged"), x)
    assert_close_to_scale(merged, before)
    # merging into the original full-precision weights instead would ignore what nf4 did to them
    naive = tmp_path / "naive"
    export(ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", base_adapters=[]),
           str(tmp_path / "adapter"), str(naive), dtype="float32")
    assert (logits(str(naive), x) - before).abs().max() > 10 * (merged - before).abs().max()


def test_export_without_adapter_copies_the_base(tiny_qwen, tmp_path):
    out = export(ModelConfig(name_or_path=tiny_qwen), None, str(tmp_path / "base"), dtype="float32")
    x = torch.randint(0, 5000, (1, 8))
    assert torch.equal(logits(str(out), x), logits(tiny_qwen, x))


def test_missing_adapter_is_a_clear_error(tiny_qwen, tmp_path):
    with pytest.raises(FileNotFoundError, match="no PEFT adapter at .*nowhere"):
        export(ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32"),
               str(tmp_path / "nowhere"), str(tmp_path / "out"), dtype="float32")
