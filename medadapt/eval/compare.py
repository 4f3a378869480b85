"""``python -m medadapt compare DIR [DIR …] --baseline NAME``: methods × tasks with 95% CIs, paired tests, chart.

Each DIR is a test-stage ``results_dir`` (results.json + predictions.jsonl). The paired test is the
exact McNemar test on the items both runs scored: it asks whether a method flips more wrong answers to
right than right to wrong, which is far more sensitive than comparing two overlapping intervals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from medadapt.eval.report import Z95
from medadapt.files import write_atomic


class IncomparableRunsError(ValueError):
    """Runs that cannot be put in one table: another mode or protocol, or files that disagree."""


def load_run(directory: str) -> tuple[dict, dict]:
    """A run's results and its per-item correctness, every number recomputed from predictions.jsonl (per-task
    accuracy, intervals, macro averages, pass@1): results.json must agree with them, and a run whose results.json was
    edited (or belongs to other predictions) is refused rather than shown."""
    from medadapt.eval.report import summarize
    from medadapt.files import UnreadableFileError, read_json

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"run folder {d} not found (compare takes test-stage results_dir folders)")
    results = read_json(d / "results.json", "results")
    if not isinstance(results.get("tasks"), dict):
        raise UnreadableFileError(f"results {d / 'results.json'}: no 'tasks' record; is this a test-stage results.json?")
    preds, records = {}, []
    with open(d / "predictions.jsonl", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                r = json.loads(line)
                key, ok = (r["task"], r["id"]), float(r["acc"])
                r["pred"], r["gold"], r.setdefault("pred_norm", r["pred"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UnreadableFileError(f"predictions {d / 'predictions.jsonl'}: line {number} is not a prediction "
                                          "record (task, id, acc, pred, gold)") from None
            preds[key] = ok
            records.append(r)
    summary = summarize(records)
    recorded = results["tasks"]
    for task in sorted(set(recorded) | set(summary["tasks"])):
        m, got = recorded.get(task) or {}, summary["tasks"].get(task) or {}
        if abs(got.get("acc", -1) - m.get("acc", -2)) > 1e-9 or got.get("n") != m.get("n"):
            raise IncomparableRunsError(
                f"{d}: results.json says {task} acc {m.get('acc')} over {m.get('n')} items, its predictions.jsonl gives "
                f"{got.get('acc')} over {got.get('n', 0)}: the two files do not belong together (edited, or mixed up)")
    for key in ("macro_avg_acc", "macro_avg_pass@1"):
        if key in results and results[key] is not None and abs(results[key] - summary.get(key, float("nan"))) > 1e-9:
            raise IncomparableRunsError(f"{d}: results.json says {key} {results[key]}, its predictions.jsonl gives "
                                        f"{summary.get(key)}: results.json was edited")
    return {**results, **summary}, preds


def interval(ci) -> str:
    """" [low, high]" in percent, or "" when the interval is undefined (one item: no standard error)."""
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return ""
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def protocol(results: dict) -> dict:
    """How a run asked and read its answers: the mode and, in generative mode, the sampling protocol."""
    data = results.get("data") or {}
    gen = data.get("generation") or {}
    keys = ("temperature", "top_p", "samples", "max_new_tokens", "answer_budget", "open_think", "instruction")
    return {"mode": data.get("mode", "loglikelihood"), **{k: gen.get(k) for k in keys if k in gen}}


def check_comparable(runs: dict[str, tuple[dict, dict]]) -> None:
    protocols = {name: protocol(results) for name, (results, _) in runs.items()}
    if len({json.dumps(p, sort_keys=True) for p in protocols.values()}) > 1:
        listed = "; ".join(f"{n}: {p}" for n, p in protocols.items())
        raise IncomparableRunsError(f"these runs asked and read answers differently ({listed}): a paired test between "
                                    "them measures the protocol, not the method. Compare runs of one protocol, or "
                                    "--allow_mixed true to put them in one table anyway")


def run_spec(spec: str) -> tuple[str, str]:
    """``DIR`` (named by its folder) or ``NAME=DIR``; an existing folder is a folder whatever its name holds
    (``runs/lr=2e-4``)."""
    if Path(spec).is_dir() or "=" not in spec:
        return Path(spec).name, spec
    name, _, directory = spec.partition("=")
    if not name or "/" in name:
        raise SystemExit(f"{spec!r} is neither a results folder nor NAME=DIR")
    return name, directory


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (base right only) and c (method right only)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(base: dict, other: dict, task: str) -> tuple[int, int, int, float]:
    """On the items of ``task`` that both runs scored: (shared, b, c, p)."""
    keys = [k for k in base if k[0] == task and k in other]
    b = sum(1 for k in keys if base[k] and not other[k])
    c = sum(1 for k in keys if other[k] and not base[k])
    return len(keys), b, c, mcnemar_exact(b, c)


def mismatch_warning(runs: dict[str, tuple[dict, dict]]) -> list[str]:
    """Runs that scored different items cannot be compared item by item: say so at the top of the table."""
    prints = {name: results.get("data_fingerprint") for name, (results, _) in runs.items()}
    if len(set(prints.values())) <= 1:
        return []
    listed = ", ".join(f"{name}: `{fp}`" for name, fp in prints.items())
    return [f"**WARNING: these runs did not score the same items** (data fingerprints {listed}). Accuracies "
            "below are over different item sets; the paired tests use only the items both runs scored "
            "(column n).", ""]


def build_table(runs: dict[str, tuple[dict, dict]], baseline: str) -> str:
    tasks = sorted({t for results, _ in runs.values() for t in results["tasks"]})
    # generative runs: pass@1 and the share of replies the reader could not read, so a format effect shows
    generative = any("unparsable_rate" in results for results, _ in runs.values())
    extra = ["macro pass@1", "unparsable replies"] if generative else []
    head = "| method | " + " | ".join(tasks + ["macro avg"] + extra) + " |"
    lines = [*mismatch_warning(runs), head, "|" + "---|" * (len(tasks) + 2 + len(extra))]
    for name, (results, _) in runs.items():
        cells = []
        for t in tasks:
            m = results["tasks"].get(t)
            cells.append("–" if m is None else f"{100 * m['acc']:.1f}{interval(m.get('acc_ci95'))}")
        cells.append(f"{100 * results['macro_avg_acc']:.1f}")
        if generative:
            cells += [f"{100 * results['macro_avg_pass@1']:.1f}" if "macro_avg_pass@1" in results else "–",
                      f"{100 * results['unparsable_rate']:.1f}%" if "unparsable_rate" in results else "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired exact McNemar test against `{baseline}` on the items both runs scored (n; b = only "
              f"{baseline} right, c = only the method right):", ""]
    lines += ["| method | task | n | b | c | p |", "|---|---|---:|---:|---:|---:|"]
    base_preds = runs[baseline][1]
    for name, (_, preds) in runs.items():
        if name == baseline:
            continue
        for t in tasks:
            n, b, c, p = paired(base_preds, preds, t)
            lines.append(f"| {name} | {t} | {n} | {b} | {c} | {p:.3g} |" if n else f"| {name} | {t} | 0 | – | – | – |")
    return "\n".join(lines) + "\n"


def chance_levels(directory: str) -> dict[str, float]:
    """Per task, the accuracy of a uniform guess: the mean of 1/choices over its items (25% for four options,
    33% for PubMedQA's yes/no/maybe)."""
    sums: dict[str, list[float]] = {}
    for r in map(json.loads, open(Path(directory) / "predictions.jsonl")):
        choices = r.get("n_choices") or len(r.get("loglikelihoods") or [])
        if choices:
            sums.setdefault(r["task"], []).append(1 / choices)
    return {t: sum(v) / len(v) for t, v in sums.items()}


def task_label(task: str, width: int = 12) -> str:
    """A task name wrapped on its underscores so that neighbouring labels do not overlap."""
    import textwrap

    return "\n".join(textwrap.wrap(task.replace("_", " "), width=width, break_long_words=False))


def chart(runs: dict[str, tuple[dict, dict]], path: Path, chance: dict[str, float]) -> None:
    """Bars per task and for the macro average, 95% CIs, and each task's chance level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for results, _ in runs.values() for t in results["tasks"]})
    groups = tasks + ["macro average"]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(8, 1.25 * len(groups)), 4.8))
    for i, (name, (results, _)) in enumerate(runs.items()):
        accs = [100 * results["tasks"].get(t, {}).get("acc", float("nan")) for t in tasks]
        errs = [100 * Z95 * (results["tasks"].get(t, {}).get("acc_stderr") or float("nan")) for t in tasks]
        ax.bar([x + i * width for x in range(len(groups))], accs + [100 * results["macro_avg_acc"]], width,
               yerr=errs + [float("nan")], capsize=2, label=name)
    levels = [chance.get(t) for t in tasks]
    known = [c for c in levels if c is not None]
    levels.append(sum(known) / len(known) if known else None)
    for x, level in enumerate(levels):
        if level is not None:
            ax.hlines(100 * level, x - 0.5 * width, x + 0.8 - 0.5 * width, colors="black", linestyles="dashed",
                      linewidth=1, label="chance" if x == 0 else None)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels([task_label(t) for t in groups], fontsize=8)
    ax.set_ylabel("accuracy (%) with 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser():
    from typing import Optional

    from medadapt.console import command_parser

    p = command_parser("compare", __doc__)
    p.add_argument("runs", type=str, nargs="+", help="results directories; NAME=DIR names a run (default: folder name)")
    p.add_argument("--baseline", type=Optional[str], default=None,
                   help="the run the paired tests compare against (default: the first)")
    p.add_argument("--out", type=str, default="results/comparison", help="writes OUT.md and OUT.png")
    p.add_argument("--allow_mixed", type=bool, default=False,
                   help="put runs of different modes or generation protocols in one table (marked) instead of refusing")
    return p


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    runs, chance = {}, {}
    for spec in args.runs:
        name, directory = run_spec(spec)
        if name in runs:
            raise SystemExit(f"two runs are named {name!r}: name them NAME=DIR so each is its own row")
        runs[name] = load_run(directory)
        chance.update(chance_levels(directory))
    baseline = args.baseline or next(iter(runs))
    if baseline not in runs:
        raise SystemExit(f"--baseline {baseline!r} is not among the runs {list(runs)}")
    mixed = []
    try:
        check_comparable(runs)
    except IncomparableRunsError as e:
        if not args.allow_mixed:
            raise
        mixed = [f"**WARNING (--allow_mixed): {e}**", ""]
    table = "\n".join(mixed) + build_table(runs, baseline)
    out = Path(args.out)
    md, png = out.with_name(out.name + ".md"), out.with_name(out.name + ".png")  # "run1.5" stays run1.5.md
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(md, table)
    chart(runs, png, chance)
    print(table)
    print(f"wrote {md} and {png}")
