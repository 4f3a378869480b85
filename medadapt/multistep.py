"""``python -m medadapt multistep --config configs/multistep.yaml``: CPT then SFT (or any chain of fits).

Each stage is an ordinary ``fit`` config. For every stage the runner writes the config it actually runs
(``<work_dir>/<stage>/config.yaml``: its own checkpoints, TensorBoard run and adapter folder, and, for a
stage that starts from the previous one, the previous stage's merged weights as its base model) and
runs ``python -m medadapt fit`` on it in a subprocess, so DDP and cluster launchers work per stage as
they do alone. Between stages the adapter is merged into the dequantized nf4 base (``export.py``) and
the next stage loads that folder, re-quantized, with a fresh LoRA.

Re-running after a crash: a stage with a ``DONE.json`` is skipped, an unfinished stage resumes from its
``last.ckpt``, a merge is redone only if its folder is incomplete.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One fit in the chain.

    Args:
        name: Stage name: its folder under ``work_dir``; its TensorBoard run is ``<work_dir name>-<name>``.
        config: A ``fit`` config (e.g. configs/cpt.yaml).
        args: Extra command-line overrides for this stage (e.g. ["--trainer.max_steps", "100"]).
        from_previous: Start from the previous stage's result (its adapter merged into its base).
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    from_previous: bool = False


def merged_dtype(compute_dtype: str) -> str:
    import torch

    if compute_dtype != "auto":
        return compute_dtype
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def stage_config(stage: Stage, stage_dir: Path, base_override: Optional[str]) -> dict:
    """The stage's fit config, pointed at its own folders (and at the previous stage's weights)."""
    cfg = yaml.safe_load(Path(stage.config).read_text())
    trainer = cfg.setdefault("trainer", {})
    callbacks = [c for c in trainer.get("callbacks") or []
                 if not str(c.get("class_path", "")).endswith("ModelCheckpoint")]
    kept = next((c for c in trainer.get("callbacks") or [] if str(c.get("class_path", "")).endswith("ModelCheckpoint")),
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {}})
    kept["init_args"] = {**kept.get("init_args", {}), "dirpath": str(stage_dir / "checkpoints"), "save_last": True}
    trainer["callbacks"] = callbacks + [kept]
    logger = trainer.get("logger") or {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {}}
    if isinstance(logger, dict):
        logger.setdefault("init_args", {})
        logger["init_args"].setdefault("save_dir", "lightning_logs")
        logger["init_args"]["name"] = f"{stage_dir.parent.name}-{stage.name}"  # <work_dir name>-<stage>
        trainer["logger"] = logger
    model = cfg.setdefault("model", {})
    model["adapter_dir"] = str(stage_dir / "adapter")
    if base_override:
        model.setdefault("model", {})["name_or_path"] = base_override
        model["init_adapter"] = None  # a fresh LoRA on the merged weights
    return cfg


def run_stage(stage: Stage, stage_dir: Path, cfg: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    config_path = stage_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "medadapt", "fit", "--config", str(config_path), *stage.args]
    last = stage_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("stage %s: resuming from %s", stage.name, last)
        cmd += ["--ckpt_path", str(last)]
    log.info("stage %s: %s", stage.name, " ".join(cmd))
    subprocess.run(cmd, check=True, env=os.environ.copy())


def merge_stage(cfg: dict, stage_dir: Path, merged_dir: Path) -> None:
    from medadapt.export import export
    from medadapt.model import ModelConfig

    base = ModelConfig(**(cfg.get("model", {}).get("model") or {}))
    if (merged_dir / "medadapt_export.json").exists():
        return
    tmp = merged_dir.with_name(merged_dir.name + ".partial")
    export(base, str(stage_dir / "adapter"), str(tmp), merged_dtype(base.compute_dtype))
    tmp.replace(merged_dir)


def run(stages: list[Stage], work_dir: str) -> list[str]:
    """Run the chain; returns, per stage, what happened (``trained`` or ``skipped``)."""
    work = Path(work_dir)
    done_log, base_override = [], None
    for i, stage in enumerate(stages):
        if stage.from_previous and i == 0:
            raise ValueError(f"stage {stage.name!r} is first: it has no previous stage to start from")
        stage_dir = work / stage.name
        cfg = stage_config(stage, stage_dir, base_override if stage.from_previous else None)
        marker = stage_dir / "DONE.json"
        if marker.exists():
            log.info("stage %s: already done (%s), skipped", stage.name, marker)
            done_log.append("skipped")
        else:
            run_stage(stage, stage_dir, cfg)
            marker.write_text(json.dumps({"stage": stage.name, "config": str(stage_dir / "config.yaml"),
                                          "adapter": str(stage_dir / "adapter")}, indent=2))
            done_log.append("trained")
        if i + 1 < len(stages) and stages[i + 1].from_previous:
            merged = work / f"{stage.name}-merged"
            merge_stage(cfg, stage_dir, merged)
            base_override = str(merged)
    return done_log


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="python -m medadapt multistep", description=__doc__.splitlines()[0])
    p.add_argument("--config", action=ActionConfigFile, help="configs/multistep.yaml")
    p.add_argument("--work_dir", type=str, default="checkpoints/multistep",
                   help="one folder per stage (config, checkpoints, adapter, DONE.json) and <stage>-merged")
    p.add_argument("--stages", type=list[Stage], help="the fits to run in order")
    return p


def main(argv: list[str]) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    stages = p.instantiate_classes(args).stages
    outcome = run(stages, args.work_dir)
    for stage, what in zip(stages, outcome):
        print(f"{stage.name}: {what} → {Path(args.work_dir) / stage.name / 'adapter'}")
