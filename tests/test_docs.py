"""The README is the contract a newcomer reads: a setting or command missing from it is a bug."""

from __future__ import annotations

import click
import pytest

from gateway.cli import cli
from gateway.config import declared
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def commands(group: click.Group, prefix: str = "ecr-gateway") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        path = f"{prefix} {name}"
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            out += commands(cmd, path)
    return out


@pytest.mark.parametrize("section,key", [(s, f.name) for s, f in declared()])
def test_every_setting_is_in_the_readme(section: str, key: str) -> None:
    assert f"`{section}.{key}`" in README or f"`{section}.{key}`," in README or (
        f"{section}.{key}" in README
    ), f"{section}.{key} is not documented in README.md"


@pytest.mark.parametrize("path,cmd", commands(cli), ids=[p for p, _ in commands(cli)])
def test_every_command_is_documented_with_an_example(path: str, cmd: click.Command) -> None:
    assert path in README, f"`{path}` is not in README.md"
    if not isinstance(cmd, click.Group):
        assert "Example" in (cmd.help or ""), f"`{path} --help` has no example"


def test_readme_starts_with_the_two_commands() -> None:
    head = README[:1500]
    assert "make run" in head and "make test" in head
