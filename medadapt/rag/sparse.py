"""BM25-style sparse vectors for a Qdrant store, made without a hub download.

Qdrant's own BM25 path (fastembed) downloads its tokenizer from the hub, which these machines cannot
reach. These two components produce the same kind of vector locally: hashed, stemmed terms with BM25's
saturated term frequency on documents and weight 1 on queries; Qdrant multiplies in the IDF server-side
(``sparse_idf=True``) and fuses with the dense results by RRF (``QdrantHybridRetriever``). So a server
store does BM25 + dense + fusion where the data lives, and the client sends two small vectors.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import replace

from haystack import Document, component
from haystack.dataclasses import SparseEmbedding

from medadapt.rag.local_index import bm25_tokens


def _term_ids(text: str) -> Counter:
    return Counter(zlib.crc32(t.encode()) & 0x7FFFFFFF for t in bm25_tokens([text], return_ids=False)[0])


def mean_length(corpus_documents) -> float:
    """BM25's average document length (in its terms) over a corpus: ``corpus_documents()`` yields Documents."""
    total = count = 0
    for doc in corpus_documents():
        title = (doc.meta or {}).get("title")
        total += sum(_term_ids(f"{title}\n{doc.content}" if title else doc.content or "").values())
        count += 1
    return total / count if count else 1.0


@component
class BM25SparseDocumentEmbedder:
    """Sets ``sparse_embedding`` on each document: BM25 term-frequency weights (k1, b, avg_length: the corpus's
    mean length in terms, measured by ``mean_length`` before indexing)."""

    def __init__(self, k1: float = 1.2, b: float = 0.75, avg_length: float = 120.0):
        self.k1, self.b, self.avg_length = k1, b, avg_length

    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document]) -> dict:
        out = []
        for doc in documents:
            title = (doc.meta or {}).get("title")
            tf = _term_ids(f"{title}\n{doc.content}" if title else doc.content or "")
            norm = self.k1 * (1 - self.b + self.b * sum(tf.values()) / self.avg_length)
            ids = sorted(tf)
            weights = [tf[i] * (self.k1 + 1) / (tf[i] + norm) for i in ids]
            out.append(replace(doc, sparse_embedding=SparseEmbedding(indices=ids, values=weights)))
        return {"documents": out}


@component
class BM25SparseQueryEmbedder:
    """The query side: each distinct term once."""

    @component.output_types(sparse_embedding=SparseEmbedding)
    def run(self, text: str) -> dict:
        ids = sorted(_term_ids(text))
        return {"sparse_embedding": SparseEmbedding(indices=ids, values=[1.0] * len(ids))}
