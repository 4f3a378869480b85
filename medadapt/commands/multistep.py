"""``python -m medadapt multistep --config configs/multistep.yaml``: CPT then SFT (or any chain of fits).

Each stage is an ordinary ``fit`` config. For every stage the runner writes the config it actually runs
(``<work_dir>/<stage>/config.yaml``: its own checkpoints, TensorBoard run and adapter folder, and, for a
stage that starts from the previous one, the previous stages' adapters stacked under its own) and
runs ``python -m medadapt fit`` on it in a subprocess, so DDP and cluster launchers work per stage as
they do alone.

How stages compose: a stage that starts from the previous one trains a fresh LoRA on the same 4-bit base
with the previous stages' adapters stacked under it, frozen (``model.base_adapters``). Its model is
exactly base + ΔW_previous + ΔW_own. Merging the previous adapter into the weights and re-quantizing them
for the next stage (what this runner did first) keeps ~1% of a typical CPT update: ``nf4(dequant(nf4(W))
+ ΔW)`` snaps back to the old grid unless ΔW is large (README, "CPT→SFT").

Re-running after a crash: a stage with a ``DONE.json`` is skipped, an unfinished stage resumes from its
``last.ckpt``.
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
        from_previous: Start from the previous stage's result: its adapters, frozen, under this stage's LoRA.
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    from_previous: bool = False


def stage_config(stage: Stage, stage_dir: Path, previous: Optional[dict]) -> dict:
    """The stage's fit config, pointed at its own folders (and, after ``previous``, stacked on its adapters).

    ``previous`` is the previous stage's config as this runner wrote it.
    """
    cfg = yaml.safe_load(Path(stage.config).read_text())
    cfg["run_dir"] = str(stage_dir)  # fit puts its checkpoints (last.ckpt) and adapter there (cli.py)
    trainer = cfg.setdefault("trainer", {})
    logger = trainer.get("logger", {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"})
    if isinstance(logger, dict):  # a configured logger: its run is named <work_dir name>-<stage>
        logger["init_args"] = {"save_dir": "lightning_logs", **logger.get("init_args", {}),
                               "name": f"{stage_dir.parent.name}-{stage.name}"}
        trainer["logger"] = logger
    model = cfg.setdefault("model", {})
    if previous is not None:
        prev_model = previous["model"].get("model") or {}
        own = model.setdefault("model", {})
        if own.get("name_or_path", prev_model.get("name_or_path")) != prev_model.get("name_or_path"):
            raise ValueError(f"stage {stage.name!r} ({stage.config}) trains {own['name_or_path']!r} but starts from a "
                             f"stage trained on {prev_model.get('name_or_path')!r}: both must name the same base")
        own["name_or_path"] = prev_model.get("name_or_path")
        own["base_adapters"] = [*(prev_model.get("base_adapters") or []), str(Path(previous["run_dir"]) / "adapter")]
        model["init_adapter"] = None  # a fresh LoRA on top of the previous stages' adapters
    return cfg


def run_stage(stage: Stage, stage_dir: Path, cfg: dict, log_file: Optional[Path] = None) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    config_path = stage_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = ["fit", "--config", str(config_path), *stage.args]
    last = stage_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("stage %s: resuming from %s", stage.name, last)
        args += ["--ckpt_path", str(last)]
    launch(args, log_file)


def launch(args: list[str], log_file: Optional[Path] = None) -> None:
    """``python -m medadapt ARGS`` in a subprocess, so Lightning's DDP launcher and cluster environments see
    a plain command line (a fit inside this process could not spawn its ranks). With ``log_file`` its output
    goes there, and a failure raises with the log's last lines."""
    cmd = [sys.executable, "-m", "medadapt", *args]
    log.info("running: %s", " ".join(cmd))
    if log_file is None:
        subprocess.run(cmd, check=True, env=os.environ.copy())
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    if code != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"`python -m medadapt {args[0]}` failed (exit {code}); log {log_file}:\n{tail}")


def run(stages: list[Stage], work_dir: str, log_dir: Optional[Path] = None) -> list[dict]:
    """Run the chain; returns, per stage, ``{"stage", "outcome" (trained | skipped), "adapter", "config"}``.
    With ``log_dir`` each stage's output goes to ``<log_dir>/<stage>.log`` instead of the console."""
    work = Path(work_dir)
    for stage in stages:
        stage_dir = (work / stage.name).resolve()
        if stage_dir.parent != work.resolve() or stage.name in ("", ".", ".."):
            raise ValueError(f"stage name {stage.name!r} must be a plain folder name inside {work_dir}")
    done, previous = [], None
    for i, stage in enumerate(stages):
        if stage.from_previous and i == 0:
            raise ValueError(f"stage {stage.name!r} is first: it has no previous stage to start from")
        stage_dir = work / stage.name
        cfg = stage_config(stage, stage_dir, previous if stage.from_previous else None)
        marker = stage_dir / "DONE.json"
        if marker.exists():
            log.info("stage %s: already done (%s), skipped", stage.name, marker)
            outcome = "skipped"
        else:
            run_stage(stage, stage_dir, cfg, log_dir / f"{work.name}-{stage.name}.log" if log_dir else None)
            marker.write_text(json.dumps({"stage": stage.name, "config": str(stage_dir / "config.yaml"),
                                          "adapter": str(stage_dir / "adapter")}, indent=2))
            outcome = "trained"
        done.append({"stage": stage.name, "outcome": outcome, "adapter": str(stage_dir / "adapter"),
                     "config": str(stage_dir / "config.yaml")})
        previous = cfg
    return done


def build_parser():
    from medadapt.console import command_parser

    p = command_parser("multistep", __doc__, "configs/multistep.yaml")
    p.add_argument("--work_dir", type=str, default="checkpoints/multistep",
                   help="one folder per stage: its config, checkpoints, adapter and DONE.json")
    p.add_argument("--stages", type=list[Stage], help="the fits to run in order")
    return p


def main(argv: list[str]) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    stages = p.instantiate_classes(args).stages
    for stage in run(stages, args.work_dir):
        print(f"{stage['stage']}: {stage['outcome']} → {stage['adapter']}")
