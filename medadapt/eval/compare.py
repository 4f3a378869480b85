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


def load_run(directory: str) -> tuple[dict, dict]:
    d = Path(directory)
    results = json.loads((d / "results.json").read_text())
    preds = {(r["task"], r["id"]): r["acc"] for r in map(json.loads, open(d / "predictions.jsonl"))}
    return results, preds


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
            cells.append("–" if m is None else f"{100 * m['acc']:.1f} [{100 * m['acc_ci95'][0]:.1f}, {100 * m['acc_ci95'][1]:.1f}]")
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
    return p


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    runs, chance = {}, {}
    for spec in args.runs:
        name, _, directory = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if name in runs:
            raise SystemExit(f"two runs are named {name!r}: name them NAME=DIR so each is its own row")
        runs[name] = load_run(directory)
        chance.update(chance_levels(directory))
    baseline = args.baseline or next(iter(runs))
    if baseline not in runs:
        raise SystemExit(f"--baseline {baseline!r} is not among the runs {list(runs)}")
    table = build_table(runs, baseline)
    out = Path(args.out)
    md, png = out.with_name(out.name + ".md"), out.with_name(out.name + ".png")  # "run1.5" stays run1.5.md
    out.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    chart(runs, png, chance)
    print(table)
    print(f"wrote {md} and {png}")
