"""Imports point one way: model ← data ← module; eval/ and rag/ beside; orchestration (commands/, cli) on top.

Every ``import`` in the package, lazy ones inside functions included, is read from the source (ast), so a
layer cannot be crossed by hiding the import in a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medadapt"

#: a module may import from its own layer and the layers below it
LAYERS = {
    "medadapt.console": 0,
    "medadapt.model_config": 0,
    "medadapt.provenance": 0,
    "medadapt.model": 0,
    "medadapt.optim": 0,
    "medadapt.loss": 0,
    "medadapt.attention": 0,
    "medadapt.files": 0,
    "medadapt.fingerprint": 0,
    "medadapt.lora": 0,
    "medadapt.weights": 1,
    "medadapt.checkpoints": 1,
    "medadapt.checkpointing": 1,
    "medadapt.merge": 1,
    "medadapt.data": 1,
    "medadapt.rag": 2,
    "medadapt.eval": 3,
    "medadapt.training": 4,
    "medadapt.module": 5,
    "medadapt.rl": 6,
    "medadapt.commands": 7,
    "medadapt.lightning_cli": 8,
    "medadapt.cli": 8,
    "medadapt.__main__": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} has no layer: add it to LAYERS"
    return LAYERS[max(matches, key=len)]


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medadapt"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names
                             if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("medadapt"))
        graph[name] = {m for m in found if m != name}
    return graph


def test_every_import_points_down_or_sideways():
    wrong = [(a, b) for a, deps in imports().items() for b in deps
             if b != "medadapt" and layer(b) > layer(a)]
    assert not wrong, f"imports that point up a layer: {sorted(wrong)}"


def test_there_are_no_import_cycles():
    graph = imports()
    modules = set(graph)
    edges = {a: {b for b in deps if b in modules} for a, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(modules):
        visit(node)
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_data_code_never_reaches_into_the_trainer_and_the_module_never_into_the_data_module():
    for path in (PACKAGE / "data").rglob("*.py"):
        assert "lightning_module" not in path.read_text(), path
    assert "trainer.datamodule" not in (PACKAGE / "module.py").read_text()


def test_rl_stands_above_the_sft_module_on_the_shared_core():
    """GRPO is its own LightningModule on the training core, not a mode of CausalLMModule: module.py imports nothing
    from rl/, and neither does the core."""
    graph = imports()
    for name in ("medadapt.module", "medadapt.training"):
        assert not [m for m in graph[name] if m.startswith("medadapt.rl")], name
    assert "medadapt.training" in graph["medadapt.rl.module"]
