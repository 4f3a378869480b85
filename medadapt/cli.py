"""``python -m medadapt fit|validate|test|predict --config …``: LightningCLI over the package's typed signatures.

Every config key is an ``__init__`` argument documented in its docstring, so ``--help`` and
``--print_config`` are the reference; tests/test_configs.py parses every shipped YAML.
"""

from __future__ import annotations

import logging
import os

from lightning.pytorch.cli import LightningCLI

from medadapt.module import CausalLMModule


class MedAdaptCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
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
