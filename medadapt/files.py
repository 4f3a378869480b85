"""Every file medadapt writes is written whole or not at all, never through a link; every file it reads names
itself when it cannot be read.

Writes go to a temporary file created exclusively (``O_EXCL``: a name nobody holds, so a symlink planted at
``results.json.tmp`` is never followed) in the target's own folder, then ``os.replace`` puts it in place: a
reader sees the old file or the new one, a crash leaves the old one, and a link planted at the target itself is
replaced, never written through. The file gets the mode any file created there would (0666 less the umask;
``mkstemp``'s private 0600 would lock other users out of shared results). Folders medadapt creates to write into
(``output_folder``) are never links, and never an empty path, the working directory, the home folder or the root.
JSON is written strictly (no ``NaN``/``Infinity``, which other readers refuse): non-finite numbers become ``null``.

Reads of JSON, YAML and safetensors files raise ``UnreadableFileError`` naming the file and what is wrong
with it (a cut file, the wrong shape), never a bare ``JSONDecodeError`` from deep inside.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union


def cache_dir() -> Path:
    """medadapt's cache (converted packaged models, merged folders for vLLM, file digests): ``$MEDADAPT_CACHE``,
    default ``~/.cache/medadapt``."""
    return Path(os.environ.get("MEDADAPT_CACHE", Path.home() / ".cache" / "medadapt"))


class UnreadableFileError(ValueError):
    """A file that exists but cannot be read as what it should be; the message names the file."""


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process umask: the mode a plainly created file (or, with 0o777, folder) gets."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


class UnsafePathError(ValueError):
    """A path medadapt refuses to write into: a link, an empty path, the working directory, home or root."""


def output_folder(path: Union[str, Path], what: str = "output folder") -> Path:
    """``path`` as a folder to write into, created if needed; refused when it is empty, the working directory, the
    home folder or the root (a cleared or overwritten output there destroys the user's files), or when the folder
    itself is a symbolic link (one planted where medadapt writes would redirect what it writes: no link is
    followed)."""
    folder = Path(path).expanduser() if path is not None and str(path).strip() else path
    check_output_path(folder, what)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_output_path(path: Union[str, Path, None], what: str) -> None:
    """``output_folder``'s refusals without creating anything (an export checks first and writes elsewhere)."""
    if path is None or not str(path).strip():
        raise UnsafePathError(f"{what} is empty: give a folder of its own")
    absolute = Path(os.path.abspath(path))
    for name, place in (("the working directory", Path.cwd()), ("the home folder", Path.home()),
                        ("the root", Path(absolute.anchor))):
        if absolute == place:
            raise UnsafePathError(f"{what} {str(path)!r} is {name}: give a folder of its own")
    if Path(path).is_symlink():
        raise UnsafePathError(f"{what} {path} is a symbolic link; medadapt writes through no link (remove it, or "
                              "give the real folder)")


def write_atomic(path: Union[str, Path], data: Union[str, bytes, Callable[[Path], None]]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path) to ``path`` atomically, with the mode
    a plainly created file gets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            os.unlink(tmp)  # the writer creates it: still a fresh name in this folder
            data(Path(tmp))
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (strict JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON: non-finite numbers as null."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write_json(path: Union[str, Path], value: Any, **kwargs) -> Path:
    return write_atomic(path, dumps(value, **kwargs))


def read_json(path: Union[str, Path], what: str = "", expect: Optional[type] = dict) -> Any:
    """The JSON in ``path``; a cut, non-JSON or wrong-typed file is an ``UnreadableFileError`` naming it."""
    path = Path(path)
    label = f"{what} {path}".strip()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableFileError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnreadableFileError(f"{label}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); was it "
                                  "cut short or edited?") from None
    if expect is not None and not isinstance(value, expect):
        raise UnreadableFileError(f"{label}: expected a JSON {expect.__name__}, found {type(value).__name__}")
    return value


def read_yaml(path: Union[str, Path], what: str = "config") -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UnreadableFileError(f"{what} {path}: not valid YAML ({e})") from None
    if not isinstance(value, dict):
        raise UnreadableFileError(f"{what} {path}: expected a mapping of keys, found {type(value).__name__}")
    return value


def check_safetensors(path: Union[str, Path], what: str = "weights") -> None:
    """A safetensors file whose header and sizes are whole (a cut file fails here, naming itself, instead of
    inside peft or transformers)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])
    except Exception as e:  # safetensors raises its own SafetensorError with no file name
        raise UnreadableFileError(f"{what} {path}: not a readable safetensors file ({e}); was it cut short?") from None
    import struct

    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise UnreadableFileError(f"{what} {path}: {path.stat().st_size} bytes, the header says "
                                  f"{8 + header_len + end}: the file was cut short")


def lock_folder(folder: Union[str, Path], busy: str, error: type = RuntimeError):
    """A held ``FileLock`` on ``folder`` (created if needed) for one run, or ``error(busy)`` at once when another
    run holds it. Release it when done."""
    from filelock import FileLock, Timeout

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise error(busy) from None
    return lock
