"""Retrieved snippets → the context block of a prompt, and the RAG arm of the test stage.

One formatter serves ``ask`` and the benchmarks, so what a user sees answered is what was scored. The
block fits a token budget of the *answering* model's tokenizer: whole snippets while they fit, then the
next one cut at a token boundary and backed off to a word boundary, marked with "…".
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from medadapt.rag.config import IndexConfig, RetrievalConfig

from medadapt.files import UnreadableFileError, read_json, write_json

log = logging.getLogger(__name__)
HEADER = "Context:\n"


def snippet_text(doc) -> str:
    title = (doc.meta or {}).get("title")
    return f"{title}: {doc.content}" if title else doc.content


def format_context(snippets: list[str], tokenizer, max_tokens: int) -> tuple[str, int]:
    """The block (``""`` when there is nothing to show) and how many snippets it carries, whole or cut."""
    budget = max_tokens - len(tokenizer.encode(HEADER, add_special_tokens=False))
    lines: list[str] = []
    for i, text in enumerate(snippets):
        line = f"[{i + 1}] {' '.join(text.split())}\n"
        ids = tokenizer.encode(line, add_special_tokens=False)
        if len(ids) <= budget:
            lines.append(line)
            budget -= len(ids)
            continue
        cut = tokenizer.decode(ids[: max(budget - 2, 0)])  # room for " …\n"
        cut = cut[: cut.rfind(" ")] if " " in cut else ""
        if cut.strip() and cut.strip() != f"[{i + 1}]":
            lines.append(cut.rstrip() + " …\n")
        break
    return (HEADER + "".join(lines) + "\n" if lines else ""), len(lines)


@dataclass
class RagArmConfig:
    """Benchmark prompts with retrieved snippets (the RAG method in the test stage).

    Args:
        index: The index to read (as ``index`` built it: folder, store, embedder; for the local store the
            embedder is read from the index's manifest).
        retrieval: Hybrid retrieval settings (snippets after fusion, candidates per retriever).
        max_context_tokens: Token budget of the context block, in the evaluated model's tokens.
        cache: Keep each question's retrieved snippets in ``<index dir>/retrieval_cache`` and reuse them.
    """

    index: IndexConfig = field(default_factory=IndexConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    max_context_tokens: int = 1024
    cache: bool = True

    def __post_init__(self) -> None:  # nested dicts from YAML or the command line
        if isinstance(self.index, dict):
            self.index = IndexConfig(**self.index)
        if isinstance(self.retrieval, dict):
            self.retrieval = RetrievalConfig(**self.retrieval)


def retrieve_cached(cfg: RagArmConfig, questions: list[str]) -> list[list[dict]]:
    """Per question: [{id, text}, …], retrieved once per (index build, settings, question)."""
    from medadapt.rag.pipelines import HybridRetriever
    from medadapt.rag.stores import open_store

    store = open_store(cfg.index)
    key = json.dumps([store.version(), cfg.index.store, cfg.retrieval.top_k, cfg.retrieval.candidates], sort_keys=True)
    path = Path(cfg.index.dir) / "retrieval_cache" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    cache: dict = {}
    if cfg.cache and path.exists():
        try:
            cache = read_json(path, "retrieval cache")
        except UnreadableFileError as e:  # a cache: rebuilt, never trusted when cut
            log.warning("%s; retrieving again", e)
    digest = [hashlib.sha256(q.encode()).hexdigest() for q in questions]
    todo = sorted({d: q for d, q in zip(digest, questions) if d not in cache}.items())
    if todo:
        log.info("retrieving for %d questions (%d cached)", len(todo), len(questions) - len(todo))
        embedder = store.recorded_embedder()
        index = replace(cfg.index, embedder=embedder) if embedder else cfg.index
        found = HybridRetriever(index, cfg.retrieval, store).retrieve_batch([q for _, q in todo])
        for (d, _), docs in zip(todo, found):
            cache[d] = [{"id": doc.id, "text": snippet_text(doc), "score": doc.score} for doc in docs]
        if cfg.cache:
            write_json(path, cache)
    return [cache[d] for d in digest]


def with_context(items: list, cfg: RagArmConfig, tokenizer) -> list:
    """Copies of ``items`` whose prompts start with the retrieved context; choices and gold untouched."""
    hits = retrieve_cached(cfg, [it.question for it in items])
    out = []
    for item, found in zip(items, hits):
        block, used = format_context([h["text"] for h in found], tokenizer, cfg.max_context_tokens)
        extra = {**item.extra, "retrieved_ids": [h["id"] for h in found[:used]]}
        out.append(replace(item, prompt=block + item.prompt, context=block, extra=extra))
    return out
