"""A medadapt CLI that parses and validates a command line against the code's typed signatures and loads nothing:
what the tests of shipped configs and of the benchmark's arms use."""

from __future__ import annotations

from medadapt.lightning_cli import MedAdaptCLI


class ParseOnly(MedAdaptCLI):
    def instantiate_classes(self) -> None:  # parse and validate types, load nothing
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_fit(args: list[str]):
    """The ``fit`` config a command line gives (``args`` after ``fit``), validated, nothing instantiated."""
    import lightning as L

    from medadapt.training import AdapterModule

    cli = ParseOnly(AdapterModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    auto_configure_optimizers=False, args=["fit", *args])
    return cli.config["fit"]
