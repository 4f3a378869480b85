"""``python -m medadapt COMMAND``: the table of every command and its dispatch; LightningCLI for fit/validate/test is
in ``medadapt/lightning_cli.py``, imported only by those three (Lightning's import alone takes ~6 s).

Every command is parsed by jsonargparse over typed signatures: ``fit``/``validate``/``test`` by LightningCLI
(every config key is an ``__init__`` argument documented in its docstring; ``model`` is ``CausalLMModule`` unless
its ``class_path`` names another, as ``configs/rl.yaml`` names ``medadapt.rl.module.GRPOModule``), the others by the parsers in
``medadapt/commands`` and ``medadapt/eval`` (``console.command_parser``). ``--help`` and ``--print_config``
work for all of them; tests/test_cli.py parses every shipped YAML.
"""

from __future__ import annotations

import logging
import os


#: every subcommand: name → (where it runs, one line of what it does). LightningCLI runs fit/validate/test.
COMMANDS = {
    "fit": ("lightning", "train: SFT (configs/sft.yaml), continual pretraining (configs/cpt.yaml) or RL (configs/rl.yaml)"),
    "validate": ("lightning", "validation loss of a model, adapter or checkpoint"),
    "test": ("lightning", "the leaderboard benchmarks (configs/eval.yaml): log-likelihood or generative"),
    "index": ("medadapt.commands.rag:index_main", "build or update the RAG index (configs/rag.yaml)"),
    "ask": ("medadapt.commands.rag:ask_main", "answer a question with retrieved snippets (RAG, optional adapter)"),
    "multistep": ("medadapt.commands.multistep:main", "chained fits, e.g. CPT then SFT (configs/multistep.yaml)"),
    "study": ("medadapt.commands.study:main", "base vs RAG vs SFT vs CPT→SFT vs SFT+RAG (vs SFT→RL), end to end"),
    "export": ("medadapt.commands.export:main", "merge an adapter into its base: a standalone HF folder"),
    "push": ("medadapt.commands.push:main", "an adapter (or merged model) to the Hugging Face Hub, with its model card"),
    "compare": ("medadapt.eval.compare:main", "methods × tasks with 95% CIs, paired McNemar tests, chart"),
    "decontaminate": ("medadapt.eval.decontaminate:main", "n-gram overlap of training data with the benchmarks"),
}


def usage() -> str:
    lines = ["usage: python -m medadapt COMMAND [--config FILE] [options]   (COMMAND --help: every option)", "",
             "commands:"]
    lines += [f"  {name:<14} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(args=None) -> None:
    import importlib
    import sys

    from medadapt.console import quiet_known_noise

    logging.basicConfig(level=os.environ.get("MEDADAPT_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    quiet_known_noise()
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        raise SystemExit(f"unknown command {argv[0]!r}\n\n{usage()}")
    target = COMMANDS[argv[0]][0]
    if target == "lightning":
        from medadapt.lightning_cli import build_cli

        build_cli(None if args is None else argv)  # from the shell LightningCLI reads sys.argv itself
        return
    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    main()
