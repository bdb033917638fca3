"""The shell commands the documentation shows, and running one of them as a test does.

`documented_commands()` reads every ```bash block of README.md and docs/*.md and returns its
`scfm-jax ...` command lines (backslash continuations joined, comments dropped, whitespace
normalised). A block directly preceded by `<!-- docs-test: skip (reason) -->` is exempt. A test
covers a documented command by holding its exact text as a string and running it with
`run_documented(command, cwd)`; `tests/test_docs_commands.py` checks that every documented command
is held by some test.
"""
from __future__ import annotations

import ast
import contextlib
import glob
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SKIP_MARKER = re.compile(r"^<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>.*)\))?\s*-->$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
SEPARATORS = ("&&", "||", ";", "|")


@dataclass(frozen=True)
class ShellBlock:
    """One fenced shell block of a Markdown page."""
    path: Path
    line: int                 # 1-based line of the opening fence
    text: str
    skip_reason: str | None   # None: not exempt; "": the marker without a reason


@dataclass(frozen=True)
class DocumentedCommand:
    path: Path
    line: int
    command: str
    skip_reason: str | None = None   # set for the commands of an exempt block

    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def documentation_pages() -> list[Path]:
    """README.md and every Markdown page of the Sphinx site (docs/, build output excluded)."""
    pages = [REPO_ROOT / "README.md"]
    docs = REPO_ROOT / "docs"
    pages += sorted(p for p in docs.rglob("*.md") if "_build" not in p.relative_to(docs).parts)
    return [p for p in pages if p.is_file()]


def shell_blocks(path: Path) -> list[ShellBlock]:
    """The fenced blocks whose language is a shell, with the skip marker that precedes each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence = opening["fence"]
        language = opening["info"].strip().removeprefix("{code-block}").strip().split(" ")[0]
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if language in SHELL_LANGUAGES:
            previous = next((lines[i].strip() for i in range(index - 1, -1, -1)
                             if lines[i].strip()), "")
            marker = SKIP_MARKER.match(previous)
            reason = None if marker is None else (marker["reason"] or "").strip()
            blocks.append(ShellBlock(path, index + 1, "\n".join(lines[index + 1:end]), reason))
        index = end + 1
    return blocks


def _strip_comment(line: str) -> str:
    """The line without a `#` comment (a `#` outside quotes, at the start or after whitespace)."""
    quote = None
    for position, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1].isspace()):
            return line[:position]
    return line


def _split_commands(line: str) -> list[str]:
    """A shell line split at `&&`, `||`, `;` and `|` outside quotes."""
    parts, current, quote, position = [], "", None, 0
    while position < len(line):
        char = line[position]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        else:
            separator = next((s for s in SEPARATORS if line.startswith(s, position)), None)
            if separator:
                parts.append(current)
                current, position = "", position + len(separator)
                continue
        current += char
        position += 1
    return parts + [current]


def normalise(command: str) -> str:
    return " ".join(command.split())


def scfm_commands(script: str) -> list[tuple[int, str]]:
    """(0-based line offset, command) of every `scfm-jax ...` invocation in a shell script."""
    commands, logical, first = [], "", None
    for offset, raw in enumerate(script.splitlines()):
        line = _strip_comment(raw.rstrip())
        first = offset if first is None else first
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        for part in _split_commands(logical):
            words = part.split()
            # leading VAR=value assignments belong to the environment, not the command
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words.pop(0)
            if words and words[0] == "scfm-jax":
                commands.append((first, normalise(" ".join(words))))
        logical, first = "", None
    return commands


def documented_commands(include_skipped: bool = False
                        ) -> tuple[list[DocumentedCommand], list[ShellBlock]]:
    """Every documented command that a test must run (with `include_skipped`, those of the
    exempt blocks too), and the blocks marked skip without a reason (which the docs test
    refuses)."""
    commands, unexplained = [], []
    for page in documentation_pages():
        for block in shell_blocks(page):
            if block.skip_reason == "":
                unexplained.append(block)
            if block.skip_reason is not None and not include_skipped:
                continue
            commands += [DocumentedCommand(page, block.line + 1 + offset, command,
                                           block.skip_reason)
                         for offset, command in scfm_commands(block.text)]
    return commands, unexplained


def commands_in_tests(exclude: tuple[str, ...] = ("test_docs_commands.py",)) -> dict[str, Path]:
    """The `scfm-jax ...` commands held as string constants (implicit concatenation joined, as
    Python does) by the test files, mapped to a file holding each."""
    found = {}
    for path in sorted(TESTS_DIR.rglob("*.py")):
        if path.name in exclude:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and "scfm-jax" in node.value:
                for _, command in scfm_commands(node.value):
                    found.setdefault(command, path)
    return found


@contextlib.contextmanager
def working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_documented(command: str, cwd: Path) -> int:
    """Runs a documented `scfm-jax ...` command line in this process, from `cwd` (where the test
    has put the files the command names), and returns its exit status."""
    from scfm_jax.main import main

    words = shlex.split(" ".join(command.replace("\\\n", " ").split()))
    assert words[0] == "scfm-jax", command
    with working_directory(cwd):
        expanded = []
        for word in words[1:]:   # as the shell does: a pattern matching nothing stays as it is
            matches = sorted(glob.glob(word)) if any(c in word for c in "*?[") else []
            expanded += matches or [word]
        return main(expanded)
