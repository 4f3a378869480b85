"""What ``torch.compile`` did while a benchmark arm ran: graphs made, graph breaks, recompile-limit hits.

A compiled arm can be slower than it looks fast: each new shape or guard failure recompiles, and once a frame has
been recompiled ``torch._dynamo.config.recompile_limit`` times dynamo runs it eager for good, with one warning in a
log nobody reads. The arm then times eager steps plus the compilations, and its tokens/s says nothing about
compiled layers. ``fit_speed.py`` reports this beside every arm, so the GPU figures say whether compilation held.
"""

from __future__ import annotations

import logging

#: dynamo's logger that warns when a frame hits a recompile limit ("torch._dynamo hit config.recompile_limit ...")
LOGGER = "torch._dynamo.convert_frame"


class CompileWatch(logging.Handler):
    """Use as a context manager around the work: dynamo's counters are cleared on entry (they are per process)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.limit_hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.limit_hits.append(message.splitlines()[0] + " " + " ".join(message.splitlines()[1:2]).strip())

    def __enter__(self) -> "CompileWatch":
        from torch._dynamo.utils import counters

        counters.clear()
        logging.getLogger(LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(LOGGER).removeHandler(self)

    def report(self) -> dict:
        from torch._dynamo.utils import counters

        return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
                "recompile_limit_hits": self.limit_hits}

    @staticmethod
    def note(report: dict) -> str:
        """One line for a table: empty when nothing was compiled."""
        if not report or not report.get("compiled"):
            return ""
        hits = report["recompile_limit_hits"]
        return (f"compiled: {report['graphs']} graphs, {report['graph_breaks']} breaks"
                + (f"; RECOMPILE LIMIT HIT ({len(hits)}x): eager after it" if hits else ""))
