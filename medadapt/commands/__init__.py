"""Orchestration on top of the library: commands that chain training, evaluation and retrieval.

Each command module has ``build_parser()`` (jsonargparse over typed arguments: ``--help`` documents every
key, ``--config`` reads them from YAML, ``--print_config`` writes one) and ``main(argv)``; the table of
commands is ``medadapt/cli.py``.
"""
