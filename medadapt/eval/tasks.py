"""The nine Open Medical-LLM leaderboard tasks as uniform items, with lm-evaluation-harness's prompts.

Each task loads from the hub dataset lm-eval itself reads, or from local files in the formats of
``shared/data/benchmarks`` (MIRAGE / PubMedQA repository layouts), and both land in the same
normalizer. Prompts are byte-identical to lm-eval 0.4's task definitions (tests/eval/test_scoring.py runs
lm-eval on every task and compares its prompts, log-likelihoods and predictions with ours).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

LETTERS = ["A", "B", "C", "D"]  # the built-in tasks have four options
OPTION_LETTERS = list("ABCDEFGHIJ")  # custom tasks: 2 to 10
MMLU_SUBJECTS = ["anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                 "professional_medicine"]
TASKS = ["medqa_4options", "medmcqa", "pubmedqa"] + [f"mmlu_{s}" for s in MMLU_SUBJECTS]
#: items in each leaderboard test set; a copy of another size is incomplete or another version
EXPECTED_SIZES = {"medqa_4options": 1273, "medmcqa": 4183, "pubmedqa": 500, "mmlu_anatomy": 135,
                  "mmlu_clinical_knowledge": 265, "mmlu_college_biology": 144, "mmlu_college_medicine": 173,
                  "mmlu_medical_genetics": 100, "mmlu_professional_medicine": 272}


class MalformedItemError(ValueError):
    """A benchmark item that cannot be scored; the message names file and item."""


@dataclass
class Item:
    """One benchmark question, ready to score: ``prompt`` + ``" " + choices[i]`` for each i."""

    task: str
    id: str
    prompt: str
    choices: list[str]
    gold: int
    question: str = ""  # the bare question, for retrieval and decontamination
    options: list[str] = field(default_factory=list)  # option texts (MCQ), for answer extraction
    passages: list[str] = field(default_factory=list)  # given context (PubMedQA abstract)
    context: str = ""  # retrieved snippets (RAG arm), already at the start of ``prompt``
    extra: dict[str, Any] = field(default_factory=dict)  # stored with the item's prediction


# ---- prompts (lm-eval 0.4 task definitions) -------------------------------------------------------
def option_lines(options: list[str]) -> str:
    """``A. …\nB. …\n``: one line per option, as every lm-eval multiple-choice template lists them."""
    return "".join(f"{k}. {v}\n" for k, v in zip(OPTION_LETTERS, options))


def medqa_prompt(question: str, options: list[str]) -> str:
    return f"Question: {question}\n{option_lines(options)}Answer:"


def medmcqa_prompt(question: str, options: list[str]) -> str:
    return "Question: " + question + "\nChoices:\n" + option_lines(options) + "Answer:"


def pubmedqa_prompt(question: str, contexts: list[str]) -> str:
    return "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(contexts), question)


def mmlu_prompt(subject: str, question: str, options: list[str]) -> str:
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return description + question.strip() + "\n" + option_lines(options) + "Answer:"


# ---- loaders: hub and local, one normalizer each --------------------------------------------------
def _check(source: str, key: str, options: list, gold: int, question) -> None:
    if not isinstance(question, str) or not question.strip():
        raise MalformedItemError(f"{source}: item {key}: question is missing or empty")
    for letter, opt in zip(LETTERS, options):
        if not isinstance(opt, str) or not opt.strip():
            raise MalformedItemError(f"{source}: item {key}: option {letter} is missing or empty")
    if not isinstance(gold, int) or not 0 <= gold < len(options):
        raise MalformedItemError(f"{source}: item {key}: answer {gold!r} is not among the {len(options)} options")


def _rows(path: Optional[str], hub: tuple, **csv_kwargs):
    from medadapt.data.sources import load_rows

    if path is not None:
        return load_rows(path, data_files=path, **csv_kwargs)
    dataset, name, split = hub
    return load_rows(dataset, name, split)


def load_medqa(path: Optional[str]) -> list[Item]:
    items = []
    source = path or "GBaker/MedQA-USMLE-4-options-hf"
    for i, r in enumerate(_rows(path, ("GBaker/MedQA-USMLE-4-options-hf", None, "test"))):
        if "sent1" in r:  # hub layout
            question, options, gold = r["sent1"], [r.get(f"ending{k}") for k in range(4)], r.get("label")
        else:  # MIRAGE layout: options {A..D}, answer_idx letter
            opts = r.get("options") or {}
            question, options = r.get("question"), [opts.get(k) for k in LETTERS]
            gold = LETTERS.index(r["answer_idx"]) if r.get("answer_idx") in LETTERS else r.get("answer_idx")
        _check(source, str(i), options, gold, question)
        items.append(Item("medqa_4options", str(i), medqa_prompt(question, options), LETTERS, gold, question, options))
    return items


def load_medmcqa(path: Optional[str]) -> list[Item]:
    """``cop`` is 0-based on the hub (openlifescienceai/medmcqa) and 1-based in the MIRAGE files."""
    items = []
    source = path or "openlifescienceai/medmcqa"
    base = 1 if path is not None else 0
    for i, r in enumerate(_rows(path, ("openlifescienceai/medmcqa", None, "validation"))):
        options = [r.get(k) for k in ("opa", "opb", "opc", "opd")]
        cop = r.get("cop")
        gold = cop - base if isinstance(cop, int) else cop
        key = r.get("id") or str(i)
        _check(source, key, options, gold, r.get("question"))
        items.append(Item("medmcqa", key, medmcqa_prompt(r["question"], options), LETTERS, gold, r["question"],
                          options))
    return items


PUBMEDQA_CHOICES = ["yes", "no", "maybe"]


def load_pubmedqa(path: Optional[str]) -> list[Item]:
    """Hub: bigbio/pubmed_qa fold0 test. Local: ``pubmedqa_ori_pqal.json`` restricted to the ids of the
    ``pubmedqa_test_ground_truth.json`` beside it (the official 500-question test set)."""
    items = []
    if path is not None:
        source = path
        from medadapt.files import read_json

        docs = read_json(path, "PubMedQA abstracts")
        truth_file = Path(path).with_name("pubmedqa_test_ground_truth.json")
        if not truth_file.exists():
            raise FileNotFoundError(f"{truth_file} (the 500 PubMedQA test ids) must sit beside {path}")
        truth = read_json(truth_file, "PubMedQA test answers")
        missing = [k for k in truth if k not in docs]
        if missing:
            raise MalformedItemError(f"{path}: test ids missing from the file, e.g. {missing[:3]}")
        rows = [{"id": k, **docs[k], "final_decision": truth[k]} for k in truth]
    else:
        source = "bigbio/pubmed_qa"
        rows = _rows(None, ("bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source", "test"))
    for i, r in enumerate(rows):
        key = str(r.get("id") or r.get("PUBMED_ID") or i)
        contexts = r.get("CONTEXTS")
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            raise MalformedItemError(f"{source}: item {key}: CONTEXTS is not a list of text")
        decision = r.get("final_decision")
        gold = PUBMEDQA_CHOICES.index(decision) if decision in PUBMEDQA_CHOICES else decision
        _check(source, key, PUBMEDQA_CHOICES, gold, r.get("QUESTION"))
        items.append(Item("pubmedqa", key, pubmedqa_prompt(r["QUESTION"], contexts), PUBMEDQA_CHOICES, gold,
                          r["QUESTION"], passages=contexts))
    return items


def load_mmlu(subject: str, path: Optional[str]) -> list[Item]:
    """Hub: cais/mmlu (choices list, integer answer). Local: MIRAGE CSV without header, letter answer."""
    items = []
    task = f"mmlu_{subject}"
    source = path or f"cais/mmlu/{subject}"
    columns = {"column_names": ["question", "A", "B", "C", "D", "answer"]} if path else {}
    rows = _rows(path, ("cais/mmlu", subject, "test"), **columns)
    for i, r in enumerate(rows):
        if "choices" in r:
            options, gold = list(r["choices"]), r["answer"]
        else:
            options = [r.get(k) for k in LETTERS]
            gold = LETTERS.index(r["answer"]) if r.get("answer") in LETTERS else r.get("answer")
        _check(source, str(i), options, gold, r.get("question"))
        items.append(Item(task, str(i), mmlu_prompt(subject, r["question"], options), LETTERS, gold, r["question"],
                          options))
    return items


LOCAL_FILES = {
    "medqa_4options": "medqa_us_4options_test.jsonl",
    "medmcqa": "medmcqa_dev.jsonl",
    "pubmedqa": "pubmedqa_ori_pqal.json",
    **{f"mmlu_{s}": f"mmlu/{s}_test.csv" for s in MMLU_SUBJECTS},
}


class IncompleteBenchmarkError(ValueError):
    """A benchmark copy whose item count differs from the leaderboard's test set."""


def load_task(task: str, local_dir: Optional[str] = None, allow_partial: bool = False) -> list[Item]:
    """Items of one task, from ``local_dir`` (the shared/data/benchmarks layout) or the hub.

    A copy with another number of items than the leaderboard's test set (a file cut short, another
    version) would silently change which items a seeded subset draws: it is an error unless
    ``allow_partial``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    path = str(Path(local_dir) / LOCAL_FILES[task]) if local_dir else None
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{path} not found (expected the layout of shared/data/benchmarks)")
    loaders: dict[str, Callable[[Optional[str]], list[Item]]] = {
        "medqa_4options": load_medqa, "medmcqa": load_medmcqa, "pubmedqa": load_pubmedqa}
    items = loaders[task](path) if task in loaders else load_mmlu(task[len("mmlu_"):], path)
    expected = EXPECTED_SIZES[task]
    if len(items) != expected:
        message = (f"{path or task}: {task} has {len(items)} items, the leaderboard's test set has {expected}: the "
                   "copy is incomplete or another version")
        if not allow_partial:
            raise IncompleteBenchmarkError(message + "; set data.allow_partial: true to evaluate it anyway")
        log.warning("%s (allow_partial)", message)
    return items


def select(items: list[Item], limit: Optional[int], seed: int, draw: str = "sample") -> list[Item]:
    """``limit`` items in their original order (all when ``limit`` is None): a seeded random sample (``draw:
    sample``, every part of the set represented) or the first ``limit`` (``draw: first``, what lm-eval's
    ``--limit`` takes: the same items as an lm-eval run with the same limit)."""
    if limit is None or limit >= len(items):
        return items
    if draw == "first":
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
