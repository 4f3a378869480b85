"""RAG store at MedRAG/textbooks size: query latency, persistence, RAM, and indexing throughput.

    python benchmarks/rag_latency.py [--docs 125800] [--encode_docs 256]

Latency and persistence use 125,800 synthetic snippets (words drawn with a Zipf law from the shared
textbook sample's vocabulary, ~100 words each) and synthetic clustered 384-dim embeddings: speed does not
depend on what the words mean (recall of an approximate index does, a little: real embeddings are less
neatly clustered than these, so the printed recall is an upper bound). Reported:
  * hybrid retrieval given the query embedding: BM25 + FAISS + Haystack RRF joiner, top-32 each, p50/p95;
  * the whole per-query path, MiniLM query embedding included (the Haystack retrieval pipeline);
  * build (save) time, load time and the RAM a loaded index adds (measured in a fresh process);
  * indexing throughput of the Haystack indexing pipeline (embedder → chunk writer) vs a bare
    ``SentenceTransformer.encode`` of the same texts, in the same run: the ratio must be ≥ 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic_corpus(n: int, seed: int = 0) -> list[str]:
    sample = json.loads((SHARED / "corpus" / "textbooks_sample.json").read_text())
    vocab = sorted({w for d in sample for w in re.findall(r"[A-Za-z]{3,}", d["content"])})
    rng = np.random.default_rng(seed)
    picks = np.minimum(rng.zipf(1.3, size=n * 100), len(vocab)) - 1
    return [" ".join(vocab[j] for j in picks[i * 100 : (i + 1) * 100]) for i in range(n)]


def synthetic_embeddings(n: int, dim: int = 384, clusters: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    e = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def percentiles(times: list[float]) -> str:
    ms = np.array(times) * 1000
    return f"p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms"


def build(directory: str, texts: list[str], emb: np.ndarray) -> float:
    from haystack import Document

    from medadapt.rag.local_index import LocalIndex

    index = LocalIndex(directory)
    index.check_embedder("all-minilm-l6-v2", emb.shape[1])
    step = 16384
    for start in range(0, len(texts), step):
        index.write_chunk([Document(id=f"doc{i}", content=texts[i], meta={"title": f"Book {i % 18}"},
                                    embedding=emb[i].tolist()) for i in range(start, min(start + step, len(texts)))])
    t = time.perf_counter()
    index.build()
    return time.perf_counter() - t


def dense_recall(directory: str, emb: np.ndarray, n: int = 200) -> float:
    import faiss

    from medadapt.rag.local_index import SearchIndex

    exact = faiss.IndexFlatIP(emb.shape[1])
    exact.add(emb)
    queries = synthetic_embeddings(n, seed=3)
    _, truth = exact.search(queries, 32)
    found = SearchIndex(directory).dense_search(queries, 32)
    return float(np.mean([len(set(t) & {r for r, _ in f}) / 32 for t, f in zip(truth, found)]))


def load_probe(directory: str) -> dict:
    """Load time and RSS growth of a loaded index, in a fresh interpreter."""
    code = f"""
import json, resource, time, os
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"
from medadapt.rag.local_index import SearchIndex
import faiss, bm25s, pyarrow, haystack.dataclasses  # imports are not the index
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss(); t = time.perf_counter()
index = SearchIndex({directory!r}); index.bm25_search(["heart"], 5); index.documents([(0, 1.0)])
print(json.dumps({{"load_s": time.perf_counter() - t, "ram_mb": (rss() - before) / 2**20, "docs": len(index)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=125_800)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--encode_docs", type=int, default=256, help="texts for the indexing-throughput comparison")
    args = ap.parse_args()

    from haystack.components.joiners import DocumentJoiner

    from medadapt.rag.config import IndexConfig, RetrievalConfig
    from medadapt.rag.pipelines import HybridRetriever
    from medadapt.rag.retrievers import BM25sRetriever, FaissEmbeddingRetriever

    texts = synthetic_corpus(args.docs)
    emb = synthetic_embeddings(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        directory = str(Path(tmp) / "index")
        build_s = build(directory, texts, emb)
        size_mb = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file() and "chunks" not in f.parts) / 2**20
        probe = load_probe(directory)
        print(f"corpus: {args.docs:,} synthetic snippets, 384-dim embeddings")
        built = json.loads((Path(directory) / "manifest.json").read_text())["built"]
        print(f"build search files (FAISS {built['faiss_index']} nprobe {built['nprobe']} + bm25s + docs.parquet): "
              f"{build_s:.1f} s, {size_mb:.0f} MB on disk")
        print(f"dense recall@32 against an exact flat index: {dense_recall(directory, emb):.4f}")
        print(f"load in a fresh process: {probe['load_s']:.2f} s, +{probe['ram_mb']:.0f} MB RSS "
              f"(targets: ≤ 5 s, ≤ 1,536 MB)")

        rng = np.random.default_rng(1)
        queries = [" ".join(rng.choice(texts[int(rng.integers(len(texts)))].split(), 12)) for _ in range(args.queries)]
        qemb = synthetic_embeddings(args.queries, seed=2)
        bm25, dense = BM25sRetriever(directory, top_k=32), FaissEmbeddingRetriever(directory, top_k=32)
        joiner = DocumentJoiner(join_mode="reciprocal_rank_fusion", top_k=8)
        bm25.warm_up()
        times = []
        for q, e in zip(queries, qemb):
            t = time.perf_counter()
            joiner.run(documents=[bm25.run(q)["documents"], dense.run(e.tolist())["documents"]])
            times.append(time.perf_counter() - t)
        print(f"hybrid retrieval + RRF given the query embedding: {percentiles(times[5:])} (target p50 ≤ 20 ms)")

        retriever = HybridRetriever(IndexConfig(dir=directory), RetrievalConfig(top_k=8, candidates=32))
        times = []
        for q in queries[:100]:
            t = time.perf_counter()
            retriever.retrieve(q)
            times.append(time.perf_counter() - t)
        print(f"whole per-query path (MiniLM embedding + pipeline): {percentiles(times[5:])}")

    # indexing throughput: Haystack pipeline (embedder → writer) vs bare encode, same texts, same model
    from sentence_transformers import SentenceTransformer

    from medadapt.rag.config import resolve_embedder
    from medadapt.rag.corpus import CorpusConfig
    from medadapt.rag.pipelines import build_index

    sample = texts[: args.encode_docs]
    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = Path(tmp) / "corpus.jsonl"
        corpus_file.write_text("\n".join(json.dumps({"id": str(i), "text": t}) for i, t in enumerate(sample)))
        model = SentenceTransformer(resolve_embedder("all-minilm-l6-v2"), device="cpu")
        model.encode(sample[:32], batch_size=32)  # warm-up
        t = time.perf_counter()
        model.encode(sample, batch_size=64, normalize_embeddings=True)
        bare = len(sample) / (time.perf_counter() - t)
        cfg = IndexConfig(dir=str(Path(tmp) / "idx"), batch_size=64, chunk_size=len(sample))
        t = time.perf_counter()
        stats = build_index(CorpusConfig(data_files=str(corpus_file), text_fields=["text"], title_field=None), cfg)
        whole = len(sample) / (time.perf_counter() - t)
        piped = stats["docs_per_s"]
    print(f"indexing throughput: Haystack pipeline (embed + write chunk) {piped:.1f} docs/s vs bare encode "
          f"{bare:.1f} docs/s → {piped / bare:.2f}× (target ≥ 0.9×); whole command incl. model load and "
          f"search-file build {whole:.1f} docs/s")


if __name__ == "__main__":
    main()
