"""The multi-step runner's own logic. The CPT → SFT composition is tested in tests/test_cpt_sft.py and the
whole chain end to end in tests/test_study.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medadapt.commands import multistep

from .conftest import REPO


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    stage = multistep.Stage(name="cpt", config="unused.yaml", args=["--trainer.max_steps", "9"])
    stage_dir = tmp_path / "cpt"
    (stage_dir / "checkpoints").mkdir(parents=True)
    (stage_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    seen = []
    monkeypatch.setattr(multistep, "launch", lambda args, log_file=None: seen.append(args))
    multistep.run_stage(stage, stage_dir, {"trainer": {}})
    assert seen[0][-4:] == ["--trainer.max_steps", "9", "--ckpt_path", str(stage_dir / "checkpoints" / "last.ckpt")]


def test_a_stage_after_another_trains_a_fresh_lora_on_top_of_its_adapters(tmp_path):
    sft = yaml.safe_load((REPO / "configs" / "sft.yaml").read_text())
    base = sft["model"]["model"]["name_or_path"]
    previous = {"model": {"model": {"name_or_path": base, "base_adapters": ["a0"]}}, "run_dir": "cpt"}
    cfg = multistep.stage_config(multistep.Stage("sft", str(REPO / "configs" / "sft.yaml")), tmp_path / "sft",
                                 previous)
    assert cfg["run_dir"] == str(tmp_path / "sft") and cfg["trainer"]["callbacks"] == sft["trainer"]["callbacks"]
    assert cfg["model"]["model"]["base_adapters"] == ["a0", str(Path("cpt") / "adapter")]
    assert cfg["model"]["init_adapter"] is None
    assert cfg["model"]["model"]["name_or_path"] == base and cfg["model"]["lora"] == sft["model"]["lora"]
    assert cfg["trainer"]["logger"]["init_args"]["name"] == f"{tmp_path.name}-sft"

    other = {"model": {"model": {"name_or_path": "someone/else"}}, "run_dir": "cpt"}
    with pytest.raises(ValueError, match="both must name the same base"):
        multistep.stage_config(multistep.Stage("sft", str(REPO / "configs" / "sft.yaml")), tmp_path / "x", other)


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ""])
def test_stage_names_that_leave_the_work_dir_are_refused(tmp_path, name, monkeypatch):
    monkeypatch.setattr(multistep, "launch", lambda args, log_file=None: pytest.fail("nothing may run"))
    with pytest.raises(ValueError, match="plain folder name"):
        multistep.run([multistep.Stage(name, "unused.yaml")], str(tmp_path / "work"))
    assert not (tmp_path / "escape").exists()
