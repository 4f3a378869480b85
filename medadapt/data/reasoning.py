"""medical-o1-reasoning-SFT → chat-formatted, assistant-only-supervised examples → packed batches.

The prompt is rendered by the tokenizer's own chat template with ``add_generation_prompt=True`` and
the target (reasoning + answer + EOS) is appended as tokens. Rendering the assistant turn through the
template instead would be wrong for DeepSeek-R1-Distill: its template keeps only the text after
``</think>``, silently deleting the reasoning we want to teach.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Optional, Union

import lightning as L
import torch

from medadapt.data.packing import IGNORE_INDEX, Example, collate, pack
from medadapt.data.sources import DataFingerprint, MalformedRowError, describe_source, load_rows, named_tokenizer

log = logging.getLogger(__name__)

REASONING_TEMPLATE = "<think>\n{cot}\n</think>\n\n{response}"


def render_example(tokenizer, question: str, target: str, system_prompt: Optional[str] = None) -> Example:
    """Tokenize one chat turn: the prompt unsupervised, the target and EOS supervised."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Newer R1 templates already open the think block in the generation prompt: do not open it twice.
    for opener in ("<think>\n", "<think>"):
        if prompt_text.endswith(opener) and target.startswith(opener):
            target = target[len(opener) :]
            break
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


def stateful_loader(data, batch_size: int, trainer, train: bool, seed: int, shuffle: bool, num_workers: int, collate_fn):
    """A stateful loader over this rank's shard.

    The train sampler is a ``DistributedSampler`` even on one process: its order is a pure function of (seed,
    epoch), so a run resumed from a checkpoint shuffles later epochs exactly as the uninterrupted run would (a
    generator-driven ``RandomSampler`` does not survive a resume), and torchdata's ``StatefulDataLoader`` resumes
    mid-epoch at the exact next batch (a plain ``DataLoader`` makes Lightning replay the epoch). Validation shards
    without padding, so no row is counted twice under DDP.
    """
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
    if train:
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    else:
        sampler = UnrepeatedDistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    return StatefulDataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                              collate_fn=collate_fn)


class RowsDataset(torch.utils.data.Dataset):
    """Packed rows (each a list of examples) as a map-style dataset."""

    def __init__(self, rows: list[list[Example]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[Example]:
        return self.rows[i]


class TokenizedDataModule(DataFingerprint, L.LightningDataModule):
    """Shared machinery for data modules whose examples are token lists: packing, loaders, tokenizer.

    Subclasses implement ``build_examples(stage) -> (train, val)``. Loaders are torchdata's
    ``StatefulDataLoader`` so that a mid-epoch checkpoint resumes at the exact next batch (a plain
    ``DataLoader`` makes Lightning replay the epoch from its start).
    """

    def __init__(
        self,
        tokenizer: Optional[str],
        max_length: int,
        pack: bool,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle: bool = True,
    ):
        super().__init__()
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.pack = pack
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.tokenizer = None
        self.train_rows: Optional[RowsDataset] = None
        self.val_rows: Optional[RowsDataset] = None

    def build_examples(self, stage: str) -> tuple[list[Example], list[Example]]:
        raise NotImplementedError

    def connect(self, tokenizer) -> None:
        """The model's tokenizer, handed over by the run (litgpt's habit): examples are tokenized with the ids
        the model was built with, and data code never reaches into the trainer for it."""
        self.tokenizer = tokenizer

    def get_tokenizer(self):
        if self.tokenizer is None:
            self.tokenizer = named_tokenizer(self.tokenizer_name, type(self).__name__)
        return self.tokenizer

    def setup(self, stage: str) -> None:
        if self.train_rows is not None:
            return
        train, val = self.build_examples(stage)
        self.train_rows = self._to_rows(train)
        self.val_rows = self._to_rows(val)
        log.info("%d train examples → %d rows; %d val examples → %d rows (max_length %d, pack=%s)",
                 len(train), len(self.train_rows), len(val), len(self.val_rows), self.max_length, self.pack)

    def group(self, examples: list[Example]) -> list[list[int]]:
        """Which examples share a row: best-fit packing, or one per row."""
        if self.pack:
            return pack([len(e["input_ids"]) for e in examples], self.max_length)
        return [[i] for i in range(len(examples))]

    def _to_rows(self, examples: list[Example]) -> RowsDataset:
        return RowsDataset([[examples[i] for i in g] for g in self.group(examples)])

    def _loader(self, rows: RowsDataset, train: bool):
        return stateful_loader(rows, self.batch_size, self.trainer, train, self.seed, self.shuffle, self.num_workers,
                               partial(collate, pad_id=self.get_tokenizer().pad_token_id))

    def train_dataloader(self):
        return self._loader(self.train_rows, train=True)

    def val_dataloader(self):
        return self._loader(self.val_rows, train=False) if len(self.val_rows) else []


class ReasoningSFTDataModule(TokenizedDataModule):
    """Supervised fine-tuning data in the medical-o1-reasoning-SFT format (Question, Complex_CoT, Response).

    Args:
        dataset: Hub dataset id, used when ``data_files`` is unset.
        subset: Hub dataset configuration (``en``, ``zh``, ``en_mix``, ...).
        split: Hub split to read.
        data_files: Local JSON array / JSONL / parquet file(s) with the same fields; replaces the hub.
        revision: Hub revision to pin.
        max_rows: Keep the first N rows (the recipe uses 20,000); null keeps all.
        tokenizer: Tokenizer name or path; null takes the model's.
        system_prompt: Optional system message before each question.
        target_template: How the assistant turn is written from ``{cot}`` and ``{response}``. The
            default wraps the reasoning in think tags for R1-style models; use ``"{response}"`` or
            ``"{cot}\\n\\n{response}"`` for models without them.
        question_field: Column holding the question.
        cot_field: Column holding the reasoning.
        response_field: Column holding the final answer.
        max_length: Tokens per packed row, and the longest example kept.
        truncate: What to do with an example longer than ``max_length``: false (default) drops it with a
            counted WARNING; true cuts it to ``max_length`` and trains on the rest, which teaches an answer
            without its end and without EOS.
        max_dropped_fraction: Fail if more than this fraction of rows is dropped (malformed rows in
            ``skip`` mode, rows longer than ``max_length``, or rows left with nothing to supervise).
        on_bad_row: ``error`` stops at the first malformed row naming file, row and field; ``skip``
            counts and logs them.
        val_fraction: Fraction of rows held out for validation (split before tokenization).
        pack: Pack several examples per row (block-diagonal attention); false pads one per row.
        batch_size: Rows per device per step.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/val split and of the shuffling.
        shuffle: Shuffle training rows each epoch (under DDP the distributed sampler shuffles).
    """

    def __init__(
        self,
        dataset: str = "FreedomIntelligence/medical-o1-reasoning-SFT",
        subset: Optional[str] = "en",
        split: str = "train",
        data_files: Union[str, list[str], None] = None,
        revision: Optional[str] = None,
        max_rows: Optional[int] = 20000,
        tokenizer: Optional[str] = None,
        system_prompt: Optional[str] = None,
        target_template: str = REASONING_TEMPLATE,
        question_field: str = "Question",
        cot_field: str = "Complex_CoT",
        response_field: str = "Response",
        max_length: int = 2048,
        truncate: bool = False,
        max_dropped_fraction: float = 0.01,
        on_bad_row: str = "error",
        val_fraction: float = 0.05,
        pack: bool = True,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 4242,
        shuffle: bool = True,
    ):
        super().__init__(tokenizer, max_length, pack, batch_size, num_workers, seed, shuffle)
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.save_hyperparameters()
        self.source = describe_source(dataset, data_files)

    def build_examples(self, stage: str) -> tuple[list[Example], list[Example]]:
        h = self.hparams
        rows = load_rows(h.dataset, h.subset, h.split, h.data_files, h.revision, h.max_rows)
        rows = rows.add_column("_row", list(range(len(rows))))
        if h.val_fraction > 0:
            parts = rows.train_test_split(test_size=h.val_fraction, seed=h.seed)
            train_rows, val_rows = parts["train"], parts["test"]
        else:
            train_rows, val_rows = rows, rows.select([])
        bad: list[str] = []
        too_long = truncated = 0  # dropped for length; cut to max_length (truncate: true)
        out = []
        for part in (train_rows, val_rows):
            examples = []
            for record in part:
                try:
                    question, target = self.row_to_turn(record)
                except MalformedRowError as e:
                    if h.on_bad_row == "error":
                        raise
                    bad.append(str(e))
                    continue
                ex = render_example(self.get_tokenizer(), question, target, h.system_prompt)
                if len(ex["input_ids"]) > h.max_length:
                    ex = {"input_ids": ex["input_ids"][: h.max_length], "labels": ex["labels"][: h.max_length]}
                    if not h.truncate or all(label == IGNORE_INDEX for label in ex["labels"]):
                        too_long += 1
                        continue
                    truncated += 1
                examples.append(ex)
            out.append(examples)
        self._check_losses(len(rows), bad, too_long, truncated)
        return out[0], out[1]

    def row_to_turn(self, record: dict[str, Any]) -> tuple[str, str]:
        """Validate one row and return (question, assistant target)."""
        h = self.hparams
        row = record["_row"]
        needed = [h.question_field, h.response_field]
        if "{cot}" in h.target_template:
            needed.insert(1, h.cot_field)
        values = {}
        for field in needed:
            value = record.get(field)
            if value is None:
                raise MalformedRowError(f"{self.source}: row {row}: field {field!r} is missing")
            if not isinstance(value, str):
                raise MalformedRowError(f"{self.source}: row {row}: field {field!r} is {type(value).__name__}, not text")
            if not value.strip():
                raise MalformedRowError(f"{self.source}: row {row}: field {field!r} is empty")
            values[field] = value.strip()
        target = h.target_template.format(cot=values.get(h.cot_field, ""), response=values[h.response_field])
        return values[h.question_field], target

    def _check_losses(self, total: int, bad: list[str], too_long: int, truncated: int) -> None:
        h = self.hparams
        for msg in bad[:10]:
            log.warning("skipped malformed row: %s", msg)
        if bad:
            log.warning("skipped %d malformed rows of %d", len(bad), total)
        reason = "left with nothing to supervise when cut" if h.truncate else "longer than"
        if too_long:
            log.warning("dropped %d of %d rows %s max_length=%d%s", too_long, total, reason, h.max_length,
                        "" if h.truncate else " (data.truncate: true cuts them instead)")
        if truncated:
            log.warning("cut %d of %d rows to max_length=%d: their answers lose their end and EOS", truncated,
                        total, h.max_length)
        dropped = len(bad) + too_long
        if total and dropped / total > h.max_dropped_fraction:
            raise ValueError(
                f"{self.source}: {dropped} of {total} rows dropped ({len(bad)} malformed, {too_long} {reason} "
                f"max_length={h.max_length}), more than max_dropped_fraction={h.max_dropped_fraction}; raise "
                "max_length or max_dropped_fraction, or fix the data"
            )
