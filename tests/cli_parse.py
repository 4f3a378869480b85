"""A medadapt CLI that parses and validates a command line against the code's typed signatures and loads nothing:
what the tests of shipped configs and of the benchmark's arms use."""

from __future__ import annotations

from medadapt.cli import MedAdaptCLI


class ParseOnly(MedAdaptCLI):
    def instantiate_classes(self) -> None:  # parse and validate types, load nothing
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass
