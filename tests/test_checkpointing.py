"""``gradient_checkpointing: auto``: measured, decided from free memory, and never a change to the math."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch

import medadapt.checkpointing as checkpointing
from medadapt.data.packing import collate

from .conftest import assert_close_to_scale, connect, random_examples, tiny_data, tiny_module, tiny_trainer
from .test_attention import holder
from .test_module import Recording


def one_step(model_path, data_file, root, setting, free=None, monkeypatch=None):
    """One optimizer step (2 micro-batches, LoRA dropout on) with ``gradient_checkpointing: setting``; with
    ``free`` the device reports that many bytes free."""
    if free is not None:
        monkeypatch.setattr(checkpointing, "free_bytes", lambda device: free)
    L.seed_everything(0)
    module = tiny_module(model_path, dropout=0.1, cls=Recording)
    module.model_cfg = dataclasses.replace(module.model_cfg, gradient_checkpointing=setting)
    data = tiny_data(data_file, batch_size=2, val_fraction=0.0)
    tiny_trainer(root, max_steps=1, accumulate_grad_batches=2).fit(module, connect(data, module))
    return module


@pytest.mark.slow  # out of the 5-minute fast set; CI runs it
def test_auto_measures_activations_and_decides_by_free_memory(tiny_qwen, short_sft_file, tmp_path, monkeypatch):
    plenty = one_step(tiny_qwen, short_sft_file, tmp_path / "a", "auto", free=2**40, monkeypatch=monkeypatch)
    assert not plenty.model.get_base_model().is_gradient_checkpointing
    scarce = one_step(tiny_qwen, short_sft_file, tmp_path / "b", "auto", free=2**20, monkeypatch=monkeypatch)
    assert scarce.model.get_base_model().is_gradient_checkpointing
    off = one_step(tiny_qwen, short_sft_file, tmp_path / "c", False)
    on = one_step(tiny_qwen, short_sft_file, tmp_path / "d", True)
    assert on.model.get_base_model().is_gradient_checkpointing and not off.model.get_base_model().is_gradient_checkpointing
    # the same loss and gradients whatever was decided (the probe draws no dropout mask the run would have drawn)
    for other in (scarce, off, on):
        assert other.losses[0] == pytest.approx(plenty.losses[0], rel=1e-6)
        assert other.grads[0].keys() == plenty.grads[0].keys() and plenty.grads[0]
        for name, g in plenty.grads[0].items():
            assert_close_to_scale(other.grads[0][name], g, msg=name)


def test_the_probe_counts_what_backward_keeps(tiny_qwen):
    """Per-token bytes are of the order of the layers' saved activations (a few hidden-size vectors per layer per
    token), exclude the weights, and keep checkpointing off only while measuring."""
    from medadapt.model import load_model
    from medadapt.model_config import LoraConfig, ModelConfig

    model = load_model(ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32",
                                   gradient_checkpointing="auto"), LoraConfig(r=8, alpha=16), training=True)
    batch = collate([random_examples(6, seed=3)], pad_id=0)
    per_token = checkpointing.activation_bytes_per_token(model, batch, holder(model))
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert 4 * hidden * layers < per_token < 200 * hidden * 4 * layers
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert per_token * batch["input_ids"].numel() < weights  # the embedding and head weights are not counted
    on, figures = checkpointing.decide(model, batch, holder(model), 10**6, torch.device("cpu"))
    assert figures["activations_gib"] == pytest.approx(per_token * 10**6 / 2**30, rel=1e-6)
