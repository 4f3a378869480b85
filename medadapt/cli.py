"""``python -m medadapt fit|validate|test|predict --config …``: LightningCLI over the package's typed signatures.

Every config key is an ``__init__`` argument documented in its docstring, so ``--help`` and
``--print_config`` are the reference; tests/test_configs.py parses every shipped YAML.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from medadapt.module import CausalLMModule


class RunConfigSaver(SaveConfigCallback):
    """Save the run's config.yaml beside its outputs. Without a logger Lightning's ``log_dir`` is the working
    directory, so a ``logger: false`` run wrote config.yaml into wherever it was started: here it goes to the
    checkpoint folder (fit) or the results folder (test), or nowhere."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            return super().setup(trainer, pl_module, stage)
        if stage == "fit":
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        else:
            folder = getattr(pl_module, "hparams", {}).get("results_dir") if stage == "test" else None
        if folder and trainer.is_global_zero:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(Path(folder) / self.config_filename), skip_none=False, overwrite=True,
                             multifile=self.multifile)


class MedAdaptCLI(LightningCLI):
    """LightningCLI where explicit settings win over a checkpoint's, and no checkpoint runs a pickle.

    Stock LightningCLI parses ``--ckpt_path``'s hyperparameters over the config, so a checkpoint silently
    replaced ``results_dir``, ``adapter_dir``, the LoRA shape and the base model given on the command line.
    Here the config stands; the module checks the checkpoint against it (same base, same LoRA shape: an
    error otherwise) and takes from it only what the config leaves open (``model.load_in_4bit: null``).
    Checkpoints load with ``weights_only=True``, and URLs are refused: Lightning would unpickle them.
    """

    def _parse_ckpt_path(self) -> None:
        from medadapt.module import checkpoint_record

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
        if getattr(self, "_ckpt_path", None) and hasattr(self.model, "expected_ckpt_path"):
            self.model.expected_ckpt_path = self._ckpt_path  # build once, for this checkpoint

    def before_fit(self) -> None:
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

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: delete checkpoints an earlier run left in the checkpoint folder and start over")
        parser.set_defaults(
            {
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
        CausalLMModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=4242,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module owns its optimizer and schedule (OptimConfig)
        args=args,
        run=run,
    )


# commands that are not Trainer runs: name → "module:function" taking the remaining argv
COMMANDS = {
    "compare": "medadapt.eval.compare:main",
    "decontaminate": "medadapt.eval.decontaminate:main",
    "index": "medadapt.rag.cli:index_main",
    "ask": "medadapt.rag.cli:ask_main",
    "export": "medadapt.export:main",
    "multistep": "medadapt.multistep:main",
    "study": "medadapt.study:main",
}


def main(args=None) -> None:
    import sys

    logging.basicConfig(level=os.environ.get("MEDADAPT_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("haystack", "bm25s", "faiss.loader", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        import importlib

        module, function = COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    build_cli(args)


if __name__ == "__main__":
    main()
