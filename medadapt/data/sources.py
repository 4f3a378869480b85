"""One way in for every table of rows: a hub dataset or local files, both through ``datasets.load_dataset``.

Keeping a single path means the offline demo and the tests exercise exactly the code a GPU run uses
against the hub; only the arguments differ.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger(__name__)

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class MalformedRowError(ValueError):
    """A row that cannot become a training example; the message names file, row and field."""


def load_rows(
    dataset: str,
    name: Optional[str] = None,
    split: str = "train",
    data_files: Union[str, list[str], None] = None,
    revision: Optional[str] = None,
    max_rows: Optional[int] = None,
    **builder_kwargs,
):
    """Load ``dataset`` (hub id) or ``data_files`` (local JSON array / JSONL / parquet / CSV); keep the first ``max_rows``.

    ``builder_kwargs`` go to the local file builder (e.g. ``column_names`` for a header-less CSV).
    """
    from datasets import load_dataset

    if data_files:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        missing = [f for f in files if not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"data file(s) not found: {', '.join(missing)}")
        suffixes = {Path(f).suffix.lower() for f in files}
        builders = {_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise ValueError(f"data_files must share one format among {sorted(_BUILDERS)}: got {sorted(suffixes)}")
        rows = load_dataset(builders.pop(), data_files=files, split="train", **builder_kwargs)
    else:
        rows = load_dataset(dataset, name, split=split, revision=revision)
    if max_rows is not None and max_rows < len(rows):
        rows = rows.select(range(max_rows))
    log.info("loaded %d rows from %s", len(rows), describe_source(dataset, data_files))
    return rows


def describe_source(dataset: str, data_files: Union[str, list[str], None]) -> str:
    if data_files:
        return data_files if isinstance(data_files, str) else ",".join(data_files)
    return dataset


def tokenizer_for(datamodule, name: Optional[str]):
    """The tokenizer named in a data module's config, or else the one its Trainer's model loaded."""
    if name is not None:
        from medadapt.model import ModelConfig, load_tokenizer

        return load_tokenizer(ModelConfig(name_or_path=name))
    trainer = getattr(datamodule, "trainer", None)
    module = getattr(trainer, "lightning_module", None) if trainer else None
    if getattr(module, "tokenizer", None) is None:
        raise ValueError("data.tokenizer is unset and there is no model to take it from")
    return module.tokenizer
