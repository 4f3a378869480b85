"""Awkward corpora and queries, and the server-store path (Qdrant local mode, same client code as a server)."""

from __future__ import annotations

import json
import logging

import pytest

from medadapt.rag.corpus import CorpusConfig, documents
from medadapt.rag.local_index import LocalIndex, SearchIndex
from medadapt.rag.config import IndexConfig, RetrievalConfig
from medadapt.rag.pipelines import HybridRetriever, build_index

from .conftest import ids, medquad_corpus


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return str(path)


AWKWARD = [
    {"id": "a", "text": "Beta-blockers (β-blockers) – naïve patients; 中文 snippet about propranolol dosing."},
    {"id": "b", "text": "   "},                                   # no text
    {"id": "c", "text": None},                                    # no text
    {"id": "d", "text": 42},                                      # not text
    {"id": "a", "text": "A second document claiming id a."},      # duplicate id
    {"id": "", "text": "No id at all."},                          # empty id
    {"id": "e", "text": "Warfarin interacts with vitamin K rich foods such as spinach."},
]


def test_awkward_rows_are_skipped_and_counted(tmp_path, caplog):
    cfg = CorpusConfig(data_files=write_jsonl(tmp_path / "c.jsonl", AWKWARD), text_fields=["text"], title_field=None)
    with caplog.at_level(logging.WARNING):
        docs = list(documents(cfg))
    assert [d.id for d in docs] == ["a", "e"] and "中文" in docs[0].content
    assert "skipped 5 rows" in caplog.text and "1 duplicate id" in caplog.text and "3 no text" in caplog.text


def test_unicode_survives_index_and_retrieval(tmp_path):
    cfg = CorpusConfig(data_files=write_jsonl(tmp_path / "c.jsonl", AWKWARD), text_fields=["text"], title_field=None)
    index = IndexConfig(dir=str(tmp_path / "idx"))
    build_index(cfg, index)
    docs = HybridRetriever(index, RetrievalConfig(top_k=1)).retrieve("β-blockers propranolol")
    assert docs[0].id == "a" and docs[0].content == AWKWARD[0]["text"]


def test_missing_field_names_file_and_fields(tmp_path):
    cfg = CorpusConfig(data_files=write_jsonl(tmp_path / "c.jsonl", AWKWARD), text_fields=["content"])
    with pytest.raises(KeyError, match=r"c\.jsonl.*\['content', 'title'\]|c\.jsonl.*content"):
        list(documents(cfg))


def test_corpus_without_text_is_a_clear_error(tmp_path):
    cfg = CorpusConfig(data_files=write_jsonl(tmp_path / "c.jsonl", AWKWARD[1:4]), text_fields=["text"],
                       title_field=None)
    with pytest.raises(ValueError, match="nothing indexed"):
        build_index(cfg, IndexConfig(dir=str(tmp_path / "idx")))
    with pytest.raises(FileNotFoundError, match="no built index"):
        SearchIndex(str(tmp_path / "idx"))


def test_empty_query_is_refused_and_stopword_query_finds_nothing(medquad_index, retriever):
    with pytest.raises(ValueError, match="empty query"):
        retriever.retrieve("  ")
    assert retriever.pipeline.get_component("bm25").run("the of and")["documents"] == []


def test_another_embedder_cannot_write_into_an_index(medquad_index):
    with pytest.raises(ValueError, match="was embedded with"):
        LocalIndex(medquad_index.dir).check_embedder("sentence-transformers/all-mpnet-base-v2")


def test_queries_must_be_embedded_by_the_index_s_own_embedder(medquad_index):
    """`ask --index.embedder OTHER` would retrieve with vectors of another model (same dimension: silently wrong;
    another: a bare faiss error): refused, naming the index's embedder."""
    from dataclasses import replace

    from medadapt.rag.config import RetrievalConfig
    from medadapt.rag.pipelines import HybridRetriever

    with pytest.raises(ValueError, match="was embedded with .*set index.embedder"):
        HybridRetriever(replace(medquad_index, embedder="sentence-transformers/paraphrase-MiniLM-L3-v2"),
                        RetrievalConfig())


def test_qdrant_local_mode_runs_the_same_pipelines(tmp_path):
    from medadapt.rag.stores import open_store

    cfg = IndexConfig(dir=str(tmp_path / "qdrant"), store="qdrant", chunk_size=32)
    store = open_store(cfg)  # one client: Qdrant's local mode locks its folder to one
    first = build_index(medquad_corpus(60), cfg, store=store)
    assert first["embedded"] > 0
    assert build_index(medquad_corpus(60), cfg, store=store)["embedded"] == 0  # already stored: nothing re-embedded
    retriever = HybridRetriever(cfg, RetrievalConfig(top_k=5), store=store)
    docs = retriever.retrieve("What are the symptoms of Adult Soft Tissue Sarcoma ?")
    assert "0000003_1-3" in ids(docs)
