"""Per-task metrics with 95% confidence intervals, and the files a test run leaves behind.

The interval is lm-eval's: acc ± 1.96 × the sample standard error (ddof 1), so our numbers and the
harness's can be put side by side. Accuracy is a count ratio over the gathered, de-duplicated items, computed
in Python floats (float64): torchmetrics returns float32, which wrote 2/5 as 0.4000000059604645.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any


from medadapt.files import dumps, write_atomic

log = logging.getLogger(__name__)
Z95 = 1.96  # two-sided 95% normal quantile, as lm-eval reports intervals


def task_metrics(records: list[dict]) -> dict[str, Any]:
    """acc / acc_norm with lm-eval's stderr and 95% CI. An unparsable generative answer (pred -1) counts as
    wrong without being dropped from the denominator. Generative records add pass@1 (mean over each item's
    replies, CI over items), unparsable/forced/cut reply counts, generated tokens and the reader's parse paths."""
    n = len(records)
    out: dict[str, Any] = {"n": n}
    for key, pred_key in (("acc", "pred"), ("acc_norm", "pred_norm")):
        acc = sum(r[pred_key] == r["gold"] for r in records) / n  # an unparsable answer (-1) is never gold
        stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
        out[key] = acc
        out[f"{key}_stderr"] = stderr
        out[f"{key}_ci95"] = [acc - Z95 * stderr, acc + Z95 * stderr]
    if any(r.get("loglikelihoods") is None for r in records):  # generative: replies the reader could not read
        out["unparsable"] = sum(int(r.get("unparsable") or 0) for r in records)
    if any("pass1" in r for r in records):  # per-reply counts, pass@1 over the replies
        replies = sum(r["samples"] for r in records)
        per_item = [r["pass1"] for r in records]
        mean = sum(per_item) / n
        stderr = math.sqrt(sum((x - mean) ** 2 for x in per_item) / (n - 1) / n) if n > 1 else float("nan")
        out.update({"pass@1": mean, "pass@1_stderr": stderr, "pass@1_ci95": [mean - Z95 * stderr, mean + Z95 * stderr],
                    "samples_per_item": records[0]["samples"], "replies": replies,
                    "unparsable_rate": out["unparsable"] / replies,
                    "forced": sum(r.get("forced", 0) for r in records), "cut": sum(r.get("cut", 0) for r in records),
                    "generated_tokens": sum(r.get("tokens", 0) for r in records),
                    "parse_paths": dict(sorted(Counter(x.get("parse", "unknown") for r in records
                                                       for x in r.get("replies", [])).items()))})
    return out


def summarize(records: list[dict]) -> dict[str, Any]:
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    tasks = {t: task_metrics(rs) for t, rs in sorted(by_task.items())}
    total = sum(m["n"] for m in tasks.values())
    out = {
        "tasks": tasks,
        "macro_avg_acc": sum(m["acc"] for m in tasks.values()) / len(tasks) if tasks else float("nan"),
        "weighted_avg_acc": sum(m["acc"] * m["n"] for m in tasks.values()) / total if total else float("nan"),
        "n": total,
    }
    if tasks and all("pass@1" in m for m in tasks.values()):
        replies = sum(m["replies"] for m in tasks.values())
        out.update({"macro_avg_pass@1": sum(m["pass@1"] for m in tasks.values()) / len(tasks),
                    "unparsable_rate": sum(m["unparsable"] for m in tasks.values()) / replies,
                    "forced_rate": sum(m["forced"] for m in tasks.values()) / replies})
    return out


def fingerprint(items) -> str:
    """Which items were scored (task, id, question, choices, gold), not how they were asked: the RAG arm's
    prompts differ from the base's, its items do not."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda it: (it.task, it.id)):
        h.update(json.dumps([it.task, it.id, it.question, it.choices, it.gold], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """Config dataclasses (e.g. the RAG arm's) as plain dicts in the provenance."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


class ResultsBusyError(RuntimeError):
    """Another run is writing the same results folder."""


def lock_results(directory: str):
    """Take a results folder for one run: a held ``FileLock``, or a clear error naming the folder when another
    run holds it (two runs writing one folder would interleave their files). Release it after writing."""
    from medadapt.files import lock_folder

    return lock_folder(directory, f"results_dir {directory} is being written by another run; give this run its own "
                                  "model.results_dir", ResultsBusyError)


def set_aside_previous(directory: str) -> None:
    """At the start of a run: an earlier run's results.json and predictions.jsonl move to ``previous/`` (logged),
    so that a run which fails or scores nothing never leaves them looking like its own."""
    path = Path(directory)
    if not (path / "results.json").exists():
        return
    from medadapt.files import output_folder

    previous = output_folder(path / "previous", "the folder earlier results are set aside in")
    when = datetime.fromtimestamp((path / "results.json").stat().st_mtime).isoformat(timespec="seconds")
    for name in ("results.json", "predictions.jsonl"):
        if (path / name).exists():
            (path / name).replace(previous / name)
    log.warning("moved the results in %s (written %s) to %s: this run writes its own", path, when, previous)


def write_results(directory: str, summary: dict, records: list[dict], meta: dict) -> Path:
    """predictions.jsonl, then results.json, each written whole or not at all: a results.json that exists
    belongs to the predictions beside it. Replacing an earlier run's results is logged."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "results.json").exists():
        log.warning("replacing the results in %s (written %s)", path,
                    datetime.fromtimestamp((path / "results.json").stat().st_mtime).isoformat(timespec="seconds"))
        (path / "results.json").unlink()
    lines = [dumps(r, ensure_ascii=False) for r in sorted(records, key=lambda r: (r["task"], r["id"]))]
    write_atomic(path / "predictions.jsonl", "".join(line + "\n" for line in lines))
    # strict JSON: an undefined interval (one item) is null, never NaN
    write_atomic(path / "results.json", dumps(json.loads(json.dumps({**meta, **summary}, default=_jsonable)), indent=2))
    return path / "results.json"
