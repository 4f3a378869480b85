"""The multi-step runner's own logic. The whole CPT → SFT chain runs end to end in tests/test_study.py:
stage 2 trains on stage 1's merged weights (checked), and a second run trains nothing."""

from __future__ import annotations

from .conftest import REPO


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
    assert cfg["trainer"]["logger"]["init_args"]["name"] == f"{tmp_path.name}-sft"
