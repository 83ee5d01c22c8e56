"""The package's folders are layers that import only downward, with no import circle (module-level and deferred
imports alike), read from the code itself."""

from __future__ import annotations

import ast
from pathlib import Path

import llama_encoder

PACKAGE = Path(llama_encoder.__file__).parent
HUB_FILES = {"configuration_llama_encoder", "modeling_llama_encoder", "sentence_transformers_llama_encoder"}
# What each part may not import (parts are top-level files or folders of llama_encoder).
FORBIDDEN = {
    "weights": {"conversion_scripts", "encoding", "training", "cli", "engines"},
    "conversion_scripts": {"encoding", "training", "cli"},
    "encoding": {"weights", "conversion_scripts", "training", "cli"},
    "training": {"conversion_scripts", "cli"},
    # engines: each serving engine's knowledge (vLLM's runner, TEI's parsing rules), used by conversion_scripts
    # (verification) and cli (embed --engine vllm); they read checkpoint folders (through weights' readers at most),
    # never the conversion, encoding or training layers.
    "engines": {"conversion_scripts", "encoding", "training", "cli"},
    **{name: {"errors", "atomic", "dtypes", "readers", "weights", "conversion_scripts", "encoding", "training",
              "cli", "engines"} for name in HUB_FILES},
    **{name: {"weights", "conversion_scripts", "encoding", "training", "cli", "engines"}
       for name in ("errors", "atomic", "dtypes", "readers", "prompts")},
}


def _module_name(path: Path) -> str:
    parts = ("llama_encoder", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules `path` imports anywhere in its code (TYPE_CHECKING blocks left out: they run never)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING" for node in ast.walk(block)}
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "llama_encoder" or name.startswith("llama_encoder.")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_import_circle():
    graph = _graph()
    state: dict[str, str] = {}
    circles = []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_each_layer_imports_only_downward():
    broken = [f"{module} imports {target}" for module, targets in sorted(_graph().items()) for target in sorted(targets)
              if _part(target) in FORBIDDEN.get(_part(module), set())]
    assert broken == []


def test_the_scan_finds_imports_of_every_form(tmp_path):
    module = PACKAGE / "training" / "model.py"
    found = imports_of(module)
    assert {"llama_encoder.weights.merge", "llama_encoder.training.arguments", "llama_encoder.errors"} <= found
    assert _part("llama_encoder.weights.merge") == "weights"
