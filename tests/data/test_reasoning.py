"""SFT data: what is supervised, what is not, and how bad rows fail."""

from __future__ import annotations

import json

import pytest

from medadapt.data.packing import IGNORE_INDEX
from medadapt.data.reasoning import ReasoningSFTDataModule, render_example
from medadapt.data.sources import MalformedRowError

from ..conftest import R1_TOKENIZER, SFT_SAMPLE


def make_dm(**kw):
    kw.setdefault("tokenizer", str(R1_TOKENIZER))
    kw.setdefault("data_files", str(SFT_SAMPLE))
    return ReasoningSFTDataModule(**kw)


def test_reasoning_is_supervised_prompt_is_not(r1_tokenizer):
    question, cot, answer = "What causes scurvy?", "Vitamin C is needed for collagen.", "Vitamin C deficiency."
    target = f"<think>\n{cot}\n</think>\n\n{answer}"
    ex = render_example(r1_tokenizer, question, target)
    supervised = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    prompt = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l == IGNORE_INDEX]
    sup_text = r1_tokenizer.decode(supervised)
    assert cot in sup_text and answer in sup_text and "<think>" in sup_text
    assert question in r1_tokenizer.decode(prompt) and question not in sup_text
    assert supervised[-1] == r1_tokenizer.eos_token_id
    assert ex["input_ids"][0] == r1_tokenizer.bos_token_id
    # the trap this guards against: the template itself would have dropped the reasoning
    via_template = r1_tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": target}], tokenize=False)
    assert cot not in via_template


def test_sample_file_loads_and_splits():
    dm = make_dm(max_length=2048)
    train, val = dm.build_examples("fit")
    assert len(train) + len(val) == 198 and len(val) == 10
    assert all(ex["labels"][-1] != IGNORE_INDEX for ex in train)


def test_truncation_drops_rows_without_supervised_tokens_and_fails_past_threshold(tmp_path):
    rows = json.load(open(SFT_SAMPLE))[:20]
    rows[3]["Question"] = "very long question " * 400
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="1 of 20 rows dropped"):
        make_dm(data_files=str(path), max_length=512, val_fraction=0.0, max_dropped_fraction=0.01,
                truncate=True).build_examples("fit")
    train, _ = make_dm(data_files=str(path), max_length=512, val_fraction=0.0, truncate=True,
                       max_dropped_fraction=0.1).build_examples("fit")
    assert len(train) == 19
    assert all(len(ex["input_ids"]) <= 512 for ex in train)


def test_rows_longer_than_max_length_are_dropped_and_counted_unless_truncation_is_asked_for(tmp_path, caplog):
    """A cut row loses the end of its answer and its EOS: by default it is dropped with a WARNING that counts
    it; ``truncate: true`` keeps the cut rows (also counted)."""
    rows = json.load(open(SFT_SAMPLE))[:20]
    for i in (2, 5, 9):
        rows[i]["Response"] = rows[i]["Response"] + " and more" * 300
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    with caplog.at_level("WARNING"):
        train, _ = make_dm(data_files=str(path), max_length=1024, val_fraction=0.0,
                           max_dropped_fraction=0.2).build_examples("fit")
    assert len(train) == 17 and all(ex["labels"][-1] != IGNORE_INDEX for ex in train)  # every kept row ends in EOS
    assert any("dropped 3 of 20 rows longer than max_length=1024" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        cut, _ = make_dm(data_files=str(path), max_length=1024, val_fraction=0.0, truncate=True).build_examples("fit")
    assert len(cut) == 20 and sum(len(ex["input_ids"]) == 1024 for ex in cut) == 3
    assert any("cut 3 of 20 rows to max_length=1024" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("Question", None, "field 'Question' is missing"),
        ("Response", "   ", "field 'Response' is empty"),
        ("Complex_CoT", "", "field 'Complex_CoT' is empty"),
        ("Question", 42, "field 'Question' is int, not text"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, field, value, message):
    rows = json.load(open(SFT_SAMPLE))[:12]
    rows = [{k: r[k] for k in ("Question", "Complex_CoT", "Response")} for r in rows]
    if value is None:
        del rows[7][field]
    else:
        rows[7][field] = value
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(MalformedRowError) as err:
        make_dm(data_files=str(path), val_fraction=0.0).build_examples("fit")
    assert str(path) in str(err.value) and "row 7" in str(err.value) and message in str(err.value)
    train, _ = make_dm(data_files=str(path), val_fraction=0.0, on_bad_row="skip",
                       max_dropped_fraction=0.1).build_examples("fit")
    assert len(train) == 11


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        make_dm(data_files=str(tmp_path / "nope.json")).build_examples("fit")


def test_a_missing_relative_path_names_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"resolved against {tmp_path}: {tmp_path / 'data' / 'nope.json'}"):
        make_dm(data_files="data/nope.json").build_examples("fit")
