"""The verifiable questions: decontaminated against the leaderboard, and drawn per source by quota."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from medadapt.rl.data import VerifiableQADataModule

from ..conftest import DATA, SFT_SAMPLE

O1 = {"name": "o1", "data_files": str(SFT_SAMPLE), "options_field": "options", "answer_field": "answer_idx",
      "answer_format": "letter", "on_bad_row": "skip"}


def test_decontamination_drops_the_questions_copied_from_the_leaderboard(r1_tokenizer, caplog):
    data = VerifiableQADataModule(sources=[O1], benchmarks_dir=str(DATA / "benchmarks"), heldout=0,
                                  decontaminate=True, open_think=False)
    data.connect(r1_tokenizer)
    with caplog.at_level("WARNING"):
        data.setup("fit")
    assert "dropped 3 of" in caplog.text and "o1 → medmcqa: 3" in caplog.text  # the three MedMCQA copies
    assert "options A and B are the same text" in caplog.text  # a malformed row of the sample, counted
    assert all(0 <= r.item.gold < len(r.item.options) for (r,) in data.train_rows) and len(data.train_rows) > 150


@pytest.fixture(scope="module")
def big_and_small(tmp_path_factory):
    """Two sources of very different sizes (180 and 20 questions), as MedMCQA and MedQA are."""
    folder = tmp_path_factory.mktemp("quota")
    sources = []
    for name, n in (("big", 180), ("small", 20)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"question": f"{name} question {i}?", "options": ["a", "b", "c", "d"],
                                            "answer": "A"}) + "\n" for i in range(n)))
        sources.append({"name": name, "data_files": str(path), "answer_format": "letter"})
    return sources


def drawn(sources, **kw) -> Counter:
    data = VerifiableQADataModule(sources=sources, decontaminate=False, heldout=0, **kw)
    return Counter(item.task for item in data.questions())


def test_quotas_set_each_source_s_share_instead_of_its_size(big_and_small, caplog):
    assert drawn(big_and_small, max_questions=40) != Counter(big=20, small=20)  # by size: ~36 / ~4
    assert drawn(big_and_small, max_questions=40, quotas={"big": 0.5, "small": 0.5}) == Counter(big=20, small=20)
    with caplog.at_level("WARNING"):  # a share larger than the source gives all it has, and says so
        assert drawn(big_and_small, max_questions=100, quotas={"big": 0.7, "small": 0.3}) == Counter(big=70, small=20)
    assert "small has 20 questions, fewer than its share (30)" in caplog.text
    with pytest.raises(ValueError, match="name every source"):
        drawn(big_and_small, max_questions=40, quotas={"big": 1.0})
    with pytest.raises(ValueError, match="summing to 1"):
        VerifiableQADataModule(sources=big_and_small, max_questions=40, quotas={"big": 0.5, "small": 0.2})
    with pytest.raises(ValueError, match="max_questions"):
        VerifiableQADataModule(sources=big_and_small, quotas={"big": 0.5, "small": 0.5})
