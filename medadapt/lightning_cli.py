"""LightningCLI for ``fit``/``validate``/``test``: explicit settings win over a checkpoint's, no checkpoint runs a pickle,
a SIGTERM'd run exits 143, and the run's config is saved beside its outputs.

Kept apart from ``medadapt/cli.py`` (the command table) because importing Lightning costs ~6 s: the commands that do
not train (``compare``, ``export``, ``study``'s runner, ``--help``) start without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from medadapt.training import AdapterModule


class RunConfigSaver(SaveConfigCallback):
    """Save the run's config.yaml beside its outputs, through medadapt's one write path (``files.write_atomic``: a
    link planted at config.yaml is replaced, never written through; the file gets the umask's mode). With a logger
    it goes to the logger's folder; without one, Lightning's ``log_dir`` is the working directory, so it goes to the
    checkpoint folder (fit) or the results folder (test), or nowhere."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.logger is not None:
            folder = trainer.log_dir  # this broadcasts the directory
        elif stage == "fit":
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        else:
            folder = getattr(pl_module, "hparams", {}).get("results_dir") if stage == "test" else None
        if folder and trainer.is_global_zero:
            from medadapt.files import output_folder, write_atomic

            write_atomic(output_folder(folder, "config folder") / self.config_filename,
                         self.parser.dump(self.config, skip_none=False))
        self.already_saved = True


class MedAdaptCLI(LightningCLI):
    """LightningCLI where explicit settings win over a checkpoint's, and no checkpoint runs a pickle.

    Stock LightningCLI parses ``--ckpt_path``'s hyperparameters over the config, so a checkpoint silently
    replaced ``results_dir``, ``adapter_dir``, the LoRA shape and the base model given on the command line.
    Here the config stands; the module checks the checkpoint against it (same base, same LoRA shape: an
    error otherwise) and takes from it only what the config leaves open (``model.load_in_4bit: null``).
    Checkpoints load with ``weights_only=True``, and URLs are refused: Lightning would unpickle them.
    """

    def _parse_ckpt_path(self) -> None:
        from medadapt.checkpoints import checkpoint_record

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "hpc", "registry"):
            checkpoint_record(ckpt_path)  # refuses URLs; names a missing file before any model loads
        self._ckpt_path = ckpt_path if ckpt_path not in ("last", "hpc", "registry") else None
        if subcommand and "weights_only" in self.config[subcommand]:
            if self.config[subcommand]["weights_only"] is False:
                raise ValueError("weights_only: false would let a checkpoint run arbitrary code; medadapt "
                                 "checkpoints hold plain tensors and load with weights_only: true")
            self.config[subcommand]["weights_only"] = True

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        datamodule, model = getattr(self, "datamodule", None), getattr(self, "model", None)
        if hasattr(datamodule, "connect") and hasattr(model, "tokenizer"):
            datamodule.connect(model.tokenizer)  # the model's tokenizer, for the data's token ids
        if hasattr(datamodule, "limit_context") and hasattr(model, "context_length"):
            datamodule.limit_context(model.context_length())  # no prompt longer than the model reads
        rows, length = getattr(datamodule, "batch_size", None), getattr(datamodule, "max_length", None)
        if isinstance(rows, int) and isinstance(length, int) and hasattr(model, "micro_batch_tokens"):
            model.micro_batch_tokens = rows * length  # what gradient_checkpointing: auto sizes its decision by
        prompt = (getattr(datamodule, "hparams", None) or {}).get("max_prompt_length")
        if prompt and hasattr(model, "max_prompt_tokens"):
            model.max_prompt_tokens = prompt  # RL rollouts: what a vLLM engine's context must hold
        if getattr(self, "_ckpt_path", None) and hasattr(model, "expected_ckpt_path"):
            self.model.expected_ckpt_path = self._ckpt_path  # build once, for this checkpoint

    def _run_subcommand(self, subcommand: str) -> None:
        """A run stopped by SIGTERM ends with exit status 143 and says what it left: Lightning's graceful stop raises
        a ``SystemExit`` with no code, which a shell's ``&&`` or a scheduler takes for success."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            step = self.trainer.global_step
            logging.getLogger(__name__).error(
                "%s stopped by SIGTERM at optimizer step %d: its checkpoints are what it left (no adapter was exported"
                "); resume with --ckpt_path <checkpoint dir>/last.ckpt", subcommand, step)
            raise SystemExit(143) from None

    def before_fit(self) -> None:
        check = getattr(self.model, "check_trainer", None)
        if check is not None:  # a module that steps its optimizer itself (GRPO) names what replaces trainer settings
            check(self.trainer)
        for callback in self.trainer.checkpoint_callbacks:  # last.ckpt is last.ckpt: resuming a copied folder must
            callback._enable_version_counter = False      # not write last-v1.ckpt and leave last.ckpt stale
        self.apply_run_dir()
        self.refuse_stale_checkpoints()

    def refuse_stale_checkpoints(self) -> None:
        """Refuse to train into a checkpoint folder that holds another run's checkpoints: Lightning would write
        ``last-v1.ckpt`` beside the old ``last.ckpt``, so the README's resume command would resume the old run
        while ``adapter/`` held the new one. Resume it (``--ckpt_path``) or say ``--overwrite true``."""
        if self._ckpt_path:
            return
        for callback in self.trainer.checkpoint_callbacks:
            folder = Path(callback.dirpath) if getattr(callback, "dirpath", None) else None
            old = sorted(folder.glob("*.ckpt")) if folder and folder.is_dir() else []
            if old and not self.config["fit"].get("overwrite"):
                raise FileExistsError(
                    f"{folder} holds checkpoints of an earlier run ({', '.join(p.name for p in old[:3])}); resume "
                    f"it with --ckpt_path {folder / 'last.ckpt'}, or start over with --overwrite true (deletes them)")
            for path in old:
                path.unlink()

    def apply_run_dir(self) -> None:
        """``--run_dir D``: this run's checkpoints in D/checkpoints (``last.ckpt`` kept for resuming) and its
        adapter in D/adapter: how the multi-step runner gives each stage its own folders without editing the
        stage's callbacks."""
        run_dir = self.config[self.subcommand].get("run_dir")
        if not run_dir:
            return
        for callback in self.trainer.checkpoint_callbacks:
            callback.dirpath, callback.save_last = str(Path(run_dir) / "checkpoints"), True
        self.model.hparams.adapter_dir = str(Path(run_dir) / "adapter")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: delete checkpoints an earlier run left in the checkpoint folder and start over")
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="fit: one folder for this run: checkpoints/ (with last.ckpt) and adapter/ inside it")
        parser.set_defaults(
            {
                "model": {"class_path": "medadapt.module.CausalLMModule"},  # a config without class_path: SFT/CPT
                "trainer.default_root_dir": ".",
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "", "version": None},
                },
            }
        )


def build_cli(args=None, run: bool = True) -> MedAdaptCLI:
    import lightning as L

    return MedAdaptCLI(
        AdapterModule,
        L.LightningDataModule,
        subclass_mode_model=True,  # medadapt.module.CausalLMModule unless the config names another (GRPOModule)
        subclass_mode_data=True,
        parser_kwargs={"prog": "python -m medadapt"},
        seed_everything_default=4242,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module owns its optimizer and schedule (OptimConfig)
        args=args,
        run=run,
    )
