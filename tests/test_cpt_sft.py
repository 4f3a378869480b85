"""CPT→SFT keeps its CPT update: stage 2 trains, and the `cpt_sft` arm evaluates, base + ΔW_cpt + ΔW_sft.

The weights are read off each layer's own forward pass (``medadapt.weights``), so the test sees what
the model computes, whatever composes it. Merging the CPT adapter and re-quantizing the result (the first
design) kept ~1% of a CPT update of relative size 1%; these tests require ≥ 95%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medadapt.commands import multistep
from medadapt.merge import export
from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig
from medadapt.module import CausalLMModule
from medadapt.provenance import write_adapter_metadata

from medadapt.weights import kept_share, projection_weights, relative_size, write_scaled_adapter

from .conftest import REPO, assert_close_to_scale

RHO = 0.01  # ‖ΔW_cpt‖ / ‖W‖ per projection: the size of a real CPT update


def stage_two_module(tmp_path, base: str, cpt_adapter: str) -> CausalLMModule:
    """The module of the SFT stage exactly as the multi-step runner configures it after a CPT stage."""
    import yaml

    sft = yaml.safe_load((REPO / "configs" / "demo" / "sft.yaml").read_text())
    sft["model"]["model"]["name_or_path"] = base
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    previous = {"model": {"model": {"name_or_path": base}}, "run_dir": str(Path(cpt_adapter).parent)}
    cfg = multistep.stage_config(multistep.Stage("sft", str(tmp_path / "sft.yaml")), tmp_path / "sft", previous)
    model = cfg["model"]
    assert model["model"]["base_adapters"] == [cpt_adapter]
    module = CausalLMModule(model=ModelConfig(**{**model["model"], "compute_dtype": "float32"}),
                            lora=LoraConfig(**model["lora"]))
    module.build_model(training=True)
    return module


@pytest.mark.parametrize("which", ["tiny_qwen", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_stage_two_and_the_evaluated_model_keep_the_cpt_update(which, request, tmp_path):
    base = request.getfixturevalue("tiny_qwen") if which == "tiny_qwen" else "smollm2-135m-instruct"
    nf4 = ModelConfig(name_or_path=base, load_in_4bit=True, compute_dtype="float32", gradient_checkpointing=False)
    cpt_dir = tmp_path / "cpt" / "adapter"
    write_scaled_adapter(nf4, cpt_dir, RHO)
    plain = projection_weights(load_model(nf4, training=False))
    cpt = projection_weights(load_model(nf4, adapter=str(cpt_dir), training=False))  # the CPT stage's own model
    assert relative_size(cpt, plain) == pytest.approx(RHO, rel=0.05)

    # the model stage 2 trains: the SFT LoRA starts at zero, so it is the stage-2 base
    module = stage_two_module(tmp_path, base, str(cpt_dir))
    module.model.eval()
    stage_two = projection_weights(module.model)
    assert kept_share(stage_two, plain, cpt) >= 0.95
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # only the fresh SFT LoRA trains

    # "train" the SFT adapter, export it as fit does, and evaluate it as the cpt_sft arm does
    torch.manual_seed(1)
    for name, p in module.model.named_parameters():
        if "lora_B.default" in name:
            p.data.normal_(0, 0.02)
    module.model.save_pretrained(tmp_path / "sft-adapter", selected_adapters=["default"])
    write_adapter_metadata(str(tmp_path / "sft-adapter"), module.resolved_model_cfg, module.lora_used)
    trained = projection_weights(module.model)
    evaluated = CausalLMModule(model=ModelConfig(name_or_path=base, compute_dtype="float32",
                                                 gradient_checkpointing=False),
                               lora=None, init_adapter=str(tmp_path / "sft-adapter"))
    evaluated.build_model(training=False)
    assert evaluated.resolved_model_cfg.load_in_4bit and evaluated.resolved_model_cfg.base_adapters == [str(cpt_dir)]
    scored = projection_weights(evaluated.model)
    # what is scored is what stage 2 trained: base + ΔW_cpt + ΔW_sft, to far below ‖ΔW_cpt‖
    residual = max(float((scored[k] - trained[k]).norm()) for k in scored)
    assert residual < 1e-3 * min(float((cpt[k] - plain[k]).norm()) for k in plain)

    # export: one merged folder computing what was evaluated
    out = export(ModelConfig(name_or_path=base, compute_dtype="float32"), str(tmp_path / "sft-adapter"),
                 str(tmp_path / "merged"), dtype="float32")
    assert json.loads((out / "medadapt_export.json").read_text())["base"]["base_adapters"] == [str(cpt_dir)]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 5000, (2, 24))
    with torch.no_grad():
        assert_close_to_scale(merged(input_ids=x).logits, evaluated.model(input_ids=x).logits)


def run_chain(tmp_path, monkeypatch, name: str, cpt_lr: float, model: str, sft_file: str) -> dict:
    """A real CPT → SFT chain through the multi-step runner (fits in-process); the SFT stage runs one step at
    lr 0, so its exported adapter and model are the stage-2 start."""
    import yaml

    from medadapt.cli import main as cli_main

    from .conftest import DATA

    def fit_config(data: dict, lr: float) -> dict:
        return {"seed_everything": 7,
                "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
                            "num_sanity_val_steps": 0, "limit_val_batches": 0, "enable_progress_bar": False},
                "model": {"model": {"name_or_path": model, "load_in_4bit": True, "compute_dtype": "float32"},
                          "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                          "optim": {"lr": lr, "warmup_steps": 0, "fused": False}},
                "data": data}

    cpt = fit_config({"class_path": "medadapt.data.textbooks.TextbooksDataModule", "init_args": {
        "data_files": str(DATA / "corpus" / "textbooks_sample.json"), "block_size": 128, "max_docs": 8,
        "val_fraction": 0.0, "batch_size": 2}}, cpt_lr)
    sft = fit_config({"class_path": "medadapt.data.reasoning.ReasoningSFTDataModule", "init_args": {
        "data_files": sft_file, "max_length": 256, "val_fraction": 0.0, "batch_size": 2}}, 0.0)
    sft["trainer"]["max_steps"] = 1
    (tmp_path / "cpt.yaml").write_text(yaml.safe_dump(cpt))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    monkeypatch.setattr(multistep, "launch", lambda args, log_file=None: cli_main(args))
    stages = [multistep.Stage("sft", str(tmp_path / "sft.yaml"))]
    if cpt_lr is not None:
        stages = [multistep.Stage("cpt", str(tmp_path / "cpt.yaml")),
                  multistep.Stage("sft", str(tmp_path / "sft.yaml"), from_previous=True)]
    return {s["stage"]: s["adapter"] for s in multistep.run(stages, str(tmp_path / name))}


@pytest.mark.slow
def test_zero_lr_cpt_starts_stage_two_as_plain_sft_and_real_cpt_does_not(tiny_qwen, short_sft_file, tmp_path,
                                                                           monkeypatch):
    from safetensors.torch import load_file

    def start(adapters: dict):
        module = CausalLMModule(model=ModelConfig(name_or_path=tiny_qwen, compute_dtype="float32"), lora=None,
                                init_adapter=adapters["sft"])
        module.build_model(training=False)
        with torch.no_grad():
            logits = module.model(input_ids=x).logits
        return load_file(f"{adapters['sft']}/adapter_model.safetensors"), logits

    x = torch.randint(0, 5000, (2, 16))
    plain_lora, plain = start(run_chain(tmp_path, monkeypatch, "plain", None, tiny_qwen, short_sft_file))
    zero_lora, zero = start(run_chain(tmp_path, monkeypatch, "zero", 0.0, tiny_qwen, short_sft_file))
    real = run_chain(tmp_path, monkeypatch, "real", 1e-2, tiny_qwen, short_sft_file)
    _, real_start = start(real)

    assert zero_lora.keys() == plain_lora.keys()
    assert all(torch.equal(zero_lora[k], plain_lora[k]) for k in plain_lora)  # the same fresh SFT LoRA
    assert torch.equal(zero, plain)
    # a real CPT stage: stage 2 starts from nf4 base + the CPT adapter, exactly
    nf4 = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=True, compute_dtype="float32")
    with torch.no_grad():
        cpt_model = load_model(nf4, adapter=real["cpt"], training=False)(input_ids=x).logits
    assert (cpt_model - plain).abs().max() > 1e-3  # CPT moved the model
    assert_close_to_scale(real_start, cpt_model)
