"""What the terminal sees: one parser style for every command, and third-party noise silenced once.

``command_parser`` gives every subcommand the same jsonargparse parser (typed options, real booleans,
``--help`` documenting each key, ``--config`` and ``--print_config``). ``quiet_known_noise`` silences
third-party messages known to be harmless, once at the entry point (``python -m medadapt``).

Each filter names one exact message seen on every run of the demo and checked to be noise for medadapt
(deprecations inside libraries we do not call that way, install tips): never a category or a library's
warnings as a whole, so a real warning still shows.
"""

from __future__ import annotations

import logging
import warnings

#: (message regex, warning category or None for any) of warnings.warn calls
WARNINGS = [
    # transformers 5 renamed these; peft's prepare_model_for_kbit_training and Lightning still call the old names
    (r"`(is_)?gradient_checkpointing(_enable)?` is deprecated", FutureWarning),
    # torchdata's StatefulDataLoader calls a torch API torch deprecated
    (r"'set_vital' is deprecated", UserWarning),
    # Lightning's own pytree helper on torch ≥ 2.12
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", None),
]
#: (logger, message substring) of log records
LOG_RECORDS = [
    ("lightning.pytorch.utilities.rank_zero", "try installing [litlogger]"),
    ("lightning.pytorch.utilities.rank_zero", "try installing [litmodels]"),
    ("bitsandbytes", "Failed to load CPU gemm_4bit_forward from kernels-community"),
]
#: libraries whose INFO chatter drowns medadapt's own progress lines
QUIET_LOGGERS = ["haystack", "bm25s", "faiss.loader", "sentence_transformers", "httpx"]


class _DropMessages(logging.Filter):
    def __init__(self, fragments: list[str]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_known_noise() -> None:
    for pattern, category in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, **({"category": category} if category else {}))
    by_logger: dict[str, list[str]] = {}
    for name, fragment in LOG_RECORDS:
        by_logger.setdefault(name, []).append(fragment)
    for name, fragments in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(fragments))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def command_parser(name: str, doc: str, config_help: str = "a YAML file with the keys below"):
    """A jsonargparse parser named ``python -m medadapt NAME``, described by the first line of ``doc``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=f"python -m medadapt {name}", description=doc.strip().splitlines()[0], default_env=False)
    p.add_argument("--config", action=ActionConfigFile, help=config_help)
    return p
