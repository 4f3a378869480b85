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
from itertools import islice
from pathlib import Path

from medadapt.rag.config import IndexConfig, RetrievalConfig, document_embedder, text_embedder
from medadapt.rag.stores import open_store

log = logging.getLogger(__name__)


def indexing_pipeline(cfg: IndexConfig, store=None, corpus_documents=None):
    """Embedder → the store's writer (and, for Qdrant, the sparse embedder between them)."""
    from haystack import Pipeline

    store = store or open_store(cfg)
    p = Pipeline()
    p.add_component("embedder", document_embedder(cfg))
    previous = "embedder"
    for name, component in store.writer(corpus_documents):
        p.add_component(name, component)
        p.connect(f"{previous}.documents", f"{name}.documents")
        previous = name
    return p


def retrieval_pipeline(cfg: IndexConfig, retrieval: RetrievalConfig, store=None):
    """Query embedder → the store's hybrid retrieval (BM25 + dense, fused by RRF); output ``documents``."""
    from haystack import Pipeline

    p = Pipeline()
    p.add_component("query_embedder", text_embedder(cfg))
    (store or open_store(cfg)).add_retrievers(p, retrieval)
    return p


def build_index(corpus_cfg, cfg: IndexConfig, rebuild: bool = False, store=None) -> dict:
    """Embed and store every corpus document the index does not hold yet, or holds with another text (content
    hash); returns counts and rates. The store is locked for the whole run; ``rebuild`` starts over."""
    from tqdm.auto import tqdm

    from medadapt.rag.corpus import documents
    from medadapt.rag.local_index import content_hash

    store = store or open_store(cfg)
    with store.writing():
        if rebuild:
            store.forget()
            log.warning("index %s: emptied for a rebuild", cfg.dir)
        docs = documents(corpus_cfg)
        store.check_embedder(cfg.embedder)
        done = store.indexed()
        pipeline = indexing_pipeline(cfg, store, corpus_documents=lambda: documents(corpus_cfg))
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
        start = time.perf_counter()
        built = store.finish()
        log.info("search files %s in %.1f s", "built" if built else "current", time.perf_counter() - start)
    stats = {"embedded": embedded, "changed": changed, "already_indexed": skipped,
             "docs_per_s": embedded / seconds if seconds else None, "rebuilt": built}
    log.info("index %s: %s", cfg.dir, stats)
    return stats


class HybridRetriever:
    """The retrieval pipeline over one store, plus a batch path for the benchmark arm."""

    def __init__(self, cfg: IndexConfig, retrieval: RetrievalConfig, store=None):
        self.cfg, self.retrieval = cfg, retrieval
        self.store = store or open_store(cfg)
        recorded = self.store.recorded_embedder()
        if recorded and recorded != cfg.embedder:  # another model's query vectors match nothing, silently
            raise ValueError(f"index {cfg.dir} was embedded with {recorded!r}; queries must be embedded by the same "
                             f"model, not {cfg.embedder!r}: set index.embedder to {recorded!r}")
        if recorded:
            self.store.check_embedder(cfg.embedder)  # the same name with other weights matches nothing either
        self.pipeline = retrieval_pipeline(cfg, retrieval, self.store)
        self.pipeline.warm_up()

    def inputs(self, question: str) -> dict:
        return {"query_embedder": {"text": question}, **self.store.query_inputs(question)}

    def retrieve(self, question: str) -> list:
        if not question or not question.strip():
            raise ValueError("empty query: give the question to retrieve for")
        out = self.pipeline.run(self.inputs(question))
        return next(v["documents"] for v in out.values() if "documents" in v)

    def retrieve_batch(self, questions: list[str]) -> list[list]:
        """Same results as ``retrieve`` per question; empty questions get no documents."""
        return self.store.retrieve_batch(self, questions)


# Haystack refuses to deserialize classes from modules it does not know: name ours (and nothing more)
MEDADAPT_COMPONENT_MODULES = ["medadapt.rag.retrievers", "medadapt.rag.sparse"]


def load_pipeline(yaml_text: str):
    """A pipeline written by ``save_pipeline`` / ``Pipeline.dumps``, allowing medadapt's components."""
    from haystack import Pipeline

    return Pipeline.loads(yaml_text, allowed_modules=MEDADAPT_COMPONENT_MODULES)


def save_pipeline(pipeline, path: str) -> Path:
    from medadapt.files import write_atomic

    return write_atomic(path, pipeline.dumps())
