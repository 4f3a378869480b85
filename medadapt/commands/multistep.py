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

Re-running: a stage is skipped only when its ``DONE.json`` records the fingerprint of what it would train now
(the resolved config and arguments, the base model's and the base adapters' content, the data files'
content) and its adapter is still the one it wrote; an unfinished stage resumes from its ``last.ckpt`` under
the same condition. Anything changed is an error naming what changed, unless ``--on_change retrain``
retrains the stage from scratch (and so the stages after it, whose base adapter it is). The work_dir is
locked for one run at a time; SIGINT/SIGTERM stop the running stage's whole process group and leave no DONE.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from medadapt.files import read_json, read_yaml, write_atomic, write_json

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One fit in the chain.

    Args:
        name: Stage name: its folder under ``work_dir``; its TensorBoard run is ``<work_dir name>-<name>``.
        config: A ``fit`` config (e.g. configs/cpt.yaml).
        args: Extra command-line overrides for this stage (e.g. ["--trainer.max_steps", "100"]).
        from_previous: Start from the previous stage's result: its adapters, frozen, under this stage's LoRA.
        base_adapters: Adapters to stack, frozen, under this stage's LoRA (e.g. an SFT adapter another chain
            trained, under an RL stage); null keeps the config's. ``from_previous`` adds the previous stage's.
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    from_previous: bool = False
    base_adapters: Optional[list[str]] = None


def model_args(cfg: dict) -> dict:
    """The model's arguments in a fit config, written flat (``model: {model: …, lora: …}``, the default module) or
    with a class (``model: {class_path: …GRPOModule, init_args: {…}}``); created empty when absent."""
    model = cfg.setdefault("model", {})
    return model.setdefault("init_args", {}) if "class_path" in model else model


def stage_config(stage: Stage, stage_dir: Path, previous: Optional[dict]) -> dict:
    """The stage's fit config, pointed at its own folders (and, after ``previous``, stacked on its adapters).

    ``previous`` is the previous stage's config as this runner wrote it.
    """
    cfg = read_yaml(stage.config, f"stage {stage.name!r} config")
    cfg["run_dir"] = str(stage_dir)  # fit puts its checkpoints (last.ckpt) and adapter there (lightning_cli.py)
    trainer = cfg.setdefault("trainer", {})
    logger = trainer.get("logger", {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"})
    if isinstance(logger, dict):  # a configured logger: its run is named <work_dir name>-<stage>
        logger["init_args"] = {"save_dir": "lightning_logs", **logger.get("init_args", {}),
                               "name": f"{stage_dir.parent.name}-{stage.name}"}
        trainer["logger"] = logger
    model = model_args(cfg)
    if stage.base_adapters is not None:
        model.setdefault("model", {})["base_adapters"] = [str(a) for a in stage.base_adapters]
    if previous is not None:
        prev_model = model_args(previous).get("model") or {}
        own = model.setdefault("model", {})
        if own.get("name_or_path", prev_model.get("name_or_path")) != prev_model.get("name_or_path"):
            raise ValueError(f"stage {stage.name!r} ({stage.config}) trains {own['name_or_path']!r} but starts from a "
                             f"stage trained on {prev_model.get('name_or_path')!r}: both must name the same base")
        own["name_or_path"] = prev_model.get("name_or_path")
        own["base_adapters"] = [*(prev_model.get("base_adapters") or []), str(Path(previous["run_dir"]) / "adapter")]
        model["init_adapter"] = None  # a fresh LoRA on top of the previous stages' adapters
    return cfg


class StageChangedError(RuntimeError):
    """A finished (or started) stage whose inputs changed since: its result would not be what it says."""


def stage_fingerprint(stage: Stage, cfg: dict) -> dict:
    """What a stage trains on, by content: its resolved config and arguments, the base model's identity, each base
    adapter's digest and each local data file's digest (from the config or the arguments)."""
    from medadapt.fingerprint import adapter_digest, digest_value, file_digest
    from medadapt.model_config import ModelConfig
    from medadapt.provenance import base_identity

    model = model_args(dict(cfg, model=dict(cfg.get("model") or {}))).get("model") or {}
    name = model.get("name_or_path") or ModelConfig.name_or_path
    files = []
    data = (cfg.get("data") or {}).get("init_args") or {}
    listed = [data.get("data_files"), (data.get("pubmedqa") or {}).get("data_file"),
              *[source.get("data_files") for source in data.get("sources") or [] if isinstance(source, dict)]]
    for value in [*listed, *[b for a, b in zip(stage.args, stage.args[1:]) if a.endswith(("data_files", "data_file"))]]:
        if isinstance(value, str) and value.startswith("["):
            value = yaml.safe_load(value)
        files += [value] if isinstance(value, str) else list(value or [])
    return {"config": digest_value({k: v for k, v in cfg.items() if k != "run_dir"}), "args": list(stage.args),
            "base_model": base_identity(ModelConfig(name_or_path=name, revision=model.get("revision"))),
            "base_adapters": [adapter_digest(a) for a in model.get("base_adapters") or []],
            "data_files": {f: file_digest(f) for f in files if f and f != "null" and Path(f).is_file()}}


def stage_state(stage_dir: Path, current: dict) -> tuple[str, list[str]]:
    """``done`` (recorded and current agree, the adapter is the one written), ``started`` (an interrupted run of
    the same stage), ``fresh`` (nothing there), or ``changed`` with what changed."""
    from medadapt.fingerprint import adapter_digest, differences

    done, started = stage_dir / "DONE.json", stage_dir / "STARTED.json"
    if done.exists():
        record = read_json(done, "stage record")
        changed = differences(record.get("fingerprint") or {}, current)
        adapter = stage_dir / "adapter"
        if not (adapter / "adapter_config.json").exists():
            changed.append("adapter (deleted)")
        elif adapter_digest(adapter) != record.get("adapter_digest"):
            changed.append("adapter (replaced)")
        return ("done", []) if not changed else ("changed", changed)
    if started.exists():
        changed = differences(read_json(started, "stage record").get("fingerprint") or {}, current)
        return ("started", []) if not changed else ("changed", changed)
    if (stage_dir / "checkpoints" / "last.ckpt").exists():
        return "changed", ["checkpoints of a run with no record"]
    return "fresh", []


def run_stage(stage: Stage, stage_dir: Path, cfg: dict, log_file: Optional[Path] = None) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    config_path = stage_dir / "config.yaml"
    write_atomic(config_path, yaml.safe_dump(cfg, sort_keys=False))
    args = ["fit", "--config", str(config_path), *stage.args]
    last = stage_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("stage %s: resuming from %s", stage.name, last)
        args += ["--ckpt_path", str(last)]
    launch(args, log_file)


def launch(args: list[str], log_file: Optional[Path] = None) -> None:
    """``python -m medadapt ARGS`` in a subprocess, so Lightning's DDP launcher and cluster environments see
    a plain command line (a fit inside this process could not spawn its ranks). The child leads its own process
    group: an interrupted runner (Ctrl-C, SIGTERM) stops it and every rank it started, and then stops itself.
    With ``log_file`` its output goes there, and a failure raises with the log's last lines."""
    cmd = [sys.executable, "-m", "medadapt", *args]
    log.info("running: %s", " ".join(cmd))
    out = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "w")
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=os.environ.copy(),
                                start_new_session=True, preexec_fn=die_with_parent)
        try:
            code = proc.wait()
        except BaseException:  # interrupted: the child and its ranks go first
            stop_group(proc)
            raise
    finally:
        if out is not None:
            out.close()
    if code != 0:
        where = f"; log {log_file}:\n" + "".join(log_file.read_text().splitlines(keepends=True)[-30:]) if log_file else ""
        if code < 0 or code >= 128:  # killed, or stopped on a signal (fit exits 128 + N after SIGTERM)
            number = -code if code < 0 else code - 128
            name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
            raise StageTerminatedError(f"`python -m medadapt {args[0]}` was stopped by {name} (exit {code}): nothing "
                                       f"was marked done; run the same command again to resume it{where}")
        raise RuntimeError(f"`python -m medadapt {args[0]}` failed (exit {code}){where}")


class StageTerminatedError(RuntimeError):
    """A stage's process was stopped by a signal: it did not finish, and is not marked done."""


def die_with_parent() -> None:
    """In the child, before it runs: the kernel kills it the moment the runner dies, however the runner dies
    (SIGKILL included), so no stage outlives the runner that holds its work_dir's lock (Linux ``PR_SET_PDEATHSIG``;
    elsewhere nothing is done)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        if os.getppid() == 1:  # the runner died between fork and prctl
            os.kill(os.getpid(), signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def terminate_on_sigterm() -> None:
    """SIGTERM and SIGHUP (a closed terminal) interrupt the runner like Ctrl-C does: its children are stopped, nothing
    is marked done, and it exits 128 + the signal's number."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def lock_work_dir(work_dir: Path):
    """One run per work_dir: a held lock, or a clear error naming the folder."""
    from medadapt.files import lock_folder

    return lock_folder(work_dir, f"{work_dir} is in use by another run (it holds {work_dir / '.lock'}); wait for it, "
                                 "or give this run its own work_dir")


def run(stages: list[Stage], work_dir: str, log_dir: Optional[Path] = None,
        on_change: Literal["error", "retrain"] = "error") -> list[dict]:
    """Run the chain; returns, per stage, ``{"stage", "outcome" (trained | resumed | skipped | retrained), "adapter",
    "config"}``. With ``log_dir`` each stage's output goes to ``<log_dir>/<stage>.log`` instead of the console."""
    from medadapt.fingerprint import adapter_digest

    work = Path(work_dir)
    names = [stage.name for stage in stages]
    for stage in stages:
        stage_dir = (work / stage.name).resolve()
        if stage_dir.parent != work.resolve() or stage.name in ("", ".", ".."):
            raise ValueError(f"stage name {stage.name!r} must be a plain folder name inside {work_dir}")
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique (each is its own folder): {names}")
    lock = lock_work_dir(work)
    try:
        done, previous = [], None
        for i, stage in enumerate(stages):
            if stage.from_previous and i == 0:
                raise ValueError(f"stage {stage.name!r} is first: it has no previous stage to start from")
            stage_dir = work / stage.name
            cfg = stage_config(stage, stage_dir, previous if stage.from_previous else None)
            fingerprint = stage_fingerprint(stage, cfg)
            state, changed = stage_state(stage_dir, fingerprint)
            if state == "changed" and on_change == "error":
                raise StageChangedError(
                    f"stage {stage.name} ({stage_dir}): {', '.join(changed)} changed since it was trained; its "
                    "result would not be what the chain now asks for. Re-run with --on_change retrain to train it "
                    "(and the stages after it) again, or restore what changed")
            if state == "done":
                log.info("stage %s: done with these inputs, skipped", stage.name)
                outcome = "skipped"
            else:
                if state == "changed":
                    log.warning("stage %s: %s changed: retraining from scratch", stage.name, ", ".join(changed))
                    for name in ("DONE.json", "STARTED.json", "checkpoints", "adapter"):
                        target = stage_dir / name
                        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
                write_json(stage_dir / "STARTED.json", {"stage": stage.name, "fingerprint": fingerprint}, indent=2)
                run_stage(stage, stage_dir, cfg, log_dir / f"{work.name}-{stage.name}.log" if log_dir else None)
                write_json(stage_dir / "DONE.json", {"stage": stage.name, "config": str(stage_dir / "config.yaml"),
                                                     "adapter": str(stage_dir / "adapter"), "fingerprint": fingerprint,
                                                     "adapter_digest": adapter_digest(stage_dir / "adapter")}, indent=2)
                (stage_dir / "STARTED.json").unlink(missing_ok=True)
                outcome = {"fresh": "trained", "started": "resumed", "changed": "retrained"}[state]
            done.append({"stage": stage.name, "outcome": outcome, "adapter": str(stage_dir / "adapter"),
                         "config": str(stage_dir / "config.yaml")})
            previous = cfg
        return done
    finally:
        lock.release()


def build_parser():
    from medadapt.console import command_parser

    p = command_parser("multistep", __doc__, "configs/multistep.yaml")
    p.add_argument("--work_dir", type=str, default="checkpoints/multistep",
                   help="one folder per stage: its config, checkpoints, adapter and DONE.json")
    p.add_argument("--stages", type=list[Stage], help="the fits to run in order")
    p.add_argument("--on_change", type=Literal["error", "retrain"], default="error",
                   help="a finished or started stage whose config, arguments, base model, base adapters or data "
                        "changed since: error (default, naming what changed) or retrain it from scratch")
    return p


def main(argv: list[str]) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    stages = p.instantiate_classes(args).stages
    terminate_on_sigterm()
    for stage in run(stages, args.work_dir, on_change=args.on_change):
        print(f"{stage['stage']}: {stage['outcome']} → {stage['adapter']}")
