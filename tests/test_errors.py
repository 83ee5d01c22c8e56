"""One exception base: every failure a user can fix is a `LlamaEncoderError` (the CLI prints it in one line), and
anything else is a bug that keeps its traceback. The public API is importable from the package root."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import llama_encoder
from llama_encoder.cli import main as cli_main
from llama_encoder.conversion_scripts import convert as convert_module
from llama_encoder.errors import InputError, LlamaEncoderError, MissingInputError

PACKAGE = Path(llama_encoder.__file__).parent
REPO_ROOT = PACKAGE.parent
HUB_FILES = ("configuration_llama_encoder.py", "modeling_llama_encoder.py", "sentence_transformers_llama_encoder.py")
BUILTIN_FAILURES = {"ValueError", "FileNotFoundError", "FileExistsError", "NotADirectoryError", "IsADirectoryError",
                    "PermissionError", "OSError", "RuntimeError", "ImportError"}
# Raises of built-in exceptions that are bugs, not user errors: a caller broke an internal contract.
BUGS = {
    ("weights/base_model.py", "ValueError"),  # a BaseModel built with both or neither kind of weights
    ("weights/encoder.py", "RuntimeError"),  # a weight the state dict cannot set
    ("dtypes.py", "ValueError"),  # half_support asked about float32 or an int dtype
    ("atomic.py", "OSError"),  # renameat2 failing for a reason other than "not supported"
    ("encoding/embed.py", "RuntimeError"),  # an encoder object that returns the wrong number of rows
}


def _builtin_raises(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            if node.exc.func.id in BUILTIN_FAILURES:
                found.append((node.lineno, node.exc.func.id))
    return found


def test_every_expected_failure_raises_a_llama_encoder_error():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in HUB_FILES:  # self-contained: they cannot import the package's errors
            continue
        offenders += [f"{relative}:{line} raises {name}" for line, name in _builtin_raises(path)
                      if (relative, name) not in BUGS]
    assert offenders == []


def test_the_scan_sees_a_builtin_raise(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    raise ValueError('bad input')\n")
    assert _builtin_raises(sample) == [(2, "ValueError")]


def test_the_kinds_are_the_builtin_errors_callers_catch():
    assert issubclass(InputError, ValueError) and issubclass(MissingInputError, FileNotFoundError)
    assert str(MissingInputError("no such file")) == "no such file"


def test_the_cli_prints_an_expected_failure_in_one_line(tmp_path, capsys):
    assert cli_main(["convert", "--base", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: There is no folder") and error.count("\n") == 1 and "Traceback" not in error


def test_the_cli_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    def broken(**kwargs):
        raise ValueError("an internal contract was broken")  # not a LlamaEncoderError: a bug

    monkeypatch.setattr(convert_module, "convert", broken)
    with pytest.raises(ValueError, match="an internal contract was broken"):
        cli_main(["convert", "--out", str(tmp_path / "out")])
    monkeypatch.setattr(convert_module, "convert", lambda **_: (_ for _ in ()).throw(InputError("fix the input")))
    assert cli_main(["convert", "--out", str(tmp_path / "out")]) == 1


def test_the_public_api_is_found_at_the_root_and_imported_on_first_use():
    code = (
        "import json, sys\n"
        "import llama_encoder\n"
        "before = sorted(m for m in sys.modules if m.startswith(('llama_encoder.', 'peft', 'sentence_transformers')))\n"
        "from llama_encoder import convert, push, Encoder, embed_corpus, train, TrainingArguments\n"
        "print(json.dumps({'before': before, 'names': [f'{o.__module__}.{o.__qualname__}' for o in "
        "(convert, push, Encoder, embed_corpus, train, TrainingArguments)], 'dir': dir(llama_encoder)}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    result = json.loads(run.stdout.splitlines()[-1])
    assert not any(name.startswith(("peft", "sentence_transformers", "llama_encoder.conversion_scripts",
                                    "llama_encoder.training", "llama_encoder.encoding")) for name in result["before"])
    assert result["names"] == [
        "llama_encoder.conversion_scripts.convert.convert",
        "llama_encoder.conversion_scripts.push.push_folder",
        "llama_encoder.encoding.encode.Encoder",
        "llama_encoder.encoding.embed.embed_corpus",
        "llama_encoder.training.run.train",
        "llama_encoder.training.arguments.TrainingArguments",
    ]
    assert {"convert", "push", "Encoder", "embed_corpus", "train", "TrainingArguments"} <= set(result["dir"])
    assert issubclass(LlamaEncoderError, Exception) and llama_encoder.LlamaEncoderError is LlamaEncoderError
