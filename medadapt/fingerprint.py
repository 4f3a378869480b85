"""Content fingerprints: what reuse decisions compare, instead of paths and names.

A multistep stage is done if its recorded fingerprint (the resolved config, its arguments, the base model,
the adapters under it and the data) equals the one computed now; an evaluation is current if it scored the
same weights and items; an adapter trained on top of another records that one's digest, so a retrained CPT
adapter is noticed by every SFT adapter stacked on it; a base model is the same if its files are.

Digests are sha256 of file contents. Large files (a base model's weights) are hashed once per machine and
remembered by (real path, size, mtime) in ``$MEDADAPT_CACHE/digests.json``: a changed file has a new mtime and
is hashed again. A hub id with no local copy is identified by id and revision, the most that is known
offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from medadapt.files import cache_dir, read_json, write_json

log = logging.getLogger(__name__)

#: the files that are an adapter (PEFT writes them; medadapt's metadata is a record about them, not them)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
#: the files that are a model's weights and architecture
MODEL_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.gguf")


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_value(value: Any) -> str:
    """A JSON-able value's digest, independent of key order."""
    return digest_bytes(json.dumps(value, sort_keys=True, default=str).encode())


def _cache_path() -> Path:
    return cache_dir() / "digests.json"


def file_digest(path: Union[str, Path]) -> str:
    """sha256 of a file's bytes, remembered by (real path, inode, size, mtime_ns, ctime_ns). The change time is the
    kernel's: a file replaced by other bytes of the same size with its modification time set back (``touch -r``,
    ``cp -p``) still gets a new ctime, so its digest is computed again."""
    real = Path(path).resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    small = stat.st_size < (64 << 20)
    cached = {} if small else _read_cache()
    if key in cached:
        return cached[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    value = h.hexdigest()
    if not small:
        from filelock import FileLock

        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(_cache_path()) + ".lock"):
            write_json(_cache_path(), {**_read_cache(), key: value})
    return value


def _read_cache() -> dict:
    """The remembered digests (an unreadable cache is an empty one: it only saves work)."""
    try:
        return read_json(_cache_path())
    except (FileNotFoundError, ValueError):
        return {}


def files_digest(folder: Union[str, Path], names: Iterable[str]) -> str:
    """Digest of the named files (glob patterns allowed) of a folder, by relative name."""
    folder = Path(folder)
    found = sorted({p for pattern in names for p in folder.glob(pattern) if p.is_file()})
    return digest_value({p.relative_to(folder).as_posix(): file_digest(p) for p in found})


def adapter_digest(folder: Union[str, Path]) -> str:
    """What an adapter is: its PEFT config and weights."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"no PEFT adapter at {folder} (adapter_config.json missing)")
    return files_digest(folder, ADAPTER_FILES)


def model_identity(name_or_path: str, revision: Optional[str] = None, folder: Optional[Path] = None) -> str:
    """A base model's identity: the digest of its config and weight files where they are on this machine
    (``folder``: a local or packaged model, resolved by the caller; else the hub cache), else
    ``hub:<id>@<revision>``."""
    folder = Path(folder) if folder is not None else _hub_snapshot(name_or_path, revision)
    if folder is None or not (folder / "config.json").exists():
        return f"hub:{name_or_path}@{revision or 'main'}"
    return "sha256:" + files_digest(folder, MODEL_PATTERNS)


def _hub_snapshot(repo: str, revision: Optional[str]) -> Optional[Path]:
    """The hub cache's copy of ``repo`` (no download), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not a hub id: nothing on this machine to hash
        return None


def data_identity(dataset: str, data_files: Union[str, list, None], **settings) -> dict:
    """What a data source is: local files by content, a hub dataset by id (and the settings that shape it)."""
    if data_files:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        return {"data_files": {str(f): file_digest(f) for f in files if Path(f).exists()}, **settings}
    return {"dataset": dataset, **settings}


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable keys where two fingerprints differ (nested dicts walked)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
