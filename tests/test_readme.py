"""Every command the README shows is one the CLI accepts; the cheap ones run.

Commands are read from the README's fenced code blocks (``wbscale …`` and ``make …``
lines, continuation lines joined). Each must parse with the real parser; the ones that
cost nothing (recipes, dry-run job scripts and sweeps, the documented error) are executed
and their output checked.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from wbscale.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Placeholders the README uses in generic command lines, and what a test substitutes.
PLACEHOLDERS = {"RECIPE": "demo", "NAME": "demo", "DIR": "runs/demo", "RUN_OR_CKPT": "runs/demo"}


def readme_commands() -> list[str]:
    """Command lines of the README's code blocks, continuation lines joined, comments cut."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for raw in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = raw.strip().removeprefix("$ ")
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            line = re.sub(r"\[[^\]]*…\]", "", line).strip()  # "[--set KEY=VALUE …]": optional repeats
            if line.startswith((".venv/bin/wbscale ", "wbscale ", "make ")):
                commands.append(line.removeprefix(".venv/bin/"))
    return commands


def _argv(command: str) -> list[str]:
    """The command's arguments, placeholders filled and repository paths made absolute."""
    words = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)[1:]]
    return [str(ROOT / w) if w.startswith(("recipes/", "docs/")) else w for w in words]


COMMANDS = readme_commands()
WBSCALE = [c for c in COMMANDS if c.startswith("wbscale ")]


def test_the_readme_shows_commands():
    assert len(WBSCALE) >= 20 and any(c.startswith("make demo") for c in COMMANDS)


@pytest.mark.parametrize("command", WBSCALE)
def test_readme_command_parses(command):
    argv = _argv(command)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's exit on a bad argument
        pytest.fail(f"the README's `{command}` does not parse (exit {exc.code})")
    assert callable(args.func)


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for command in COMMANDS:
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"README's `{command}`: no such Makefile target"


CHEAP = ("recipes list", "recipes show", "recipes check")


@pytest.mark.parametrize("command", [c for c in WBSCALE if c.startswith(tuple(f"wbscale {v}" for v in CHEAP))])
def test_cheap_readme_commands_run(command, capsys):
    assert main(_argv(command)) == 0, command
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("command", [c for c in WBSCALE if c.startswith(("wbscale slurm submit", "wbscale sweep run"))])
def test_readme_job_commands_render_in_a_dry_run(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = _argv(command)
    if argv[-1] != "--dry-run":
        argv.append("--dry-run")
    if argv[:2] == ["sweep", "run"]:
        argv += ["--out", str(tmp_path / "sweep")]
    assert main(argv) == 0, command
    assert capsys.readouterr().out.strip()


def test_the_readme_error_example_is_what_the_cli_says(capsys):
    text = README.read_text(encoding="utf-8")
    match = re.search(r"\$ (wbscale [^\n]+)\n(wbscale: error: [^\n]+)", text)
    assert match, "the README's error example is gone"
    command, expected = match.groups()
    assert main(_argv(command)) == 2
    # the message names the recipe file; shown relative to the checkout in the README
    assert capsys.readouterr().err.strip().replace(f"{ROOT}/", "") == expected
