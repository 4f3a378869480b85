"""A small real index shared by the RAG tests: MedQuAD answers, packaged MiniLM embedder (~15 s to build)."""

from __future__ import annotations

import pytest

from medadapt.rag.config import IndexConfig, RetrievalConfig
from medadapt.rag.corpus import CorpusConfig
from medadapt.rag.pipelines import HybridRetriever, build_index

from ..conftest import DATA

MEDQUAD = DATA / "corpus" / "medquad.jsonl"
N_DOCS = 150
# (question, the id of the document holding its answer); the question text is not indexed
KNOWN = [("What are the treatments for Kaposi Sarcoma ?", "0000003_3-5"),
         ("How to diagnose Childhood Rhabdomyosarcoma ?", "0000003_4-3"),
         ("What is (are) Anal Cancer ?", "0000005_1-1")]


def medquad_corpus(n: int = N_DOCS, path=MEDQUAD) -> CorpusConfig:
    return CorpusConfig(data_files=str(path), id_field="id", text_fields=["answer"], title_field=None, max_docs=n)


@pytest.fixture(scope="session")
def medquad_index(tmp_path_factory) -> IndexConfig:
    cfg = IndexConfig(dir=str(tmp_path_factory.mktemp("medquad-index")), chunk_size=64, batch_size=32)
    build_index(medquad_corpus(), cfg)
    return cfg


@pytest.fixture(scope="session")
def retriever(medquad_index) -> HybridRetriever:
    return HybridRetriever(medquad_index, RetrievalConfig(top_k=5, candidates=5))


def ids(docs) -> list[str]:
    return [d.id for d in docs]
