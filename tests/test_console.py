"""The console shows medadapt's lines: known third-party noise is dropped at the entry point, real warnings stay."""

from __future__ import annotations

import io
import logging

from medadapt.console import quiet_known_noise


def test_known_noise_is_dropped_from_child_loggers_and_after_a_library_resets_its_level():
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        quiet_known_noise()
        bm25s = logging.getLogger("bm25s")
        bm25s.setLevel(logging.DEBUG)  # what `import bm25s` does after the entry point quieted it
        bm25s.debug("Building index from IDs")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "ImportError")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
        logging.getLogger("bm25s").warning("a real bm25s warning")
        logging.getLogger("medadapt.module").warning("medadapt speaks")
    finally:
        root.removeHandler(handler)
    out = stream.getvalue()
    assert "Building index" not in out and "gemm_4bit_forward" not in out
    assert "a real bitsandbytes warning" in out and "a real bm25s warning" in out and "medadapt speaks" in out
