"""Haystack components over the local index (``rag/local_index.py``): a writer and two retrievers.

They follow Haystack's contracts (``@component``, typed ``run`` outputs, ``to_dict``/``from_dict`` from
their init arguments), so they sit in pipelines next to Haystack's own embedders and joiner, and a
pipeline that uses them serializes to YAML and loads back. Both retrievers also have a batch method for
the benchmark arm, which retrieves for thousands of questions at once.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict

from medadapt.rag.local_index import LocalIndex, SearchIndex


@component
class LocalIndexWriter:
    """Commits embedded documents to an index folder as one chunk (the indexing checkpoint)."""

    def __init__(self, index_dir: str, embedder: Optional[str] = None):
        self.index_dir, self.embedder = index_dir, embedder

    @component.output_types(documents_written=int)
    def run(self, documents: list[Document]) -> dict:
        missing = [d.id for d in documents if d.embedding is None]
        if missing:
            raise ValueError(f"documents without an embedding reached the writer, e.g. {missing[:3]}")
        return {"documents_written": LocalIndex(self.index_dir).write_chunk(documents, self.embedder)}

    def to_dict(self) -> dict:
        return default_to_dict(self, index_dir=self.index_dir, embedder=self.embedder)

    @classmethod
    def from_dict(cls, data: dict) -> "LocalIndexWriter":
        return default_from_dict(cls, data)


class _LocalRetriever:
    """``store``: the ``LocalStore`` the pipeline was built over (anything with ``search_index()``), so both
    retrievers share one loaded index; not serialized: a pipeline loaded from YAML opens the folder itself."""

    def __init__(self, index_dir: str, top_k: int = 32, store=None):
        if top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {top_k}")
        self.index_dir, self.top_k, self.store = index_dir, top_k, store
        self._own: Optional[SearchIndex] = None

    def warm_up(self) -> None:
        self.index  # noqa: B018  (loads it)

    @property
    def index(self) -> SearchIndex:
        if self.store is not None:
            return self.store.search_index()
        if self._own is None:
            self._own = SearchIndex(self.index_dir)
        return self._own

    def to_dict(self) -> dict:
        return default_to_dict(self, index_dir=self.index_dir, top_k=self.top_k)

    @classmethod
    def from_dict(cls, data: dict):
        return default_from_dict(cls, data)


@component
class FaissEmbeddingRetriever(_LocalRetriever):
    """Nearest documents to a query embedding by inner product (cosine on normalized embeddings)."""

    @component.output_types(documents=list[Document])
    def run(self, query_embedding: list[float], top_k: Optional[int] = None) -> dict:
        return {"documents": self.run_batch(np.asarray([query_embedding]), top_k)[0]}

    def run_batch(self, query_embeddings: np.ndarray, top_k: Optional[int] = None) -> list[list[Document]]:
        hits = self.index.dense_search(query_embeddings, top_k or self.top_k)
        return [self.index.documents(h) for h in hits]


@component
class BM25sRetriever(_LocalRetriever):
    """Best BM25 matches of a query text (bm25s; stemmed, English stopwords removed)."""

    @component.output_types(documents=list[Document])
    def run(self, query: str, top_k: Optional[int] = None) -> dict:
        return {"documents": self.run_batch([query], top_k)[0]}

    def run_batch(self, queries: list[str], top_k: Optional[int] = None) -> list[list[Document]]:
        hits = self.index.bm25_search(queries, top_k or self.top_k)
        return [self.index.documents(h) for h in hits]
