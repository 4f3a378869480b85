"""``python -m medadapt decontaminate``: which training rows repeat benchmark questions, and a cleaned copy.

A row is contaminated when one of its text fields contains at least ``threshold`` of the word n-grams
of a single benchmark question: the share is measured on the benchmark item, so a question pasted into
a longer prompt or reasoning text still scores 1.0, while a row that merely shares stock phrases
("a 45-year-old man presents with") with many questions scores low against each one of them. On the
198-row o1-reasoning sample the three rows copied from MedMCQA score 1.0 and the next row 0.36
(8-grams; default threshold 0.5).
Questions shorter than n words match only a field that is that question, word for word (a
three-word question inside a paragraph is not evidence of a copy).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from medadapt.eval.tasks import TASKS, Item, load_task
from medadapt.files import write_json

log = logging.getLogger(__name__)
WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class Finding:
    """One contaminated training row: which field matched which benchmark item, and how much."""

    row: int
    field: str
    overlap: float
    task: str
    item_id: str
    item_question: str


class BenchmarkIndex:
    """Word n-grams of every benchmark question, mapped to the items they occur in."""

    def __init__(self, items: list[Item], n: int = 8):
        self.n, self.items = n, items
        self.grams: dict[tuple[str, ...], set[int]] = defaultdict(set)
        self.sizes: list[int] = []
        for i, item in enumerate(items):
            grams = ngrams(words(item.question or item.prompt), n)
            self.sizes.append(len(grams))
            for g in grams:
                self.grams[g].add(i)

    def best_match(self, text: str) -> tuple[float, Optional[Item]]:
        """The item whose n-grams ``text`` contains the largest share of, and that share."""
        grams = ngrams(words(text), self.n)
        counts = Counter(i for g in grams for i in self.grams.get(g, ()))
        if not counts:
            return 0.0, None
        best, share = min(((i, c / self.sizes[i]) for i, c in counts.items()), key=lambda kv: (-kv[1], kv[0]))
        return share, self.items[best]


def text_fields(row: dict, fields: Optional[list[str]]) -> Iterable[tuple[str, str]]:
    """(field, text) pairs to check: the named fields, or every string field of the row."""
    for key in fields if fields else sorted(row):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            yield key, value


def scan(rows, index: BenchmarkIndex, fields: Optional[list[str]] = None, threshold: float = 0.5) -> list[Finding]:
    findings = []
    for r, row in enumerate(rows):
        best: Optional[Finding] = None
        for key, text in text_fields(row, fields):
            share, item = index.best_match(text)
            if item is not None and share >= threshold and (best is None or share > best.overlap):
                best = Finding(r, key, round(share, 4), item.task, item.id, item.question[:200])
        if best is not None:
            findings.append(best)
    return findings


def build_parser():
    from typing import Optional

    from medadapt.console import command_parser

    p = command_parser("decontaminate", __doc__)
    p.add_argument("data_files", type=str, nargs="*", help="local training files (JSON array, JSONL, parquet, CSV)")
    p.add_argument("--dataset", type=Optional[str], default=None,
                   help="a hub dataset instead of local files, e.g. FreedomIntelligence/medical-o1-reasoning-SFT")
    p.add_argument("--name", type=Optional[str], default=None, help="hub dataset configuration (e.g. en)")
    p.add_argument("--split", type=str, default="train", help="hub split")
    p.add_argument("--max_rows", type=Optional[int], default=None,
                   help="check only the first N rows (as training would read them)")
    p.add_argument("--fields", type=Optional[list[str]], default=None, help="text fields to check (default: every string field)")
    p.add_argument("--tasks", type=list[str], default=TASKS, help="benchmark tasks (default: all nine)")
    p.add_argument("--local_dir", type=Optional[str], default=None,
                   help="benchmarks folder in the shared/data/benchmarks layout (default: hub)")
    p.add_argument("--ngram", type=int, default=8, help="n of the word n-grams")
    p.add_argument("--threshold", type=float, default=0.5, help="flag a row when this share of a field's n-grams is in one item")
    p.add_argument("--report", type=str, default="results/decontamination.json", help="where the JSON report goes")
    p.add_argument("--write_clean", type=Optional[str], default=None, help="write the rows that are not flagged here (JSONL)")
    return p


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_files and not args.dataset:
        parser.error("give training files or --dataset")

    from medadapt.data.sources import describe_source, load_rows

    source = describe_source(args.dataset or "", args.data_files or None)
    rows = load_rows(args.dataset or "", args.name, args.split, args.data_files or None, max_rows=args.max_rows)
    items = [it for task in args.tasks for it in load_task(task, args.local_dir)]
    findings = scan(rows, BenchmarkIndex(items, args.ngram), args.fields, args.threshold)
    per_task = Counter(f.task for f in findings)
    report = {"source": source, "rows": len(rows), "flagged": len(findings), "per_task": dict(per_task),
              "ngram": args.ngram, "threshold": args.threshold, "tasks": args.tasks,
              "findings": [asdict(f) for f in findings]}
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report, indent=2, ensure_ascii=False)
    print(f"{len(findings)} of {len(rows)} rows of {source} overlap a benchmark question "
          f"({args.ngram}-grams, threshold {args.threshold}): {dict(per_task) or 'none'}")
    for f in findings:
        print(f"  row {f.row} [{f.field}] {f.overlap:.2f} ~ {f.task} {f.item_id}: {f.item_question[:80]!r}")
    if args.write_clean:
        flagged = {f.row for f in findings}
        clean = Path(args.write_clean)
        clean.parent.mkdir(parents=True, exist_ok=True)
        with open(clean, "w") as fh:
            for r, row in enumerate(rows):
                if r not in flagged:
                    fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        print(f"wrote {len(rows) - len(flagged)} clean rows to {clean}")
    print(f"report: {out}")
