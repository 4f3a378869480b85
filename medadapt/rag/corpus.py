"""A retrieval corpus as Haystack Documents: MedRAG/textbooks from the hub, or any local JSON/JSONL file.

Rows come through ``data.sources.load_rows`` like every other table in medadapt. A field mapping
names the id, the text and the title, so MedQuAD (question/answer/focus) goes in as easily as the
MedRAG snippet format (id/title/content). Rows without usable text and repeated ids are skipped and
counted, never indexed half-formed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

log = logging.getLogger(__name__)


@dataclass
class CorpusConfig:
    """Where the snippets come from and which fields hold what.

    Args:
        dataset: Hub dataset id (MedRAG/textbooks: 125,847 snippets with id, title, content, contents).
        name: Hub dataset configuration, if any.
        split: Split to read.
        data_files: Local JSON array / JSONL / parquet file(s); when set, ``dataset`` is ignored.
        id_field: Field with a unique document id; null derives ids from the text (duplicate texts are
            then indexed once).
        text_fields: Fields joined (blank line between) into the document text, e.g. [content] for
            MedRAG, [question, answer] for MedQuAD.
        title_field: Field kept as ``meta.title``, embedded and BM25-indexed with the text; null for none.
        max_docs: Index only the first N rows (null: all).
    """

    dataset: str = "MedRAG/textbooks"
    name: Optional[str] = None
    split: str = "train"
    data_files: Union[str, list[str], None] = None
    id_field: Optional[str] = "id"
    text_fields: list[str] = field(default_factory=lambda: ["content"])
    title_field: Optional[str] = "title"
    max_docs: Optional[int] = None


def documents(cfg: CorpusConfig) -> Iterator:
    """Yield one Haystack ``Document`` per usable row; skipped rows are counted and logged at the end."""
    from haystack import Document

    from medadapt.data.sources import describe_source, load_rows

    source = describe_source(cfg.dataset, cfg.data_files)
    rows = load_rows(cfg.dataset, cfg.name, cfg.split, cfg.data_files, max_rows=cfg.max_docs)
    missing = [f for f in [cfg.id_field, cfg.title_field, *cfg.text_fields] if f and f not in rows.column_names]
    if missing:
        raise KeyError(f"{source}: field(s) {missing} not in the corpus (it has {rows.column_names}); "
                       "set corpus.id_field / text_fields / title_field")
    skipped: Counter = Counter()
    seen: set[str] = set()
    for i, row in enumerate(rows):
        parts = [row.get(f) for f in cfg.text_fields]
        texts = [p.strip() for p in parts if isinstance(p, str) and p.strip()]
        if not texts:
            skipped["no text in " + "/".join(cfg.text_fields)] += 1
            continue
        meta = {"row": i}
        title = row.get(cfg.title_field) if cfg.title_field else None
        if isinstance(title, str) and title.strip():
            meta["title"] = title.strip()
        doc_id = row.get(cfg.id_field) if cfg.id_field else None
        if cfg.id_field and (doc_id is None or str(doc_id).strip() == ""):
            skipped[f"empty {cfg.id_field}"] += 1
            continue
        doc = Document(id=str(doc_id) if doc_id is not None else "", content="\n\n".join(texts), meta=meta)
        if doc.id in seen:
            skipped["duplicate id"] += 1
            continue
        seen.add(doc.id)
        yield doc
    if skipped:
        log.warning("%s: skipped %d rows (%s)", source, sum(skipped.values()),
                    ", ".join(f"{n} {why}" for why, n in skipped.items()))
