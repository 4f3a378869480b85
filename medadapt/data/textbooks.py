"""Text corpora → documents + EOS → fixed-length blocks for continual pretraining (CPT).

The documents are concatenated (each followed by EOS) and the stream is cut every ``block_size``
tokens, so no token is lost, repeated or padded away except at the very end. A block usually holds the
end of one document and the start of the next; by default each of those pieces is its own example in
the SFT packing sense (``data/packing.py``: restarted positions, block-diagonal mask), so attention does
not cross documents. ``isolate_documents: false`` gives plain concatenation (one segment per block), as
most pretraining code does. Validation holds out whole documents, never blocks of a document that is
also trained on.
"""

from __future__ import annotations

import logging
import random
from typing import Optional, Union

from medadapt.data.packing import Example
from medadapt.data.reasoning import TokenizedDataModule
from medadapt.data.sources import MalformedRowError, describe_source, load_rows

log = logging.getLogger(__name__)


def _tokenize(batch: dict, tokenizer, field: str) -> dict:
    """Map function (cached by ``datasets``): text + EOS; non-text and empty rows give no tokens."""
    ids, kinds = [], []
    for text in batch[field]:
        if not isinstance(text, str):
            ids.append([])
            kinds.append("not text" if text is not None else "missing")
        elif not text.strip():
            ids.append([])
            kinds.append("empty")
        else:
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            kinds.append("ok")
    return {"ids": ids, "kind": kinds}


def cut_blocks(documents: list[list[int]], block_size: int, isolate: bool = True) -> list[list[Example]]:
    """Cut the concatenated documents into blocks of ``block_size`` tokens (the last may be shorter).

    With ``isolate`` each document piece in a block is its own example; without, a block is one example.
    """
    blocks: list[list[Example]] = []
    current: list[Example] = []
    room = block_size
    for doc in documents:
        start = 0
        while start < len(doc):
            piece = doc[start : start + room]
            current.append({"input_ids": piece, "labels": list(piece)})
            start += len(piece)
            room -= len(piece)
            if room == 0:
                blocks.append(current)
                current, room = [], block_size
    if current:
        blocks.append(current)
    if not isolate:
        blocks = [[{"input_ids": [t for ex in b for t in ex["input_ids"]],
                    "labels": [t for ex in b for t in ex["labels"]]}] for b in blocks]
    return blocks


class TextbooksDataModule(TokenizedDataModule):
    """Continual-pretraining data: MedRAG/textbooks (or any text corpus) as packed fixed-length blocks.

    Args:
        dataset: Hub dataset id, used when ``data_files`` is unset (MedRAG/textbooks: 125,847
            snippets with id, title, content, contents).
        name: Hub dataset configuration, if any.
        split: Hub split to read.
        data_files: Local JSON array / JSONL / parquet file(s); replaces the hub.
        revision: Hub revision to pin.
        text_field: Column holding the text (``content`` for MedRAG; ``contents`` adds the title;
            ``answer`` for MedQuAD).
        max_docs: Keep the first N documents; null keeps all.
        tokenizer: Tokenizer name or path; null takes the model's.
        block_size: Tokens per training block (every block is full except the last).
        isolate_documents: Attention stays within a document inside a block (positions restart at
            each document); false concatenates plainly.
        on_bad_row: A row whose text field is missing or not text: ``error`` names file, row and field;
            ``skip`` counts it. Empty texts are always skipped and counted.
        val_fraction: Fraction of documents (not blocks) held out for validation.
        batch_size: Blocks per device per step.
        num_workers: DataLoader worker processes.
        seed: Seed of the document split and of the shuffling.
        shuffle: Shuffle training blocks each epoch.
    """

    def __init__(
        self,
        dataset: str = "MedRAG/textbooks",
        name: Optional[str] = None,
        split: str = "train",
        data_files: Union[str, list[str], None] = None,
        revision: Optional[str] = None,
        text_field: str = "content",
        max_docs: Optional[int] = None,
        tokenizer: Optional[str] = None,
        block_size: int = 2048,
        isolate_documents: bool = True,
        on_bad_row: str = "error",
        val_fraction: float = 0.02,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 4242,
        shuffle: bool = True,
    ):
        super().__init__(tokenizer, block_size, True, batch_size, num_workers, seed, shuffle)
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.save_hyperparameters()
        self.source = describe_source(dataset, data_files)

    def tokenized_documents(self) -> list[list[int]]:
        """Every usable document as token ids + EOS, in corpus order."""
        h = self.hparams
        rows = load_rows(h.dataset, h.name, h.split, h.data_files, h.revision, h.max_docs)
        if h.text_field not in rows.column_names:
            raise KeyError(f"{self.source}: no field {h.text_field!r} (fields: {rows.column_names}); set text_field")
        tok = self.get_tokenizer()
        done = rows.map(_tokenize, batched=True, fn_kwargs={"tokenizer": tok, "field": h.text_field},
                        remove_columns=rows.column_names, desc="tokenizing")
        self.token_cache_files = [f["filename"] for f in done.cache_files]  # reused by later runs
        kinds = done["kind"]
        bad = [i for i, k in enumerate(kinds) if k in ("not text", "missing")]
        if bad and h.on_bad_row == "error":
            raise MalformedRowError(f"{self.source}: row {bad[0]}: field {h.text_field!r} is {kinds[bad[0]]}"
                                    f" ({len(bad)} such rows; on_bad_row: skip drops them)")
        skipped = {k: kinds.count(k) for k in ("not text", "missing", "empty") if k in kinds}
        if skipped:
            log.warning("%s: skipped %s of %d rows", self.source, skipped, len(kinds))
        docs = [ids for ids, k in zip(done["ids"], kinds) if k == "ok"]
        if not docs:
            raise ValueError(f"{self.source}: no document with text in field {h.text_field!r}")
        return docs

    def build_examples(self, stage: str) -> tuple[list[Example], list[Example]]:
        h = self.hparams
        docs = self.tokenized_documents()
        order = list(range(len(docs)))
        random.Random(h.seed).shuffle(order)
        n_val = round(len(docs) * h.val_fraction) if len(docs) > 1 else 0
        if h.val_fraction > 0 and n_val == 0 and len(docs) > 1:
            n_val = 1
        held = set(order[:n_val])
        train_docs = [d for i, d in enumerate(docs) if i not in held]
        val_docs = [d for i, d in enumerate(docs) if i in held]
        total = sum(len(d) for d in docs)
        if total < h.block_size:
            log.warning("%s: the whole corpus is %d tokens, less than one block of %d: training on one "
                        "short block", self.source, total, h.block_size)
        train = cut_blocks(train_docs, h.block_size, h.isolate_documents)
        val = cut_blocks(val_docs, h.block_size, h.isolate_documents)
        log.info("%s: %d documents, %d tokens → %d train / %d val blocks of %d", self.source, len(docs), total,
                 len(train), len(val), h.block_size)
        return [ex for b in train for ex in b], [ex for b in val for ex in b]

    def group(self, examples: list[Example]) -> list[list[int]]:
        """Blocks are already cut: consecutive examples fill one block each."""
        groups, start = [], 0
        while start < len(examples):
            end, used = start, 0
            while end < len(examples) and used + len(examples[end]["input_ids"]) <= self.max_length:
                used += len(examples[end]["input_ids"])
                end += 1
            groups.append(list(range(start, end)))
            start = end
        return groups
