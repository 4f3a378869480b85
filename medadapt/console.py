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
    # CausalLMModule flattens packed batches for varlen kernels in this hook on purpose (the data module has none)
    (r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a", None),
]
#: (logger, message substring) of log records
LOG_RECORDS = [
    ("lightning.pytorch.utilities.rank_zero", "try installing [litlogger]"),
    ("lightning.pytorch.utilities.rank_zero", "try installing [litmodels]"),
    ("bitsandbytes", "Failed to load CPU gemm_4bit_forward from kernels-community"),
]
#: libraries whose INFO chatter drowns medadapt's own progress lines
QUIET_LOGGERS = ["haystack", "bm25s", "faiss.loader", "sentence_transformers", "httpx"]


class _DropNoise(logging.Filter):
    """Drops the known messages, and records below WARNING from the chatty libraries. Put on the root's handlers
    it sees every propagated record: a filter on a logger sees only the records logged on that very logger (not
    its children's, e.g. bitsandbytes.backends.cpu.ops), and a library may reset its own level when imported
    (bm25s sets DEBUG), so levels alone do not hold."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if record.levelno < logging.WARNING and any(name == q or name.startswith(q + ".") for q in QUIET_LOGGERS):
            return False
        if any(name == n or name.startswith(n + ".") for n, _ in LOG_RECORDS):
            message = record.getMessage()
            return not any(f in message for n, f in LOG_RECORDS if name == n or name.startswith(n + "."))
        return True


def quiet_known_noise() -> None:
    for pattern, category in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, **({"category": category} if category else {}))
    noise = _DropNoise()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropNoise) for f in handler.filters):
            handler.addFilter(noise)
    for name, _ in LOG_RECORDS:  # loggers with handlers of their own (Lightning's rank-zero logger)
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(noise)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def command_parser(name: str, doc: str, config_help: str = "a YAML file with the keys below"):
    """A jsonargparse parser named ``python -m medadapt NAME``, described by the first line of ``doc``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=f"python -m medadapt {name}", description=doc.strip().splitlines()[0], default_env=False)
    p.add_argument("--config", action=ActionConfigFile, help=config_help)
    return p
