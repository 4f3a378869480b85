"""What the test stage loads: the weights an adapter or checkpoint was trained on, and nothing else.

A QLoRA adapter scored on full-precision weights is >10x further off than on the nf4 base it was trained on,
so the quantization follows the adapter's metadata (or the checkpoint's) unless a config sets it, and
results.json records what was used. Explicit settings win over a checkpoint's; a checkpoint or adapter that
does not fit the configured base or LoRA shape is an error, never a silent switch.
"""

from __future__ import annotations

import json

import pytest

from .conftest import evaluate


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
