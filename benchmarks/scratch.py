"""Temporary folders for the benchmarks: their random-weight models take 1-4 GB each and must not pile up in /tmp."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder, removed with everything in it when this process exits: a caller in the same process
    (gpu_check running fit_speed, then testing the adapter its sft.yaml arm exported there) can use it until then."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
