"""Your own multiple-choice benchmark, evaluated like the nine built-ins.

A ``CustomTask`` maps the fields of a local JSON/JSONL/CSV/parquet file (or a hub dataset) onto items:
the question; the options as a list, a dict keyed by letter, or one column each; the answer as a letter,
an index or the option's text. 2 to 10 options. The prompt is lm-eval's MedQA layout ("Question: …", one
"A. …" line per option, "Answer:"), optionally under an MMLU-style description line, so both the
log-likelihood and the generative modes, the reader, ``results.json`` and ``compare`` treat it as they
treat MedQA. Malformed rows name file, row and field (or are counted with ``on_bad_row: skip``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from medadapt.eval.tasks import OPTION_LETTERS, TASKS, Item, MalformedItemError, medqa_prompt

log = logging.getLogger(__name__)


@dataclass
class CustomTask:
    """A multiple-choice task from your own data.

    Args:
        name: The task's name in results and tables (letters, digits, ``_``; not a built-in name).
        data_files: Local JSON array / JSONL / CSV / parquet file(s); or null with ``dataset``.
        dataset: Hub dataset id, when ``data_files`` is null.
        subset: Hub dataset configuration.
        split: Hub split.
        revision: Hub revision.
        question_field: Field holding the question.
        options_field: Field holding the options: a list (``["…", "…"]``) or a dict keyed by letter
            (``{"A": "…", "B": "…"}``). Null when ``option_fields`` names one column per option.
        option_fields: One column per option, in order (e.g. ``[opa, opb, opc, opd]``).
        answer_field: Field holding the answer.
        answer_format: ``letter`` (A–J, any case), ``index`` (0-based), ``index1`` (1-based), ``text`` (an
            option's text), or ``auto``: an integer is a 0-based index, a lone letter a letter, else text.
        id_field: Field with an item id (default: the row number).
        description: A line before every question, as MMLU has ("The following are multiple choice
            questions (with answers) about cardiology.").
        on_bad_row: ``error`` stops at the first malformed row, naming file, row and field; ``skip``
            counts and logs them.
    """

    name: str
    data_files: Union[str, list[str], None] = None
    dataset: Optional[str] = None
    subset: Optional[str] = None
    split: str = "test"
    revision: Optional[str] = None
    question_field: str = "question"
    options_field: Optional[str] = "options"
    option_fields: Optional[list[str]] = None
    answer_field: str = "answer"
    answer_format: Literal["auto", "letter", "index", "index1", "text"] = "auto"
    id_field: Optional[str] = None
    description: Optional[str] = None
    on_bad_row: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.name) or self.name in TASKS:
            raise ValueError(f"custom task name {self.name!r} must be letters, digits and _, and not a built-in task")
        if not self.data_files and not self.dataset:
            raise ValueError(f"custom task {self.name!r}: give data_files or a hub dataset")
        if (self.options_field is None) == (not self.option_fields):
            raise ValueError(f"custom task {self.name!r}: give options_field or option_fields (one of them)")


def custom_prompt(description: Optional[str], question: str, options: list[str]) -> str:
    """MedQA's prompt, under the task's description line when it has one."""
    head = f"{description.strip()}\n\n" if description else ""
    return head + medqa_prompt(question.strip(), options)


def _options(task: CustomTask, row: dict[str, Any], where: str) -> list:
    if task.option_fields:
        return [row.get(f) for f in task.option_fields]
    raw = row.get(task.options_field)
    if isinstance(raw, str) and raw.strip()[:1] in "{[":  # a dict or list written as text (the o1 sample does)
        import ast

        try:
            raw = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            raise MalformedItemError(f"{where}: field {task.options_field!r} is text that is not a list or dict "
                                     "of options") from None
    if isinstance(raw, dict):
        keys = sorted(raw, key=str)
        if [str(k).upper() for k in keys] != OPTION_LETTERS[: len(keys)]:
            raise MalformedItemError(f"{where}: field {task.options_field!r} is keyed {keys}, not A, B, C, …")
        return [raw[k] for k in keys]
    if isinstance(raw, (list, tuple)):
        return list(raw)
    raise MalformedItemError(f"{where}: field {task.options_field!r} is "
                             f"{'missing' if raw is None else type(raw).__name__}, not a list or a dict of options")


def _auto_format(task: CustomTask, answer: Any, options: list[str], where: str) -> str:
    """How ``answer_format: auto`` reads this answer; an answer that two readings would map to different options
    (options that are themselves letters or numbers) is an error naming the row, field and setting."""
    readings = {}
    if isinstance(answer, int) and not isinstance(answer, bool):
        readings["index"] = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in OPTION_LETTERS[: len(options)]:
        readings["letter"] = OPTION_LETTERS.index(answer.strip().upper())
    texts = [i for i, o in enumerate(options) if o.strip().lower() == str(answer).strip().lower()]
    if len(texts) == 1:
        readings["text"] = texts[0]
    if len(set(readings.values())) > 1:
        raise MalformedItemError(
            f"{where}: field {task.answer_field!r} = {answer!r} reads as " + ", ".join(
                f"option {OPTION_LETTERS[i] if 0 <= i < len(options) else i} as {k}" for k, i in readings.items())
            + f": ambiguous; set the task's answer_format to {' or '.join(repr(k) for k in readings)}")
    return next(iter(readings), "text")


def _gold(task: CustomTask, answer: Any, options: list[str], where: str) -> int:
    fmt = task.answer_format
    if fmt == "auto":
        fmt = _auto_format(task, answer, options, where)
    try:
        if fmt == "letter":
            gold = OPTION_LETTERS.index(str(answer).strip().upper())
        elif fmt in ("index", "index1"):
            gold = int(answer) - (fmt == "index1")
        else:
            matches = [i for i, o in enumerate(options) if o.strip().lower() == str(answer).strip().lower()]
            gold = matches[0] if len(matches) == 1 else -1
    except (ValueError, TypeError):
        gold = -1
    if not 0 <= gold < len(options):
        raise MalformedItemError(f"{where}: field {task.answer_field!r} = {answer!r} is not one of the "
                                 f"{len(options)} options (answer_format: {task.answer_format})")
    return gold


def load_custom(task: CustomTask) -> list[Item]:
    """The task's items; malformed rows raise (naming file, row and field) or are counted (``skip``)."""
    from medadapt.data.sources import describe_source, load_rows

    source = describe_source(task.dataset or "", task.data_files)
    rows = load_rows(task.dataset or "", task.subset, task.split, task.data_files, task.revision)
    items, bad, ids = [], [], {}
    for i, row in enumerate(rows):
        key = str(row.get(task.id_field)) if task.id_field and row.get(task.id_field) is not None else str(i)
        where = f"{source}: row {i}"
        try:
            question = row.get(task.question_field)
            if not isinstance(question, str) or not question.strip():
                raise MalformedItemError(f"{where}: field {task.question_field!r} is missing or empty")
            options = _options(task, row, where)
            if not 2 <= len(options) <= len(OPTION_LETTERS):
                raise MalformedItemError(f"{where}: {len(options)} options; a task has 2 to {len(OPTION_LETTERS)}")
            seen: dict[str, str] = {}
            for letter, option in zip(OPTION_LETTERS, options):
                if not isinstance(option, str) or not option.strip():
                    raise MalformedItemError(f"{where}: option {letter} is missing or empty")
                norm = " ".join(option.lower().split())
                if norm in seen:  # two identical options: whichever is gold, the other is as right
                    raise MalformedItemError(f"{where}: options {seen[norm]} and {letter} are the same text "
                                             f"({option.strip()!r})")
                seen[norm] = letter
            gold = _gold(task, row.get(task.answer_field), options, where)
            if key in ids:
                raise MalformedItemError(f"{where}: id {key!r} (field {task.id_field!r}) is also row {ids[key]}'s: "
                                         "ids must be unique, or two items merge into one")
            ids[key] = i
        except MalformedItemError as e:
            if task.on_bad_row == "error":
                raise
            bad.append(str(e))
            continue
        items.append(Item(task.name, key, custom_prompt(task.description, question, options),
                          OPTION_LETTERS[: len(options)], gold, question.strip(), options))
    if bad:
        for message in bad[:5]:
            log.warning("skipped: %s", message)
        log.warning("%s: skipped %d malformed rows of %d", source, len(bad), len(rows))
    if not items:
        raise MalformedItemError(f"{source}: custom task {task.name!r} has no usable item")
    return items
