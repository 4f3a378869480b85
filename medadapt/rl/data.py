"""Verifiable questions for reinforcement learning: multiple-choice items whose answers the reader can check.

Sources go in through the same field mapping as custom benchmark tasks (``eval/custom_task.py``): MedQA-USMLE
4-option train and MedMCQA train from the hub, or any local file (the shared o1 sample's ``question / options /
answer_idx`` fields); PubMedQA PQA-L's 1,000 labelled questions minus the 500 test ids (``PubMedQATrain``).
Every question that overlaps a leaderboard test item (the project's n-gram decontamination) is dropped and
counted in the log, and a seeded held-out set is kept aside for the greedy accuracy logged during training.
Each question becomes the same chat prompt the test stage's generative mode asks (``gen_row``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import lightning as L

from medadapt.data.reasoning import stateful_loader
from medadapt.data.sources import DataFingerprint
from medadapt.eval.custom_task import CustomTask, load_custom
from medadapt.eval.generative import GenerationConfig, collate_generate, gen_row
from medadapt.eval.tasks import INSTRUCTION, PUBMEDQA_CHOICES, TASKS, Item

log = logging.getLogger(__name__)


@dataclass
class PubMedQATrain:
    """PubMedQA PQA-L (yes / no / maybe) without the leaderboard's 500 test questions (their ids are read from the
    same test set the test stage scores: ``benchmarks_dir``, or the hub).

    Args:
        data_file: ``pubmedqa_ori_pqal.json`` (dict id → QUESTION, CONTEXTS, final_decision); null: the hub's
            ``qiaojin/PubMedQA`` ``pqa_labeled`` train split.
    """

    data_file: Optional[str] = None


def load_pubmedqa_train(source: PubMedQATrain, test_ids: set[str]) -> list[Item]:
    from medadapt.files import read_json

    if source.data_file:
        docs = read_json(source.data_file, "PubMedQA PQA-L")
        rows = [{"id": k, "question": d.get("QUESTION"), "contexts": d.get("CONTEXTS") or [],
                 "answer": d.get("final_decision")} for k, d in docs.items()]
    else:
        from medadapt.data.sources import load_rows

        hub = load_rows("qiaojin/PubMedQA", "pqa_labeled", "train")
        rows = [{"id": str(r["pubid"]), "question": r["question"], "contexts": r["context"]["contexts"],
                 "answer": r["final_decision"]} for r in hub]
    items = []
    for r in rows:
        if r["id"] in test_ids or r["answer"] not in PUBMEDQA_CHOICES or not r["question"]:
            continue
        items.append(Item("pubmedqa_pqal", r["id"], "", PUBMEDQA_CHOICES, PUBMEDQA_CHOICES.index(r["answer"]),
                          r["question"], passages=list(r["contexts"])))
    log.info("PubMedQA PQA-L: %d training questions (%d test ids left out)", len(items),
             sum(r["id"] in test_ids for r in rows))
    return items


class VerifiableQADataModule(DataFingerprint, L.LightningDataModule):
    """Multiple-choice questions as chat prompts for GRPO, decontaminated against the leaderboard.

    Args:
        sources: Multiple-choice sources by field mapping (hub dataset or local files; see ``CustomTask``: name,
            data_files or dataset, question/options/answer fields, answer_format). Their ``split`` is the one read.
        pubmedqa: PubMedQA PQA-L without its test questions; null for none.
        max_questions: Keep at most this many questions (seeded sample of all sources, or per source by ``quotas``);
            null keeps all.
        quotas: Share of ``max_questions`` each source gets, by source name (custom sources' ``name``; PubMedQA PQA-L
            is ``pubmedqa_pqal``), e.g. ``{medqa_train: 0.45, medmcqa_train: 0.525, pubmedqa_pqal: 0.025}``. Every
            source must be named and the shares must sum to 1; a source with fewer questions than its share gives all
            it has (logged). Null: one seeded sample of all sources together, i.e. in proportion to their sizes
            (MedMCQA's 182k would be ~94% of it).
        heldout: Questions kept aside (seeded) for the held-out accuracy logged every ``val_check_interval``.
        decontaminate: Drop questions that overlap a leaderboard test item (word 8-grams, threshold 0.5), counted.
        benchmarks_dir: The leaderboard test items for decontamination, in the layout of shared/data/benchmarks;
            null reads them from the hub.
        instruction: Sentence after every question (as in the test stage's generative mode).
        open_think: Open the assistant turn with ``<think>\\n`` (DeepSeek's protocol) where the template does not.
        max_prompt_length: Prompts longer than this many tokens are dropped (counted).
        batch_size: Questions per step per device (each sampled ``rl.group_size`` times).
        val_batch_size: Held-out questions generated at once during validation.
        num_workers: DataLoader worker processes.
        seed: Seed of the held-out split, the subsample and the shuffling.
        shuffle: Shuffle the training questions each epoch.
        tokenizer: Tokenizer name or path; null takes the model's (the run connects it).
    """

    def __init__(self, sources: Optional[list[CustomTask]] = None, pubmedqa: Optional[PubMedQATrain] = None,
                 max_questions: Optional[int] = None, quotas: Optional[dict[str, float]] = None, heldout: int = 64,
                 decontaminate: bool = True, benchmarks_dir: Optional[str] = None, instruction: str = INSTRUCTION,
                 open_think: bool = True, max_prompt_length: int = 2048, batch_size: int = 32,
                 val_batch_size: int = 16, num_workers: int = 0, seed: int = 4242, shuffle: bool = True,
                 tokenizer: Optional[str] = None):
        super().__init__()
        if heldout < 0 or batch_size < 1 or val_batch_size < 1 or max_prompt_length < 16 or (
                max_questions is not None and max_questions < 1):
            raise ValueError("data: heldout must be ≥ 0, batch_size and val_batch_size ≥ 1, max_prompt_length ≥ 16, "
                             "max_questions ≥ 1 or null")
        if quotas is not None:
            if max_questions is None:
                raise ValueError("data.quotas are shares of data.max_questions: set max_questions")
            if any(not (0 <= v <= 1) for v in quotas.values()) or abs(sum(quotas.values()) - 1) > 1e-6:
                raise ValueError(f"data.quotas must be shares in [0, 1] summing to 1 (got {quotas})")
        self.save_hyperparameters()
        as_dict = lambda c: asdict(c) if hasattr(c, "__dataclass_fields__") else c  # noqa: E731
        self.sources = [c if isinstance(c, CustomTask) else CustomTask(**c) for c in (sources or [])]
        self.pubmedqa = pubmedqa if isinstance(pubmedqa, PubMedQATrain) or pubmedqa is None else PubMedQATrain(**pubmedqa)
        self.hparams["sources"] = [as_dict(c) for c in self.sources]
        self.hparams["pubmedqa"] = as_dict(self.pubmedqa)
        if not self.sources and self.pubmedqa is None:
            raise ValueError("data: give at least one source (sources or pubmedqa)")
        self.batch_size, self.tokenizer = batch_size, None
        self.train_rows: list = []
        self.val_rows: list = []

    def connect(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def limit_context(self, context: Optional[int]) -> None:
        """The policy's context length, handed over by the run: a prompt longer than the model reads is dropped
        (counted) like one over ``max_prompt_length``."""
        if context and self.hparams.max_prompt_length > context:
            log.warning("data.max_prompt_length=%d exceeds the model's context (%d tokens): prompts are held to %d",
                        self.hparams.max_prompt_length, context, context)
            self.hparams.max_prompt_length = context

    def fingerprint(self) -> dict:
        """Settings, and every local source file by content."""
        from medadapt.fingerprint import file_digest

        h = dict(self.hparams)
        files = [f for c in self.sources for f in ([c.data_files] if isinstance(c.data_files, str) else c.data_files or [])]
        if self.pubmedqa and self.pubmedqa.data_file:
            files.append(self.pubmedqa.data_file)
        return {**{k: v for k, v in h.items() if k not in self.NOT_DATA}, "files": {f: file_digest(f) for f in files}}

    def questions(self) -> list[Item]:
        """Every usable question, decontaminated, ids unique across sources."""
        import random

        from medadapt.eval.tasks import load_task

        items = [it for c in self.sources for it in load_custom(c)]
        if self.pubmedqa is not None:
            test_ids = {it.id for it in load_task("pubmedqa", self.hparams.benchmarks_dir, True)}
            items += load_pubmedqa_train(self.pubmedqa, test_ids)
        if self.hparams.decontaminate:
            items = self._decontaminated(items)
        if self.hparams.quotas is not None:
            return self._by_quota(items)
        if self.hparams.max_questions is not None and len(items) > self.hparams.max_questions:
            keep = sorted(random.Random(self.hparams.seed).sample(range(len(items)), self.hparams.max_questions))
            items = [items[i] for i in keep]
        return items

    def _by_quota(self, items: list[Item]) -> list[Item]:
        """A seeded sample of each source, of its share of ``max_questions``."""
        import random

        names = {c.name for c in self.sources} | ({"pubmedqa_pqal"} if self.pubmedqa is not None else set())
        quotas = self.hparams.quotas
        if set(quotas) != names:
            raise ValueError(f"data.quotas must name every source once: sources {sorted(names)}, quotas "
                             f"{sorted(quotas)}")
        out = []
        for name in sorted(quotas):
            pool = [it for it in items if it.task == name]
            want = round(quotas[name] * self.hparams.max_questions)
            if len(pool) < want:
                log.warning("data.quotas: %s has %d questions, fewer than its share (%d); all are used", name,
                            len(pool), want)
            keep = sorted(random.Random(f"{self.hparams.seed}/{name}").sample(range(len(pool)), min(want, len(pool))))
            out += [pool[i] for i in keep]
            log.info("data.quotas: %d questions from %s", min(want, len(pool)), name)
        return out

    def _decontaminated(self, items: list[Item]) -> list[Item]:
        from collections import Counter

        from medadapt.eval.decontaminate import BenchmarkIndex
        from medadapt.eval.tasks import load_task

        index = BenchmarkIndex([it for task in TASKS for it in load_task(task, self.hparams.benchmarks_dir, True)])
        kept, dropped = [], Counter()
        for it in items:
            share, match = index.best_match(it.question)
            if match is not None and share >= 0.5:
                dropped[f"{it.task} → {match.task}"] += 1
            else:
                kept.append(it)
        if dropped:
            log.warning("decontamination: dropped %d of %d training questions that overlap leaderboard test items "
                        "(%s)", sum(dropped.values()), len(items), ", ".join(f"{k}: {n}" for k, n in dropped.items()))
        return kept

    def setup(self, stage: str) -> None:
        import random

        from medadapt.data.sources import named_tokenizer

        if self.train_rows:
            return
        if self.tokenizer is None:
            self.tokenizer = named_tokenizer(self.hparams.tokenizer, type(self).__name__)
        items = self.questions()
        protocol = GenerationConfig(instruction=self.hparams.instruction, open_think=self.hparams.open_think)
        rows = [gen_row(self.tokenizer, it, protocol) for it in items]
        too_long = [r for r in rows if len(r.input_ids) > self.hparams.max_prompt_length]
        if too_long:
            log.warning("dropped %d of %d questions whose prompts exceed max_prompt_length=%d", len(too_long),
                        len(rows), self.hparams.max_prompt_length)
        rows = [[r] for r in rows if len(r.input_ids) <= self.hparams.max_prompt_length]
        order = list(range(len(rows)))
        random.Random(self.hparams.seed).shuffle(order)
        held = set(order[: self.hparams.heldout])
        self.val_rows = [rows[i] for i in sorted(held)]
        self.train_rows = [rows[i] for i in range(len(rows)) if i not in held]
        if not self.train_rows:
            raise ValueError(f"no training questions left ({len(rows)} usable, {len(held)} held out)")
        log.info("%d training questions, %d held out", len(self.train_rows), len(self.val_rows))

    def keep_train_rows(self, rows: list) -> None:
        """Train on these rows only (the pass-rate filter's choice, made before the first loader is built)."""
        self.train_rows = list(rows)

    def _loader(self, rows: list, train: bool):
        return stateful_loader(rows, self.batch_size if train else self.hparams.val_batch_size, self.trainer, train,
                               self.hparams.seed, self.hparams.shuffle, self.hparams.num_workers,
                               partial(collate_generate, pad_id=self.tokenizer.pad_token_id))

    def train_dataloader(self):
        return self._loader(self.train_rows, train=True)

    def val_dataloader(self):
        return self._loader(self.val_rows, train=False) if self.val_rows else []
