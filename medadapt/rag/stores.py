"""The two places an index can live, behind one interface, chosen once (``open_store``).

``LocalStore``: FAISS + bm25s + Parquet files in a folder (``local_index.py``), fast at MedRAG/textbooks
size on one machine. ``QdrantStore``: a Qdrant server, or Qdrant's local mode in a folder (same client
code), BM25-style sparse vectors made here (``sparse.py``) and fused server-side. Everything that indexes
or retrieves holds a store object and asks it; nothing else switches on the store's name, and a store
keeps its own loaded files or client (no module-level caches).
"""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class LocalStore:
    """An index folder: chunked writes while indexing, search files for querying (loaded once per store)."""

    name = "local"

    def __init__(self, cfg):
        from medadapt.rag.local_index import LocalIndex

        self.cfg, self.index = cfg, LocalIndex(cfg.dir)
        self._search = None

    # indexing
    def writing(self):
        return self.index.writing()

    def check_embedder(self, embedder: str) -> None:
        from medadapt.rag.config import embedder_identity

        self.index.check_embedder(embedder, embedder_identity(embedder))

    def indexed(self) -> dict[str, str]:
        return self.index.indexed()

    def writer(self, corpus_documents=None):
        from medadapt.rag.retrievers import LocalIndexWriter

        return [("writer", LocalIndexWriter(self.cfg.dir, embedder=self.cfg.embedder))]

    def finish(self) -> bool:
        return self.index.build(self.cfg.faiss_factory)

    def forget(self) -> None:
        for name in ("chunks", "bm25", "retrieval_cache"):
            shutil.rmtree(Path(self.cfg.dir) / name, ignore_errors=True)
        for name in ("manifest.json", "dense.faiss", "docs.parquet"):
            (Path(self.cfg.dir) / name).unlink(missing_ok=True)

    # retrieval
    def search_index(self):
        """The built search files, loaded on first use and reloaded when a new build replaced them."""
        from medadapt.rag.local_index import SearchIndex

        built = self.index.manifest().get("built")
        if self._search is None or self._search.manifest.get("built") != built:
            self._search = SearchIndex(self.cfg.dir)
        return self._search

    def version(self) -> str:
        """Changes whenever the searchable content does (keys the retrieval cache)."""
        import json

        return json.dumps(self.index.manifest().get("built"), sort_keys=True)

    def recorded_embedder(self) -> Optional[str]:
        return self.index.manifest().get("embedder")

    def add_retrievers(self, pipeline, retrieval) -> None:
        """Add BM25 + dense + RRF after the pipeline's ``query_embedder``."""
        from haystack.components.joiners import DocumentJoiner

        from medadapt.rag.retrievers import BM25sRetriever, FaissEmbeddingRetriever

        pipeline.add_component("bm25", BM25sRetriever(self.cfg.dir, top_k=retrieval.candidates, store=self))
        pipeline.add_component("dense", FaissEmbeddingRetriever(self.cfg.dir, top_k=retrieval.candidates, store=self))
        pipeline.add_component("joiner", DocumentJoiner(join_mode="reciprocal_rank_fusion", top_k=retrieval.top_k))
        pipeline.connect("query_embedder.embedding", "dense.query_embedding")
        pipeline.connect("bm25.documents", "joiner.documents")
        pipeline.connect("dense.documents", "joiner.documents")

    def query_inputs(self, question: str) -> dict:
        return {"bm25": {"query": question}}

    def retrieve_batch(self, retriever, questions: list[str]) -> list[list]:
        """Embed all questions in batches, then BM25 + FAISS + RRF per question: ``retrieve`` per question."""
        import numpy as np
        from haystack import Document

        from medadapt.rag.config import document_embedder

        keep = [i for i, q in enumerate(questions) if q and q.strip()]
        results: list[list] = [[] for _ in questions]
        if not keep:
            return results
        embedder = document_embedder(self.cfg)  # the same model and normalization, in batches
        embedder.warm_up()
        embedded = embedder.run([Document(content=questions[i]) for i in keep])["documents"]
        pipeline = retriever.pipeline
        dense = pipeline.get_component("dense").run_batch(np.asarray([d.embedding for d in embedded]))
        sparse = pipeline.get_component("bm25").run_batch([questions[i] for i in keep])
        joiner = pipeline.get_component("joiner")
        for i, s, d in zip(keep, sparse, dense):
            results[i] = joiner.run(documents=[s, d])["documents"]
        return results


class QdrantStore:
    """A Qdrant collection: a server at ``qdrant_url`` (API key from QDRANT_API_KEY) or local mode in ``dir``."""

    name = "qdrant"

    def __init__(self, cfg):
        from haystack.utils import Secret
        from haystack_integrations.document_stores.qdrant import QdrantDocumentStore

        self.cfg = cfg
        where = {"url": cfg.qdrant_url, "api_key": Secret.from_env_var("QDRANT_API_KEY", strict=False)} \
            if cfg.qdrant_url else {"path": cfg.dir}
        # one client per store: Qdrant's local mode locks its folder to a single client
        self.documents = QdrantDocumentStore(**where, index=cfg.qdrant_collection, embedding_dim=cfg.embedding_dim,
                                             use_sparse_embeddings=True, sparse_idf=True, similarity="cosine",
                                             progress_bar=False)

    def writing(self):
        return nullcontext()  # the server serializes writes; DuplicatePolicy.OVERWRITE keeps one copy per id

    def check_embedder(self, embedder: str) -> None:
        pass  # the collection's vector size is checked by Qdrant on write

    def indexed(self) -> dict[str, str]:
        if not self.documents.count_documents():
            return {}
        return {d.id: (d.meta or {}).get("hash") for d in self.documents.filter_documents()}

    def writer(self, corpus_documents=None):
        from haystack.components.writers import DocumentWriter
        from haystack.document_stores.types import DuplicatePolicy

        from medadapt.rag.sparse import BM25SparseDocumentEmbedder, mean_length

        avg = mean_length(corpus_documents) if corpus_documents is not None else None
        return [("sparse", BM25SparseDocumentEmbedder(**({"avg_length": avg} if avg else {}))),
                ("writer", DocumentWriter(self.documents, policy=DuplicatePolicy.OVERWRITE))]

    def finish(self) -> bool:
        return False

    def forget(self) -> None:
        ids = [d.id for d in self.documents.filter_documents()]
        if ids:
            self.documents.delete_documents(ids)

    def version(self) -> str:
        return f"{self.cfg.qdrant_url or Path(self.cfg.dir).resolve()}:{self.documents.count_documents()}"

    def recorded_embedder(self) -> Optional[str]:
        return None

    def add_retrievers(self, pipeline, retrieval) -> None:
        """Add the sparse query embedder and Qdrant's hybrid retriever (fused server-side)."""
        from haystack_integrations.components.retrievers.qdrant import QdrantHybridRetriever

        from medadapt.rag.sparse import BM25SparseQueryEmbedder

        pipeline.add_component("sparse", BM25SparseQueryEmbedder())
        pipeline.add_component("hybrid", QdrantHybridRetriever(self.documents, top_k=retrieval.top_k))
        pipeline.connect("query_embedder.embedding", "hybrid.query_embedding")
        pipeline.connect("sparse.sparse_embedding", "hybrid.query_sparse_embedding")

    def query_inputs(self, question: str) -> dict:
        return {"sparse": {"text": question}}

    def retrieve_batch(self, retriever, questions: list[str]) -> list[list]:
        return [retriever.retrieve(q) if q and q.strip() else [] for q in questions]


def open_store(cfg):
    """The store an ``IndexConfig`` names: the one place that looks at ``cfg.store``."""
    return {"local": LocalStore, "qdrant": QdrantStore}[cfg.store](cfg)

