"""CPT blocks: every corpus token exactly once, EOS between documents, attention within documents."""

from __future__ import annotations

import json

import pytest
import torch

from medadapt.data.packing import IGNORE_INDEX, block_causal_mask, collate
from medadapt.data.sources import MalformedRowError
from medadapt.data.textbooks import TextbooksDataModule, cut_blocks

from ..conftest import DATA, R1_TOKENIZER

TEXTBOOKS = DATA / "corpus" / "textbooks_sample.json"


def data(path=TEXTBOOKS, **kw) -> TextbooksDataModule:
    kw.setdefault("block_size", 256)
    kw.setdefault("val_fraction", 0.0)
    dm = TextbooksDataModule(data_files=str(path), tokenizer=str(R1_TOKENIZER), **kw)
    dm.setup("fit")
    return dm


def stream(rows) -> list[int]:
    return [t for row in rows for ex in row for t in ex["input_ids"]]


def test_blocks_round_trip_every_token_with_eos_between_documents(r1_tokenizer):
    dm = data()
    docs = json.loads(TEXTBOOKS.read_text())
    expected = []
    for d in docs:
        expected += r1_tokenizer(d["content"], add_special_tokens=False)["input_ids"] + [r1_tokenizer.eos_token_id]
    assert stream(dm.train_rows.rows) == expected  # no token lost, duplicated or reordered
    lengths = [sum(len(ex["input_ids"]) for ex in row) for row in dm.train_rows.rows]
    assert all(n == 256 for n in lengths[:-1]) and 0 < lengths[-1] <= 256
    assert expected.count(r1_tokenizer.eos_token_id) == len(docs)


def test_validation_holds_out_whole_documents(r1_tokenizer):
    dm = data(val_fraction=0.1)
    train, val = stream(dm.train_rows.rows), stream(dm.val_rows.rows)
    docs = [r1_tokenizer(d["content"], add_special_tokens=False)["input_ids"] + [r1_tokenizer.eos_token_id]
            for d in json.loads(TEXTBOOKS.read_text())]
    assert len(train) + len(val) == sum(len(d) for d in docs)
    held = [d for d in docs if any(d == val[i : i + len(d)] for i in range(0, len(val) - len(d) + 1))]
    assert len(held) == round(0.1 * len(docs))  # the validation stream is made of whole documents


def test_attention_stays_within_documents_unless_concatenating():
    docs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14]]
    isolated = cut_blocks(docs, 6)
    assert [[ex["input_ids"] for ex in b] for b in isolated] == [[[1, 2, 3, 4, 5], [6]], [[7, 8], [9, 10, 11, 12]],
                                                                 [[13, 14]]]
    batch = collate(isolated[:2], pad_id=0)
    assert batch["position_ids"][1].tolist()[:6] == [0, 1, 0, 1, 2, 3]
    mask = block_causal_mask(batch["segment_ids"], torch.float32)[1, 0]
    assert mask[2, 1] < 0 and mask[3, 2] == 0  # token 9 cannot see token 8 of the previous document
    assert batch["labels"][1, 2] == IGNORE_INDEX  # nor is it predicted from it
    plain = cut_blocks(docs, 6, isolate=False)
    assert [len(b) for b in plain] == [1, 1, 1] and plain[1][0]["input_ids"] == [7, 8, 9, 10, 11, 12]
    assert collate(plain[:2], pad_id=0)["position_ids"][1].tolist()[:6] == [0, 1, 2, 3, 4, 5]


def test_empty_and_non_text_rows(tmp_path, caplog):
    rows = [{"content": "Insulin lowers blood glucose."}, {"content": ""}, {"content": "   "}, {"content": 7},
            {"content": "Glucagon raises it."}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(MalformedRowError, match=r"c\.jsonl: row 3: field 'content' is not text"):
        data(path)
    dm = data(path, on_bad_row="skip")
    assert "'not text': 1" in caplog.text and "'empty': 2" in caplog.text
    assert len(dm.train_rows) == 1  # the whole corpus is smaller than one block: one short block
    with pytest.raises(KeyError, match="no field 'text'"):
        data(path, text_field="text")


def test_tokenization_is_cached_by_datasets():
    first, second = data(), data()
    assert first.token_cache_files and second.token_cache_files == first.token_cache_files
