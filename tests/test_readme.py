"""The README is the front door: every `adapter ...` line in its shell blocks names a command and options that exist,
and every `--set` in them names a real setting with a value of its type, so a user who copies a snippet gets as far
as their own data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from adapter.config import Config

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The argument lists of every `adapter` command in the README's bash blocks (continuations joined, comments
    dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for start in [i for i, w in enumerate(words) if w == "adapter" and (i == 0 or words[i - 1] == "&&")]:
                end = next((j for j in range(start + 1, len(words)) if words[j] == "&&"), len(words))
                commands.append(words[start + 1:end])
    return commands


def test_the_readme_has_the_commands_a_user_copies():
    names = {" ".join(c[:1]) for c in readme_commands()}
    assert {"demo", "convert", "split", "train", "evaluate", "search", "serve"} <= names, names


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_each_readme_command_parses(args):
    from cli import main

    command: click.Command = main
    words = list(args)
    while isinstance(command, click.Group):
        assert words and words[0] in command.commands, f"adapter {' '.join(args)}: no such command"
        command = command.commands[words.pop(0)]
    ctx = click.Context(command, info_name=command.name)
    parser = command.make_parser(ctx)
    values, rest, _ = parser.parse_args(words)  # an unknown option raises NoSuchOption here
    for setting in values.get("settings") or ():
        Config().with_settings([setting])  # an unknown key or a value of the wrong type raises SettingError
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    variadic = any(p.nargs == -1 for p in arguments)
    assert variadic or len(rest) <= len(arguments), f"adapter {' '.join(args)}: stray words {rest}"
