"""The benchmark harness the test stage calls: score or generate per batch, then summarize and write.

The LightningModule only forwards to it (``test_step`` → ``step``; the epoch's end → ``finish``): every
batch carries what scoring it needs (its rows with their items, the mode, the generation settings, the
data settings for the record), so nothing here reads the Trainer's data module, and the same harness runs
under one process or DDP.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

from medadapt.eval.report import fingerprint, summarize, write_results

log = logging.getLogger(__name__)


class NonFiniteScoreError(ValueError):
    """The evaluated model gave NaN or infinite log-likelihoods: there is no score to report."""


class BenchmarkHarness:
    """Records of one test epoch on one rank."""

    def __init__(self):
        self.records: list[dict] = []
        self.items: list = []
        self.settings: Optional[dict] = None
        self._deferred: list = []  # vLLM rows: generated all at once at the end
        self._generation = None

    def step(self, model, tokenizer, batch: dict) -> None:
        self.settings = batch["settings"]
        if batch["mode"] == "generate":
            self._generate(model, tokenizer, batch)
        else:
            self._score(model, batch)

    def _score(self, model, batch: dict) -> None:
        from medadapt.eval.scoring import decide, forward_rows, score_rows

        scored = list(score_rows(forward_rows(model, batch), batch["rows"]))
        broken = [f"{item.task}/{item.id}" for item, per_choice in scored
                  if not all(math.isfinite(per_choice[c][0]) for c in range(len(item.choices)))]
        if broken:  # a NaN scored as "the lowest" would pick a choice for the weights' failure
            raise NonFiniteScoreError(
                f"non-finite log-likelihoods for {len(broken)} item(s) ({', '.join(broken[:5])}"
                f"{', …' if len(broken) > 5 else ''}): the evaluated weights (or the precision) give NaN/inf logits; "
                "nothing is scored from them")
        for item, per_choice in scored:
            lls = [per_choice[c][0] for c in range(len(item.choices))]
            self._add(item, {"loglikelihoods": lls, "is_greedy": [per_choice[c][1] for c in range(len(item.choices))],
                             **decide(item, lls)})

    def _generate(self, model, tokenizer, batch: dict) -> None:
        from medadapt.eval.generative import generate

        if batch["generation"].backend == "vllm":
            self._deferred += batch["gen_rows"]
            self._generation = batch["generation"]
            return
        self.add_replies(batch["gen_rows"], generate(model, tokenizer, batch))

    def add_replies(self, rows: list, replies: list) -> None:
        from medadapt.eval.generative import decide_generated

        for row, answers in zip(rows, replies):
            self._add(row.item, {"loglikelihoods": None, **decide_generated(row.item, answers, row.thinking)})

    def _add(self, item, scored: dict) -> None:
        self.items.append(item)
        self.records.append({"task": item.task, "id": item.id, "gold": item.gold, "n_choices": len(item.choices),
                             **scored, **item.extra})

    def generate_deferred(self, serve: Callable) -> None:
        """Generate the deferred (vLLM) rows with ``serve(rows, generation) -> replies``."""
        if self._deferred:
            self.add_replies(self._deferred, serve(self._deferred, self._generation))
            self._deferred = []

    @property
    def deferred(self) -> bool:
        return bool(self._deferred)

    def finish(self, strategy, meta: dict, results_dir: str) -> Optional[dict]:
        """Gather every rank's records (each item must appear once), summarize, write on rank 0."""
        records, items = self.records, self.items
        if strategy.world_size > 1:
            gathered: list = [None] * strategy.world_size
            torch.distributed.all_gather_object(gathered, (records, items))
            records = [r for part, _ in gathered for r in part]
            items = [it for _, part in gathered for it in part]
        keys = [(r["task"], r["id"]) for r in records]
        if len(set(keys)) != len(keys):
            raise RuntimeError("an item was scored twice; the test sampler must not pad")
        summary = summarize(records)
        if strategy.is_global_zero:
            settings = self.settings or {}
            meta = {**meta, "data": settings, "items_available": settings.get("items_available", {}),
                    "data_fingerprint": fingerprint(items)}
            path = write_results(results_dir, summary, records, meta)
            log.info("results: %s (macro acc %.4f over %d items)", path, summary["macro_avg_acc"], summary["n"])
        return summary
