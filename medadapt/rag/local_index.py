"""The embedded document store: FAISS for dense vectors, bm25s for BM25, Parquet for the texts.

Why not Haystack's ``InMemoryDocumentStore``: at MedRAG/textbooks size (125,800 snippets) its BM25 and
embedding retrievers took 3.5–4.5 s per query and its JSON persistence 1.2 GB / 89 s to load (measured
2026-11-26 on the 2-core CPU with haystack-ai 3.4; benchmarks/rag_latency.py measures this store).
``faiss-haystack`` pins numpy<2, which the rest of the stack has left. So the
store is built from the libraries made for each half: FAISS (``SQfp16``: half the memory of a flat
index, recall@32 0.999 against it) and bm25s (sparse-matrix BM25, ~2 ms per query), with Haystack
components around them (``rag/retrievers.py``).

Layout of an index folder::

    manifest.json        embedder, dimension, committed chunks, what the search files were built from,
                         and each search file's size and SHA-256
    chunks/NNNNNN.parquet  id, hash, content, meta (JSON), embedding: one per indexing step, written atomically
    docs.parquet, dense.faiss, bm25/   search files, rebuilt from the chunks when they change
    .lock                held by the run that writes the folder

Chunks are the checkpoint: an interrupted run keeps every chunk it committed and a re-run embeds only
documents whose id no chunk holds or whose text changed (content hash); a later chunk's version of a
document supersedes an earlier one, and the search files hold each id once. Search files that do not match
their recorded size and hash are reported as corrupt (``index --rebuild`` starts over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)
BM25_STOPWORDS = "en"
SEARCH_FILES = ("dense.faiss", "docs.parquet", "bm25")


class IndexCorruptError(RuntimeError):
    """An index file that does not match what the manifest recorded (truncated, edited, half-written)."""


def content_hash(text: str, title: str = "") -> str:
    """What a document's embedding depends on: a changed text or title means a new embedding."""
    return hashlib.sha256(json.dumps([title, text], ensure_ascii=False).encode()).hexdigest()[:32]


def file_digest(path: Path) -> dict:
    """Size and SHA-256 of a file, or of every file in a folder (sorted by name)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h, size = hashlib.sha256(), 0
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
                size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def bm25_tokens(texts: list[str], return_ids: bool = True):
    """bm25s's tokenizer: lower-case words of 2+ characters, English stopwords out, Snowball-stemmed."""
    import bm25s

    return bm25s.tokenize(texts, stopwords=BM25_STOPWORDS, stemmer=_stemmer(), return_ids=return_ids,
                          show_progress=False)


def _write_atomic(path: Path, write) -> None:
    from medadapt.files import write_atomic

    write_atomic(path, write)


def dense_layout(factory: str, n: int) -> tuple[str, int]:
    """The FAISS index for ``n`` vectors, and how many inverted lists a query visits (0: not IVF).

    ``auto``: below 50,000 vectors a scan of fp16 vectors (``SQfp16``: recall@32 0.998 against an exact
    flat index, 14 ms at 125,800); above, the same vectors in ``IVF{nlist}`` lists (nlist ≈ 4·√n, a power
    of two) of which a query scans 1/8 (2 ms at 125,800, recall@32 0.999 on clustered synthetic
    embeddings: benchmarks/rag_latency.py measures it against an exact index in every run).
    """
    if factory != "auto":
        return factory, 0
    if n < 50_000:
        return "SQfp16", 0
    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))
    return f"IVF{nlist},SQfp16", max(nlist // 8, 1)


class LocalIndex:
    """An index folder: chunked writes while indexing, then search files for querying."""

    def __init__(self, directory: str):
        self.dir = Path(directory)
        self.manifest_path = self.dir / "manifest.json"

    # ---- manifest --------------------------------------------------------------------------------
    def manifest(self) -> dict:
        if self.manifest_path.exists():
            from medadapt.files import read_json

            return read_json(self.manifest_path, "index manifest")
        return {"chunks": [], "built": None}

    def _save_manifest(self, manifest: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=1)))

    def check_embedder(self, embedder: str, identity: Optional[str] = None) -> None:
        """Refuse to mix embedders in one index: the vectors would not be comparable, whether the embedder's name
        changed or its weights did under the same name (``identity``: its content digest). The embedder is recorded
        with the first committed chunk, so a run that indexes nothing leaves no manifest."""
        m = self.manifest()
        if m.get("embedder") and m["embedder"] != embedder:
            raise ValueError(f"{self.dir} was embedded with {m['embedder']!r}, not {embedder!r}; "
                             "use another index dir or the same embedder")
        if identity and m.get("embedder_identity") and m["embedder_identity"] != identity:
            raise ValueError(f"{self.dir} was embedded with {m['embedder']!r} as it was then ({m['embedder_identity'][:19]}…"
                             f"); its weights are now other ones ({identity[:19]}…): their vectors match nothing in this "
                             "index. Rebuild it (index --rebuild true) or restore the embedder")
        self._embedder_identity = identity

    @contextmanager
    def writing(self):
        """Hold the folder's lock while indexing: a second run waits, then finds the documents indexed."""
        from filelock import FileLock, Timeout

        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.dir / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("%s is being indexed by another run: waiting for it to finish", self.dir)
            lock.acquire()
        try:
            yield self
        finally:
            lock.release()

    def _read_chunk(self, name: str, columns: Optional[list[str]] = None):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(self.dir / "chunks" / name, columns=columns)
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise IndexCorruptError(f"index {self.dir} is corrupt: chunk {name} cannot be read ({e}); run "
                                    "`python -m medadapt index --rebuild` to embed the corpus again") from e

    # ---- indexing --------------------------------------------------------------------------------
    def indexed(self) -> dict[str, str]:
        """Every committed document id → the content hash of its latest version."""
        out: dict[str, str] = {}
        for name in self.manifest()["chunks"]:
            table = self._read_chunk(name, ["id", "hash"])
            out.update(zip(table.column("id").to_pylist(), table.column("hash").to_pylist()))
        return out

    def indexed_ids(self) -> set[str]:
        return set(self.indexed())

    def write_chunk(self, docs: list, embedder: Optional[str] = None) -> int:
        """Commit embedded documents as one chunk (file first, then the manifest that lists it)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not docs:
            return 0
        emb = np.asarray([d.embedding for d in docs], dtype=np.float32)
        table = pa.table({
            "id": [d.id for d in docs],
            "hash": [content_hash(d.content, (d.meta or {}).get("title", "")) for d in docs],
            "content": [d.content for d in docs],
            "meta": [json.dumps(d.meta, ensure_ascii=False) for d in docs],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        })
        m = self.manifest()
        name = f"{len(m['chunks']):06d}.parquet"
        (self.dir / "chunks").mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / "chunks" / name, lambda p: pq.write_table(table, p))
        m["chunks"].append(name)
        m["dim"] = int(emb.shape[1])
        if embedder and not m.get("embedder"):
            m["embedder"] = embedder
            if getattr(self, "_embedder_identity", None):
                m["embedder_identity"] = self._embedder_identity
        self._save_manifest(m)
        return len(docs)

    def verify(self) -> Optional[str]:
        """None when every search file matches the size and hash recorded at build, else what is wrong."""
        recorded = (self.manifest().get("built") or {}).get("files") or {}
        for name in SEARCH_FILES:
            path = self.dir / name
            if name not in recorded:
                return f"{name} has no recorded size and hash"
            if not path.exists():
                return f"{name} is missing"
            actual = file_digest(path)
            if actual != recorded[name]:
                return (f"{name} is {actual['size']:,} bytes with another hash; the build wrote "
                        f"{recorded[name]['size']:,} bytes")
        return None

    def build(self, faiss_factory: str = "auto") -> bool:
        """(Re)build the search files from the chunks; False when they are already current and intact."""
        import bm25s
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        m = self.manifest()
        if not m["chunks"]:
            raise ValueError(f"{self.dir}: nothing indexed (the corpus gave no documents)")
        built = m.get("built") or {}
        if built.get("chunks") == m["chunks"] and built.get("faiss_factory") == faiss_factory:
            problem = self.verify()
            if problem is None:
                return False
            log.warning("index %s: %s; rebuilding the search files from the chunks", self.dir, problem)
        table = pa.concat_tables([self._read_chunk(n) for n in m["chunks"]])
        # each id once, its latest version: a later chunk re-embedded a changed document
        ids = table.column("id").to_pylist()
        last = {doc_id: row for row, doc_id in enumerate(ids)}
        if len(last) < len(ids):
            log.info("index %s: %d superseded document versions left out", self.dir, len(ids) - len(last))
            table = table.take(pa.array(sorted(last.values())))
        emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
        factory, nprobe = dense_layout(faiss_factory, len(emb))
        dense = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        dense.train(emb)
        dense.add(emb)
        _write_atomic(self.dir / "dense.faiss", lambda p: faiss.write_index(dense, str(p)))
        docs = table.drop(["embedding"])
        _write_atomic(self.dir / "docs.parquet", lambda p: pq.write_table(docs, p))
        titles = [json.loads(meta).get("title", "") for meta in docs.column("meta").to_pylist()]
        texts = [f"{t}\n{c}" if t else c for t, c in zip(titles, docs.column("content").to_pylist())]
        bm25 = bm25s.BM25()
        bm25.index(bm25_tokens(texts), show_progress=False)
        import tempfile

        tmp_bm25 = Path(tempfile.mkdtemp(dir=self.dir, prefix=".bm25.", suffix=".tmp"))  # a fresh name: no link followed
        bm25.save(str(tmp_bm25), show_progress=False)
        if (self.dir / "bm25").exists():
            import shutil

            shutil.rmtree(self.dir / "bm25")
        os.replace(tmp_bm25, self.dir / "bm25")
        files = {name: file_digest(self.dir / name) for name in SEARCH_FILES}
        m["built"] = {"chunks": m["chunks"], "faiss_factory": faiss_factory, "faiss_index": factory, "nprobe": nprobe,
                      "files": files}
        m["documents"] = len(docs)
        self._save_manifest(m)
        return True


class SearchIndex:
    """A built index, loaded for querying: rows are positions in ``docs.parquet``."""

    def __init__(self, directory: str):
        import bm25s
        import faiss
        import pyarrow.parquet as pq

        self.dir = Path(directory)
        local = LocalIndex(directory)
        m = local.manifest()
        if not m.get("built"):
            raise FileNotFoundError(f"{self.dir} holds no built index; run `python -m medadapt index` first")
        problem = local.verify()
        if problem:
            raise IndexCorruptError(f"index {self.dir} is corrupt: {problem}; run `python -m medadapt index` "
                                    "(rebuilds the search files from the chunks) or `index --rebuild`")
        self.manifest = m
        self.dense = faiss.read_index(str(self.dir / "dense.faiss"))
        if m["built"].get("nprobe"):
            faiss.extract_index_ivf(self.dense).nprobe = m["built"]["nprobe"]
        self.bm25 = bm25s.BM25.load(str(self.dir / "bm25"), mmap=True, show_progress=False)
        self.docs = pq.read_table(self.dir / "docs.parquet")

    def __len__(self) -> int:
        return len(self.docs)

    def dense_search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        scores, rows = self.dense.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self)))
        return [[(int(r), float(s)) for r, s in zip(rs, ss) if r >= 0] for rs, ss in zip(rows, scores)]

    def bm25_search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        out = []
        for words in bm25_tokens(queries, return_ids=False):
            words = [w for w in words if w in self.bm25.vocab_dict]
            if not words:  # empty query, or only stopwords / words the corpus never uses
                out.append([])
                continue
            rows, scores = self.bm25.retrieve([words], k=min(k, len(self)), show_progress=False, n_threads=1)
            out.append([(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if s > 0])
        return out

    def documents(self, hits: list[tuple[int, float]]):
        from haystack import Document

        if not hits:
            return []
        records = self.docs.take([row for row, _ in hits]).to_pylist()
        return [Document(id=r["id"], content=r["content"], meta=json.loads(r["meta"]), score=score)
                for r, (_, score) in zip(records, hits)]
