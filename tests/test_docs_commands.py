"""The documentation cannot drift from the CLI: every `scfm-jax` command shown in a ```bash block
of README.md or docs/*.md is run by a test (or exempt with its reason), every subcommand's
`--help` works, and every flag the docs use is one its command takes.

To cover a new documented command: put its exact text (backslash continuations and spacing may
differ) as a string in a test that creates the files it names and runs it, e.g. with
`docs_helpers.run_documented(command, tmp_path)`. A command that needs the cloud, an accelerator
or official weights goes in a block directly preceded by `<!-- docs-test: skip (the reason) -->`.
"""
import json
import re
import subprocess
import sys
import textwrap

import pytest

from docs_helpers import (REPO_ROOT, documented_commands, scfm_commands, shell_blocks,
                          commands_in_tests)

README_COMMANDS = ['pip install -e . && scfm-jax demo --workdir runs/demo',
                   'pip install -e ".[dev]" && python -m pytest -q -n 2']


def test_every_documented_command_is_run_by_a_test():
    commands, _ = documented_commands()
    assert commands, "no scfm-jax command found in README.md or docs/: is the collector broken?"
    tested = commands_in_tests()
    uncovered = [c for c in commands if c.command not in tested]
    assert not uncovered, (
        f"{len(uncovered)} documented command(s) that no test runs (put the exact text in a test "
        "that runs it, or precede the block with <!-- docs-test: skip (reason) -->):\n"
        + "\n".join(f"  {c.where()}: {c.command}" for c in uncovered))


def test_every_skipped_block_says_why():
    _, unexplained = documented_commands()
    assert not unexplained, "skip markers without a reason (<!-- docs-test: skip (why) -->):\n" \
        + "\n".join(f"  {b.path.relative_to(REPO_ROOT)}:{b.line}" for b in unexplained)


def test_the_collector_reads_blocks_as_the_shell_does(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        # A page

        ```bash
        pip install x && scfm-jax convert a.h5ad \\
            --output  s   # a comment
        TASK=3 scfm-jax verify s; echo done | scfm-jax embed --obs-filter "a | b # c"
        ```

        <!-- docs-test: skip (needs a TPU) -->
        ```bash
        scfm-jax plan --topology v5e-8
        ```

        <!-- docs-test: skip -->

        ```sh
        scfm-jax demo
        ```

        ```python
        scfm-jax is not shell here
        ```
        """))
    first, skipped, unexplained = shell_blocks(page)
    assert [c for _, c in scfm_commands(first.text)] == [
        "scfm-jax convert a.h5ad --output s", "scfm-jax verify s",
        'scfm-jax embed --obs-filter "a | b # c"']
    assert first.skip_reason is None and first.line == 3
    assert skipped.skip_reason == "needs a TPU"
    assert unexplained.skip_reason == ""


def test_tests_are_found_holding_a_command_split_over_lines(tmp_path, monkeypatch):
    import docs_helpers

    (tmp_path / "test_x.py").write_text(
        'COMMAND = ("scfm-jax convert a.h5ad \\\\\\n"\n            "    --output s")\n')
    monkeypatch.setattr(docs_helpers, "TESTS_DIR", tmp_path)
    assert set(commands_in_tests()) == {"scfm-jax convert a.h5ad --output s"}


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    first_block = shell_blocks(REPO_ROOT / "README.md")[0]
    assert readme.index(first_block.text) < readme.index("\n## "), "the commands come first"
    assert first_block.text.splitlines() == README_COMMANDS
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert README_COMMANDS[1] in ci.splitlines(), ".ci/run must run the README's test command"


@pytest.fixture(scope="module")
def help_texts():
    """`scfm-jax COMMAND --help` of every command, all in one Python process (a process per
    command costs ~10 s of imports each on the project's 2-core machine)."""
    script = textwrap.dedent("""\
        import contextlib, io, json, sys
        from scfm_jax.main import COMMANDS, main
        results = {}
        for name in COMMANDS:
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    code = main([name, "--help"])
            except SystemExit as exit_:
                code = exit_.code
            results[name] = [code or 0, out.getvalue()]
        print(json.dumps(results))
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_subcommand_has_a_working_help(help_texts):
    from scfm_jax.main import COMMANDS

    assert set(help_texts) == set(COMMANDS)
    broken = {name: code for name, (code, text) in help_texts.items()
              if code != 0 or "--" not in text}
    assert not broken, f"--help exits non-zero or lists no options: {broken}"


def test_every_documented_flag_is_one_its_command_takes(help_texts):
    """The exempt commands too: a renamed flag shows up here even where the command cannot run
    (`--config.a.b=x` overrides count as `--config`). An exempt block may show a command this
    branch does not have yet."""
    commands, _ = documented_commands(include_skipped=True)
    unknown = []
    for command in commands:
        words = command.command.split()
        name = words[1] if len(words) > 1 else ""
        if name in ("--version", "--help"):   # the entry point's own flags
            continue
        if name not in help_texts:
            if command.skip_reason is None:
                unknown.append(f"{command.where()}: unknown command {name!r}")
            continue
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9_-]*)", command.command):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_texts[name][1]):
                unknown.append(f"{command.where()}: scfm-jax {name} has no {flag}")
    assert not unknown, "documented flags the CLI does not take:\n  " + "\n  ".join(unknown)
