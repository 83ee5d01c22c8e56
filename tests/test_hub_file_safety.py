"""Safe to load and safe to publish: the Hub files hold nothing a user would not expect to run, checkpoints hold no
pickles, and a token is never logged, printed or written."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_encoder.cli import main as cli_main
from llama_encoder.conversion_scripts.checkpoint import HUB_FILES
from llama_encoder.conversion_scripts.push import PICKLE_SUFFIXES
from tests.test_base_model import tiny_llama, tiny_tokenizer

PACKAGE = Path(__file__).resolve().parents[1] / "llama_encoder"
# What a Hub file may import: torch, transformers, typing-level standard modules and (the sentence-transformers
# module only) sentence_transformers; relative imports only of the other Hub files.
ALLOWED_IMPORTS = {"torch", "transformers", "__future__", "typing", "dataclasses", "collections.abc", "math"}
ST_MODULE = "sentence_transformers_llama_encoder.py"
# Names that fetch, unpickle or run code, wherever they appear (imported, called or looked up as an attribute).
FORBIDDEN_NAMES = re.compile(
    r"^(eval|exec|compile|__import__|breakpoint|input|open|globals|locals|vars|load|loads|from_pretrained|"
    r".*(download|hub|http|url|request|socket|pickle|dynamic_module|cached_file|subprocess|system|popen).*)$",
    re.IGNORECASE,
)


def scan_hub_file(source: str, name: str) -> list[str]:
    """Every problem in one Hub file's source: imports outside the allowed set, and forbidden names."""
    hub_modules = {Path(file).stem for file in HUB_FILES} - {Path(name).stem}
    allowed = ALLOWED_IMPORTS | ({"sentence_transformers"} if name == ST_MODULE else set())
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or node.module not in hub_modules:
                    problems.append(f"line {node.lineno}: relative import of {node.module!r}, not another Hub file")
                modules = []
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module]
            else:
                modules = [alias.name for alias in node.names]
            for module in modules:
                if not any(module == ok or module.startswith(f"{ok}.") for ok in allowed):
                    problems.append(f"line {node.lineno}: imports {module}")
                if any(FORBIDDEN_NAMES.match(part) for part in module.split(".")):
                    problems.append(f"line {node.lineno}: imports {module}")
            for alias in node.names:
                if FORBIDDEN_NAMES.match(alias.name):
                    problems.append(f"line {node.lineno}: imports the name {alias.name}")
        elif isinstance(node, ast.Name) and FORBIDDEN_NAMES.match(node.id):
            problems.append(f"line {node.lineno}: uses {node.id}")
        elif isinstance(node, ast.Attribute) and FORBIDDEN_NAMES.match(node.attr):
            problems.append(f"line {node.lineno}: uses .{node.attr}")
    return problems


@pytest.mark.parametrize("name", HUB_FILES)
def test_hub_files_make_no_network_call_run_no_code_and_import_only_what_a_checkpoint_has(name):
    assert scan_hub_file((PACKAGE / name).read_text(), name) == []


@pytest.mark.parametrize(("source", "problem"), [
    ("import requests", "imports requests"),
    ("import os", "imports os"),
    ("from urllib.request import urlopen", "imports urllib.request"),
    ("from huggingface_hub import hf_hub_download", "imports huggingface_hub"),
    ("from transformers.utils.hub import cached_file", "imports transformers.utils.hub"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained('x')", "uses .from_pretrained"),
    ("import torch\nstate = torch.load('weights.bin')", "uses .load"),
    ("x = eval('1 + 1')", "uses eval"),
    ("exec('print(1)')", "uses exec"),
    ("import importlib\nimportlib.import_module('os')", "imports importlib"),
    ("import sentence_transformers", "imports sentence_transformers"),
    ("from .atomic import atomic_file", "relative import of 'atomic', not another Hub file"),
    ("with open('f', 'w') as handle:\n    pass", "uses open"),
])
def test_the_scan_finds_what_it_forbids(source, problem):
    problems = scan_hub_file(source, "modeling_llama_encoder.py")
    assert any(problem in found for found in problems), problems


def test_the_sentence_transformers_module_may_import_sentence_transformers():
    assert scan_hub_file("from sentence_transformers.base.modules import Transformer", ST_MODULE) == []


# --- checkpoints hold safetensors only ----------------------------------------------------------------------------


def test_a_pickled_base_converts_only_with_allow_pickle_and_the_checkpoint_holds_no_pickle(tmp_path, capsys):
    base = tmp_path / "pickled-base"
    model = tiny_llama()
    model.config.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    out = tmp_path / "encoder"

    assert cli_main(["convert", "--base", str(base), "--out", str(out)]) == 1
    assert "only PyTorch pickle weights (pytorch_model.bin)" in capsys.readouterr().err and not out.exists()

    assert cli_main(["convert", "--base", str(base), "--out", str(out), "--allow-pickle"]) == 0
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert not [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)], files
    for name in files:
        assert not (out / name).read_bytes().startswith(b"PK\x03\x04"), f"{name} is a zip (torch.save) archive"
    weights = load_file(out / "model.safetensors")
    expected = {key.removeprefix("model."): value for key, value in model.state_dict().items()
                if not key.startswith("lm_head.")}
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in expected)


# --- tokens -------------------------------------------------------------------------------------------------------

TOKEN = "hf_fake_write_token_8d1c3f"
REPO_ROOT = PACKAGE.parent

# `llama-encoder -v push` as a user runs it (the CLI's own logging setup, real stdout/stderr), three times against a
# fake Hub in the same process: a push that succeeds, one that fails behind a proxy that echoes the request's
# Authorization header into its error, and one the token may not write.
PUSH_CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import pytest
    from huggingface_hub import constants
    from llama_encoder.cli import main
    from tests.fake_hub import FakeHub, isolate_hub_client
    checkpoint, home, token = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    isolate_hub_client(pytest.MonkeyPatch(), home)
    os.environ["HF_TOKEN"] = token
    with FakeHub(token=token) as hub:
        constants.ENDPOINT = hub.url
        codes = [main(["-v", "push", checkpoint, "--repo-id", "someone/tiny-encoder", "--private"])]
        hub.fail_routes["commit"] = 500
        hub.fail_message = "upstream failed; request had Authorization: Bearer " + token
        codes.append(main(["-v", "push", checkpoint, "--repo-id", "someone/tiny-encoder"]))
        hub.fail_routes.clear()
        hub.deny_status = 403
        codes.append(main(["-v", "push", checkpoint, "--repo-id", "someone/else"]))
    print("exit codes", codes)
    """
)


def test_push_never_logs_prints_or_writes_the_token(tiny_checkpoint, tmp_path):
    home = tmp_path / "hf-home"
    home.mkdir()
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_TOKEN", None)
    run = subprocess.run([sys.executable, "-c", PUSH_CHILD, str(tiny_checkpoint), str(home), TOKEN], cwd=REPO_ROOT,
                         env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert "exit codes [0, 1, 1]" in run.stdout, run.stderr[-3000:]
    assert "Commit:" in run.stdout and "ERROR llama_encoder: llama-encoder push failed\nTraceback" in run.stderr  # -v
    assert "answered HTTP 500" in run.stderr and "cannot write to someone/else" in run.stderr
    assert "request had Authorization: Bearer <token>" in run.stderr  # the echo reached the user, redacted
    assert TOKEN not in run.stdout and TOKEN not in run.stderr
    # Everything the child could write to: its HF_HOME (the Hub client's cache and token path) and the checkpoint.
    files = [path for root in (home, Path(tiny_checkpoint)) for path in root.rglob("*") if path.is_file()]
    assert len(files) > 10
    assert [path for path in files if TOKEN.encode() in path.read_bytes()] == []
