"""The prepared GPU check runs end to end (on CPU with --tiny): every step, every figure, one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_gpu_check_runs_every_step_with_tiny_models(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["build", "fit_speed", "test", "generate", "rl_step"]
    assert report["steps"]["rl_step"]["generation_s"] > 0 and report["steps"]["rl_step"]["update_s"] > 0
    assert all(step["ok"] for step in report["steps"].values())
    speed = json.loads((tmp_path / "out" / "fit_speed.json").read_text())
    arms = speed["arms"]
    assert list(arms)[:2] == ["seed-trainer", "sft.yaml"]  # the main arms first: a budget never cuts them
    assert {"issue-19", "ckpt-4096", "sdpa", "varlen", "all"} <= set(arms)
    assert all(a["tokens_per_s"] > 0 and a["losses"] and "allocated_at_start_gib" in a for a in arms.values())
    # every medadapt arm starts from the same weights on the same rows: the same first loss (fp32 here)
    first = arms["sft.yaml"]["losses"][0]
    assert all(abs(a["losses"][0] - first) <= 1e-4 * abs(first) for n, a in arms.items()
               if n not in ("seed-trainer", "ckpt-4096"))
    assert arms["ckpt-4096"]["checkpointing"] is True
    assert not (tmp_path / "out" / "model").exists()  # the model is built outside $OUT
    assert arms["varlen"]["attention"] == "medadapt_varlen" and arms["varlen"]["packed_max_rel"] < 1e-5
    assert arms["all"]["micro_batch_rows"] == 3 and arms["all"]["checkpointing"] is False
    assert arms["sdpa"]["accumulation"] == 3
    assert report["steps"]["test"]["items"] == 18 and report["steps"]["test"]["loaded_in_4bit"] is True
    assert report["steps"]["test"]["items_per_s"] > 0 and report["steps"]["generate"]["generated_tokens"] > 0
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## SFT step as `fit` runs it" in md and "| seed-trainer |" in md
