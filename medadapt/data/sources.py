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


class MalformedFileError(ValueError):
    """A data file that cannot be read as its format says: the message names the file and the line or byte."""


class DataSourceError(RuntimeError):
    """A hub dataset that cannot be reached, or a source that holds no rows."""


class DataFingerprint:
    """For data modules: what they feed a run (their settings, local files by content, a hub dataset by id), saved
    in every checkpoint (Lightning's datamodule ``state_dict``) and compared when a run resumes from one."""

    #: settings that do not change what the run trains on
    NOT_DATA = ("num_workers", "tokenizer")

    def fingerprint(self) -> dict:
        from medadapt.fingerprint import data_identity

        settings = {k: v for k, v in dict(self.hparams).items() if k not in self.NOT_DATA}
        return data_identity(settings.pop("dataset", None), settings.pop("data_files", None), **settings)

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """A resume onto other data (another file, other contents, another max_length or batch size) is an error:
        the checkpoint's schedule and data order belong to the data it was trained on."""
        from medadapt.fingerprint import differences

        recorded = state.get("fingerprint")
        current = self.fingerprint()
        if recorded is not None and recorded != current:
            raise ValueError(
                f"the checkpoint was written by a run on other data ({', '.join(differences(recorded, current))} "
                "differ): resuming would continue its schedule and data order on data it never saw. Start over "
                "(--overwrite true, without --ckpt_path), or give the run the data and settings it was trained with")


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
            where = [f if Path(f).is_absolute() else f"{f} (resolved against {Path.cwd()}: {Path(f).resolve()})"
                     for f in missing]
            raise FileNotFoundError(f"data file(s) not found: {'; '.join(where)}")
        suffixes = {Path(f).suffix.lower() for f in files}
        builders = {_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise ValueError(f"data_files must share one format among {sorted(_BUILDERS)}: got {sorted(suffixes)}")
        builder = builders.pop()
        for f in files:
            if builder != "parquet":
                check_text_file(f)
        try:
            rows = load_dataset(builder, data_files=files, split="train", **builder_kwargs)
        except Exception as e:  # datasets' own messages name neither file nor line
            for f in files:
                diagnose(f, builder)
            raise MalformedFileError(f"{', '.join(files)}: could not be read as {builder}: {root_cause(e)}") from e
    else:
        try:
            rows = load_dataset(dataset, name, split=split, revision=revision)
        except ConnectionError as e:
            raise DataSourceError(
                f"dataset {dataset!r} is not in the datasets cache and the hub is unreachable ({root_cause(e)}): "
                "download it where the hub is reachable, or point data_files at local copies") from e
    if len(rows) == 0:
        raise DataSourceError(f"{describe_source(dataset, data_files)} holds no rows")
    if max_rows is not None and max_rows < len(rows):
        rows = rows.select(range(max_rows))
    log.info("loaded %d rows from %s", len(rows), describe_source(dataset, data_files))
    return rows


def check_text_file(path: str, chunk: int = 1 << 24) -> None:
    """A text data file must be non-empty UTF-8: pyarrow reads invalid bytes without a word, so a Latin-1
    file would train on mangled text. Reads in chunks (about 1 GB/s)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    content = False
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                line = lines + block.count(b"\n", 0, e.start) + 1
                raise MalformedFileError(f"{path}: not UTF-8 text: byte {offset + e.start} (line {line}) is "
                                         f"{block[e.start:e.start + 1]!r}; save the file as UTF-8") from None
            content = content or bool(block.strip())
            offset += len(block)
            lines += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise MalformedFileError(f"{path}: not UTF-8 text: it ends inside a multi-byte character") from None
    if not content:
        raise DataSourceError(f"{path} is empty")


def diagnose(path: str, builder: str) -> None:
    """Name the line (JSON Lines) or line and column (JSON) where a file stops parsing; silent if it parses."""
    import json

    if builder != "json":
        return
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith(("[", "{")) and not path.endswith(".jsonl"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise MalformedFileError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
        if parsed in ([], {}):
            raise DataSourceError(f"{path} holds no rows (an empty JSON {type(parsed).__name__})")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise MalformedFileError(f"{path}: line {number}: invalid JSON ({e.msg}, column {e.colno})") from None


def root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def describe_source(dataset: str, data_files: Union[str, list[str], None]) -> str:
    if data_files:
        return data_files if isinstance(data_files, str) else ",".join(data_files)
    return dataset


def named_tokenizer(name: Optional[str], owner: str):
    """The tokenizer a data module was configured with by name, for use outside a training run; inside one the
    run connects the model's own (``connect``), so token ids always match the model."""
    if name is None:
        raise ValueError(f"{owner} has no tokenizer: the run connects the model's (data.connect(tokenizer)), "
                         "or set data.tokenizer to a tokenizer name or folder")
    from medadapt.model_config import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=name))
