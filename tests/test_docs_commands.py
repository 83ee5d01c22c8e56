"""The commands and links of README.md and docs/*.md are true of the code.

Every command of a fenced bash block is read as a shell would split it (line continuations, comments, `&&`/`;`/`|`,
`NAME=value` and `env` prefixes, `.venv/bin/` and other interpreter paths):

- `llama-encoder SUB [OBJECTIVE] ...` (also `python -m llama_encoder.cli` and `torchrun ... -m llama_encoder.cli`):
  every option must be one that the parser of `llama_encoder.cli.build_parser()` takes for that subcommand, and the
  whole command must parse (choices, values, required options) unless it holds a `...` placeholder; a `--help`
  command is run through `llama_encoder.cli.main`, in this process.
- `python benchmarks/X.py`, `python examples/X.py`, `bash scripts/X.sh`, `pytest tests/...`: the file exists, and
  every option is one its argparse parser declares (read from the script's source, so nothing heavy is imported).
- Python blocks compile. Every relative link of a Markdown file points to a file that exists, and to a heading of it
  (GitHub's anchor rules) where it names one.

`test_the_checker_*` feed the checker made-up documents, so a checker that passes everything fails here.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&", ";;"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = "..."


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str


@dataclass
class Command:
    doc: Path
    line: int  # 1-based line where the command starts
    words: list[str]

    def where(self) -> str:
        return f"{shown(self.doc)}:{self.line}: {shlex.join(self.words)}"


def shown(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    commands: int = 0
    cli_commands: int = 0
    script_commands: int = 0
    help_runs: int = 0
    links: int = 0
    anchors: int = 0
    python_blocks: int = 0


# ---------------------------------------------------------------------------------------------------------- parsing

def fenced_blocks(text: str, doc: Path) -> list[Block]:
    """The fenced code blocks of a Markdown text, dedented by their fence's indentation (blocks inside lists)."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = len(opening.group(1)), opening.group(2), opening.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        blocks.append(Block(doc, i + 1, language, "\n".join(body)))
        i = j + 1
    return blocks


def shell_commands(block: Block) -> list[Command]:
    """Simple commands of a shell block: continuation lines joined, comments dropped, split at `&&`, `;`, `|`."""
    commands, lines = [], block.text.splitlines()
    i = 0
    while i < len(lines):
        start, logical = i, lines[i]
        while logical.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            logical = logical.rstrip()[:-1] + " " + lines[i]
        i += 1
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS:
                if words:
                    commands.append(Command(block.doc, block.line + 1 + start, words))
                words = []
            else:
                words.append(token)
    return commands


def program_name(word: str) -> str:
    """`.venv/bin/python`, `.venv-vllm/bin/python3` -> `python`; `llama-encoder` stays."""
    name = word.rsplit("/", 1)[-1] if "/bin/" in word or word.startswith("bin/") else word
    return "python" if re.fullmatch(r"python(3(\.\d+)?)?", name) else name


def strip_prefixes(words: list[str]) -> list[str]:
    """Drop `NAME=value` assignments and the `env`, `nice`, `timeout N`, `exec` and `time` wrappers."""
    words = list(words)
    while words:
        if ASSIGNMENT.match(words[0]):
            words.pop(0)
        elif words[0] == "env":
            words.pop(0)
            while words and (ASSIGNMENT.match(words[0]) or words[0].startswith("-")):
                if words.pop(0) in ("-u", "--unset") and words:
                    words.pop(0)
        elif words[0] in ("nice", "exec", "time", "setsid"):
            words.pop(0)
            if words and words[0] == "-n":
                words[:2] = []
        elif words[0] == "timeout":
            words.pop(0)
            while words and words[0].startswith("-"):
                words.pop(0)
            if words:
                words.pop(0)  # the duration
        else:
            break
    return words


# -------------------------------------------------------------------------------------------------- llama-encoder

@cache
def cli_parser() -> argparse.ArgumentParser:
    from llama_encoder.cli import build_parser

    return build_parser()


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_name(word: str) -> str | None:
    """`--out`, `--opt=value` -> the option's name; values and positionals -> None."""
    if word == "--" or not word.startswith("-") or re.fullmatch(r"-\d[\d.e+-]*", word) or re.search(r"\s", word):
        return None
    return word.split("=", 1)[0]


def check_cli(command: Command, args: list[str], report: Report) -> None:
    """`llama-encoder ARGS`: each option is the subcommand's own, and the command parses; `--help` is run."""
    report.cli_commands += 1
    found = len(report.problems)
    parser, path, rest = cli_parser(), ["llama-encoder"], list(args)
    # walk down the subcommands: the first word that is not an option picks one at each level
    while True:
        choices = subparsers_of(parser)
        if not choices:
            break
        index = next((k for k, word in enumerate(rest) if not word.startswith("-")), None)
        if index is None:
            break
        for word in rest[:index]:
            if option_name(word) and option_name(word) not in parser._option_string_actions:
                report.problems.append(f"{command.where()}: {' '.join(path)} has no option {option_name(word)}")
        if rest[index] == PLACEHOLDER:
            return
        if rest[index] not in choices:
            report.problems.append(f"{command.where()}: {' '.join(path)} has no subcommand {rest[index]!r} "
                                   f"(it has {', '.join(choices)})")
            return
        path.append(rest[index])
        parser, rest = choices[rest[index]], rest[index + 1:]
    words = iter(rest)
    for word in words:
        name = option_name(word)
        if name is None:
            continue
        action = parser._option_string_actions.get(name)
        if action is None:
            report.problems.append(f"{command.where()}: `{' '.join(path)}` has no option {name}")
        elif action.nargs is None and "=" not in word:
            next(words, None)  # its one value, which may itself start with a hyphen
    if "-h" in args or "--help" in args:
        report.help_runs += 1
        run_help(command, args, report)
        return
    if PLACEHOLDER in args or len(report.problems) > found:  # a sketch (`train supervised ...`), or reported
        return
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cli_parser().parse_args(args)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        report.problems.append(f"{command.where()}: does not parse: {message[-1] if message else '?'}")


def run_help(command: Command, args: list[str], report: Report) -> None:
    """Run a `--help` command for real (`llama_encoder.cli.main`): it must exit 0 and print a usage line."""
    from llama_encoder.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = None
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    if code not in (0, None) or "usage: llama-encoder" not in stdout.getvalue():
        report.problems.append(f"{command.where()}: exited {code}: {stderr.getvalue().strip()[-300:]}")


# ------------------------------------------------------------------------------------------------------- scripts

@dataclass(frozen=True)
class ScriptOptions:
    has_parser: bool
    names: frozenset[str]
    patterns: tuple[str, ...]  # regexes, from f-string option names (`f"--{stage}-args"`)

    def takes(self, name: str) -> bool:
        return name in self.names or any(re.fullmatch(pattern, name) for pattern in self.patterns)


@cache
def script_options(path: Path) -> ScriptOptions:
    """The option strings a script's argparse parser declares, read from its source (`add_argument` calls)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names, patterns, has_parser = {"-h", "--help"}, [], False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called == "ArgumentParser":
            has_parser = True
        if called != "add_argument":
            continue
        boolean_optional = any(
            keyword.arg == "action" and "BooleanOptionalAction" in ast.unparse(keyword.value)
            for keyword in node.keywords)
        for arg in node.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                names.add(arg.value)
                if boolean_optional and arg.value.startswith("--"):
                    names.add("--no-" + arg.value[2:])
            elif isinstance(arg, ast.JoinedStr):
                pieces = [re.escape(part.value) if isinstance(part, ast.Constant) else r"[\w-]+"
                          for part in arg.values]
                pattern = "".join(pieces)
                if pattern.startswith("-") or pattern.startswith(r"\-"):
                    patterns.append(pattern)
    return ScriptOptions(has_parser, frozenset(names), tuple(patterns))


def check_script(command: Command, script: str, args: list[str], report: Report) -> None:
    """A repository script: it exists, and a Python script declares every option given to it."""
    report.script_commands += 1
    path = REPO / script
    if not path.is_file():
        report.problems.append(f"{command.where()}: no file {script}")
        return
    if path.suffix != ".py":
        return
    options = script_options(path)
    for word in args:
        name = option_name(word)
        if name is None:
            continue
        if not options.has_parser:
            report.problems.append(f"{command.where()}: {script} has no argument parser, so no option {name}")
        elif not options.takes(name):
            report.problems.append(f"{command.where()}: {script} has no option {name}")


def check_pytest_paths(command: Command, args: list[str], report: Report) -> None:
    for word in args:
        if word.startswith("tests/") and not (REPO / word.split("::", 1)[0]).exists():
            report.problems.append(f"{command.where()}: no test file {word}")


def check_command(command: Command, report: Report) -> None:
    words = strip_prefixes(command.words)
    if not words:
        return
    report.commands += 1
    program, args = program_name(words[0]), words[1:]
    if program == "llama-encoder":
        check_cli(command, args, report)
    elif program == "torchrun":
        if "-m" in args and args[args.index("-m") + 1:args.index("-m") + 2] == ["llama_encoder.cli"]:
            check_cli(command, args[args.index("-m") + 2:], report)
        elif args and not args[-1].startswith("-"):
            script = next((word for word in args if word.endswith(".py")), None)
            if script:
                check_script(command, script, args[args.index(script) + 1:], report)
    elif program == "python":
        while args and args[0].startswith("-") and args[0] != "-m":
            args.pop(0)  # interpreter flags (-I, -u, -X ...)
        if args[:2] == ["-m", "llama_encoder.cli"]:
            check_cli(command, args[2:], report)
        elif args[:2] == ["-m", "pytest"]:
            check_pytest_paths(command, args[2:], report)
        elif args and args[0].endswith(".py"):
            check_script(command, args[0], args[1:], report)
    elif program == "pytest":
        check_pytest_paths(command, args, report)
    elif program in ("bash", "sh") and args and args[0].endswith(".sh"):
        check_script(command, args[0], args[1:], report)
    elif program.startswith(("scripts/", "benchmarks/", "examples/", ".ci/")):
        check_script(command, program, args, report)


# --------------------------------------------------------------------------------------------------------- links

def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered, lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)  # emphasis marks (a single `_` is part of a word, kept)
    text = text.strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


@cache
def anchors_of(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file (repeats numbered -1, -2, as GitHub does), outside code blocks."""
    text = path.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    anchors = set()
    for line in strip_code_blocks(text).splitlines():
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    anchors.update(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", text))
    return frozenset(anchors)


def strip_code_blocks(text: str) -> str:
    """The text with fenced blocks blanked (lines kept, so line numbers hold)."""
    out, fence = [], None
    for line in text.splitlines():
        opening = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and opening:
            fence = opening.group(1)
            out.append("")
        elif fence is not None:
            if re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link and image outside code blocks and inline code."""
    links = []
    for number, line in enumerate(strip_code_blocks(text).splitlines(), 1):
        line = re.sub(r"(`+).*?\1", "", line)
        for match in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            links.append((number, match.group(1)))
    return links


def check_links(doc: Path, text: str, report: Report) -> None:
    for number, target in markdown_links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        report.links += 1
        where = f"{shown(doc)}:{number}: link {target}"
        path_part, _, anchor = target.partition("#")
        destination = (doc.parent / path_part).resolve() if path_part else doc
        if not destination.exists():
            report.problems.append(f"{where}: no such file {destination}")
            continue
        if anchor and destination.suffix == ".md":
            report.anchors += 1
            if anchor not in anchors_of(destination):
                report.problems.append(f"{where}: {destination.name} has no heading with anchor #{anchor}")


# ---------------------------------------------------------------------------------------------------------- docs

def check_document(doc: Path, text: str | None = None) -> Report:
    """Everything this file checks, for one Markdown file (or a made-up text, given as `text`)."""
    report = Report()
    text = doc.read_text(encoding="utf-8") if text is None else text
    for block in fenced_blocks(text, doc):
        if block.language in SHELL_LANGUAGES:
            for command in shell_commands(block):
                check_command(command, report)
        elif block.language == "python":
            report.python_blocks += 1
            try:
                compile(block.text, f"{doc.name}:{block.line}", "exec")
            except SyntaxError as error:
                report.problems.append(f"{doc.name}:{block.line}: python block does not compile: {error}")
    check_links(doc, text, report)
    return report


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_commands_and_links_of(doc):
    report = check_document(doc)
    assert not report.problems, "\n".join(report.problems)


def test_the_documents_are_read_at_all():
    """A checker that finds no command or link would pass everything: the documents hold dozens of each."""
    reports = [check_document(doc) for doc in DOC_FILES]
    assert sum(report.cli_commands for report in reports) >= 20
    assert sum(report.script_commands for report in reports) >= 5
    assert sum(report.help_runs for report in reports) >= 1
    assert sum(report.links for report in reports) >= 20 and sum(report.anchors for report in reports) >= 10


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve()
              for _, target in markdown_links((REPO / "README.md").read_text(encoding="utf-8"))}
    missing = [str(page.relative_to(REPO)) for page in DOC_FILES[1:] if page.resolve() not in linked]
    assert not missing, f"README.md links no page of: {missing}"


def test_the_readme_keeps_its_two_start_here_commands():
    """CI (`.ci/run`) and newcomers start from these two commands, first in README.md's "Start here" block."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Start here", 1)[1]
    first = next(block for block in fenced_blocks(section, REPO / "README.md") if block.language == "bash")
    words = [command.words for command in shell_commands(first)]
    assert words[:2] == [["bash", "scripts/quickstart.sh"], ["bash", "scripts/test.sh"]]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- the checker itself

def _check_made_up(tmp_path, markdown: str) -> Report:
    doc = tmp_path / "made-up.md"
    doc.write_text(markdown, encoding="utf-8")
    (tmp_path / "other.md").write_text("# Other page\n\n## A section, `with` code\n", encoding="utf-8")
    return check_document(doc)


def test_the_checker_refuses_an_option_llama_encoder_does_not_have(tmp_path):
    report = _check_made_up(tmp_path, "```bash\n"
                                      "OMP_NUM_THREADS=2 .venv/bin/llama-encoder convert --out x \\\n"
                                      "    --frobnicate-weights 3   # made up\n"
                                      "torchrun --standalone --nproc-per-node 2 -m llama_encoder.cli train mntp "
                                      "--data t.txt --out o --made-up-flag\n"
                                      "llama-encoder train simcse --help && llama-encoder convert --out y\n"
                                      "```\n")
    assert report.cli_commands == 4 and report.help_runs == 1, report
    assert len(report.problems) == 2, report.problems
    assert "`llama-encoder convert` has no option --frobnicate-weights" in report.problems[0]
    assert "made-up.md:2:" in report.problems[0]
    assert "`llama-encoder train mntp` has no option --made-up-flag" in report.problems[1]


def test_the_checker_refuses_a_command_that_does_not_parse(tmp_path):
    report = _check_made_up(tmp_path, "```bash\nllama-encoder convert --pooling median --out x\n"
                                      "llama-encoder frobnicate --out x\n```\n")
    assert len(report.problems) == 2, report.problems
    assert "does not parse" in report.problems[0] and "median" in report.problems[0]
    assert "no subcommand 'frobnicate'" in report.problems[1]


def test_the_checker_refuses_missing_scripts_and_their_unknown_options(tmp_path):
    report = _check_made_up(tmp_path, "```bash\n"
                                      "python benchmarks/sts_quality.py --stages mntp --mntp-args '--epochs 2'\n"
                                      "PYTHONPATH=. python benchmarks/throughput.py --no-warmup --made-up 1\n"
                                      "bash scripts/no_such_script.sh\n"
                                      "python examples/no_such_example.py x\n"
                                      ".venv/bin/python -m pytest tests/no_such_test.py -q\n"
                                      "```\n")
    assert report.script_commands == 4
    assert [problem.split(": ", 2)[-1] for problem in report.problems] == [
        "benchmarks/throughput.py has no option --made-up", "no file scripts/no_such_script.sh",
        "no file examples/no_such_example.py", "no test file tests/no_such_test.py"]


def test_the_checker_refuses_broken_links_and_anchors(tmp_path):
    report = _check_made_up(tmp_path, "# Title\n\n[ok](other.md#a-section-with-code) [ok](#title) "
                                      "[web](https://example.com) `[not a link](nowhere.md)`\n"
                                      "[gone](missing.md) [bad anchor](other.md#no-such-heading) [bad](#nope)\n"
                                      "```python\nprint((\n```\n")
    assert report.links == 5 and report.anchors == 4
    assert len(report.problems) == 4, report.problems
    assert "no such file" in report.problems[1] and "#no-such-heading" in report.problems[2]
    assert "#nope" in report.problems[3] and "does not compile" in report.problems[0]


def test_github_slugs():
    assert github_slug("Pooling modes (`pooling_mode` in `config.json`)") == "pooling-modes-pooling_mode-in-configjson"
    assert github_slug("Where it runs") == "where-it-runs"
    assert github_slug("vLLM 0.32 (what it reads)") == "vllm-032-what-it-reads"
    assert github_slug("**Start** here: two commands!") == "start-here-two-commands"
