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
    assert list(report["steps"]) == ["build", "qlora", "fit", "fit_fp16", "test", "generate"]
    assert all(step["ok"] for step in report["steps"].values())
    arms = report["steps"]["qlora"]["seqs"]["128"]
    assert {"baseline", "previous", "medadapt-sdpa"} <= set(arms) and all(a["tokens_per_s"] > 0 for a in arms.values())
    fit = report["steps"]["fit"]["losses"]
    assert fit[-1] < fit[0]  # falling on the repeated batch
    assert report["steps"]["test"]["items"] == 18 and report["steps"]["test"]["loaded_in_4bit"] is True
    assert "## QLoRA SFT step, seq 128" in (tmp_path / "out" / "gpu_check.md").read_text()
