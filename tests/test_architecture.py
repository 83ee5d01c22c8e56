"""docs/ARCHITECTURE.md stays true of the package: its Layout section names every module where it lives, and the
rooms (top-level files and folders of llama_encoder) import downward only, floor by floor, as the doc describes.
tests/test_layout.py's import reader is the one used here; its FORBIDDEN table adds the sideways rules (encoding
never reads weights, the Hub files import only each other, ...)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_layout import PACKAGE, _graph, _part

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"

# The rooms, bottom floor first. A room imports only rooms on floors below its own (and itself); rooms that share a
# floor do not import each other, but on the bottom floor, whose order test_layout.py's FORBIDDEN and no-circle test
# keep. The package's own __init__ (room "") sits on the top floor with cli.
FLOORS = (
    # the Hub files and the small shared modules every room may use
    {"configuration_llama_encoder", "modeling_llama_encoder", "sentence_transformers_llama_encoder", "errors",
     "atomic", "dtypes", "readers", "prompts"},
    {"weights"},  # base models, adapters, shards, the one merge
    {"engines"},  # each serving engine's knowledge (vLLM's runner, TEI's rules): reads checkpoint folders
    {"encoding"},  # Encoder, embed_corpus, evaluate
    {"conversion_scripts", "training"},  # write + verify checkpoints; train adapters
    {"cli", ""},
)
FLOOR = {room: floor for floor, rooms in enumerate(FLOORS) for room in rooms}

_NAME = re.compile(r"\w+(\.py|/)")


def layout_entries(text: str) -> tuple[set[str], set[str]]:
    """The files and folders under `llama_encoder/` that the Layout section's code block lists, as paths relative to
    the package ("weights/names.py", "weights"). An entry is a line whose first word is a file or folder name, indented
    two spaces per level (folder lines open a level); the deeper, odd indents are its description's lines."""
    section = re.split(r"^## ", re.split(r"^## Layout\n", text, maxsplit=1, flags=re.M)[1], maxsplit=1, flags=re.M)[0]
    block = section.split("```", 2)[1]
    files: set[str] = set()
    folders: set[str] = set()
    inside, trail = False, []
    for line in block.splitlines():
        words = line.split()
        if not words:
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent == 0:
            inside, trail = words[0] == "llama_encoder/", []
            continue
        depth = indent // 2 - 1
        if not inside or indent % 2 or depth > len(trail) or not _NAME.fullmatch(words[0]):
            continue
        trail = trail[:depth]
        if words[0].endswith("/"):
            trail.append(words[0][:-1])
            folders.add("/".join(trail))
        else:
            files.add("/".join([*trail, words[0]]))
    return files, folders


def _modules() -> list[Path]:
    return sorted(path.relative_to(PACKAGE) for path in PACKAGE.rglob("*.py"))


def test_the_layout_names_every_module():
    """A new, moved or renamed module is written into docs/ARCHITECTURE.md's Layout where it lives (a folder's line
    names its __init__.py)."""
    files, folders = layout_entries(ARCHITECTURE.read_text())
    unnamed = [str(path) for path in _modules() if path.as_posix() not in files
               and not (path.name == "__init__.py" and path.parent.as_posix() in folders)]
    assert unnamed == [], f"not in docs/ARCHITECTURE.md's Layout (or listed under another folder): {unnamed}"


def test_the_layout_names_only_what_exists():
    files, folders = layout_entries(ARCHITECTURE.read_text())
    missing = sorted(name for name in files if not (PACKAGE / name).is_file())
    missing += sorted(f"{name}/" for name in folders if not (PACKAGE / name).is_dir())
    assert missing == [], f"docs/ARCHITECTURE.md's Layout lists what llama_encoder/ does not hold: {missing}"


def test_the_layout_reader_follows_folders():
    text = """## Layout
```
setup.cfg
llama_encoder/
  __init__.py        the API,
                     cli.py in a description
  cli.py             the CLI
  weights/           the weights layer
    names.py         names
                    merge.py of weights (an even indent, too deep for an entry)
    merge.py         the merge
  engines/
    tei.py           TEI
  default_adapters/  package data
tests/       test_*.py
```
## Next
"""
    assert layout_entries(text) == ({"__init__.py", "cli.py", "weights/names.py", "weights/merge.py",
                                     "engines/tei.py"}, {"weights", "engines", "default_adapters"})


def test_every_room_has_a_floor():
    rooms = {_part(module) for module in _graph()}
    assert rooms - FLOOR.keys() == set(), "a new room of llama_encoder: give it a floor in FLOORS (and the doc)"


def _upward(module: str, target: str) -> bool:
    room, floor, target_floor = _part(module), FLOOR.get(_part(module), 0), FLOOR.get(_part(target), 0)
    return _part(target) != room and target_floor >= floor and not target_floor == floor == 0


def test_rooms_import_downward_only():
    upward = [f"{module} (floor {FLOOR.get(_part(module))}) imports {target} (floor {FLOOR.get(_part(target))})"
              for module, targets in sorted(_graph().items()) for target in sorted(targets) if _upward(module, target)]
    assert upward == []


def test_the_floor_rule():
    assert _upward("llama_encoder.weights.merge", "llama_encoder.engines.tei")
    assert _upward("llama_encoder.conversion_scripts.verify", "llama_encoder.training.run")  # one floor, two rooms
    assert _upward("llama_encoder.errors", "llama_encoder.cli")
    assert not _upward("llama_encoder.engines.tei", "llama_encoder.weights.shards")
    assert not _upward("llama_encoder.cli", "llama_encoder.training.cli")
    assert not _upward("llama_encoder.atomic", "llama_encoder.errors")  # the shared bottom floor


def test_engines_never_import_conversion_or_training():
    graph = _graph()
    engines = [module for module in graph if _part(module) == "engines"]
    assert "llama_encoder.engines.tei" in engines and "llama_encoder.engines.vllm" in engines
    broken = [f"{module} imports {target}" for module in sorted(engines) for target in sorted(graph[module])
              if _part(target) in {"conversion_scripts", "training"}]
    assert broken == []
