"""The `orthotorch` command: --version, info, and subcommand discovery."""

import subprocess
import sys

import pytest

import orthotorch
from orthotorch.apps.cli import build_parser, main


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"orthotorch {orthotorch.__version__}"


def test_info_lists_versions_threads_devices(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "geoopt", "networkx", "threads", "devices", "cpu", "native kernel"):
        assert word in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_console_script_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "orthotorch.apps.cli", "info"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "orthotorch" in proc.stdout


def test_subcommands_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "info" in sub.choices


def test_python_dash_m_orthotorch_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "orthotorch", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == f"orthotorch {orthotorch.__version__}"


def _subcommand_paths(parser, prefix=()):
    """Every (sub)command path of ``parser``: ``("demo",)``, ``("rnn", "train")``, …"""
    for action in parser._actions:
        if action.dest == "command" or type(action).__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommand_paths(sub, (*prefix, name))


def test_registered_subcommands_match_the_table():
    from orthotorch.apps.cli import SUBCOMMANDS

    names = {path[0] for path in _subcommand_paths(build_parser())}
    assert names == {"info"} | {name for name, _ in SUBCOMMANDS}


@pytest.mark.parametrize("path", sorted(set(_subcommand_paths(build_parser()))))
def test_every_subcommand_help_exits_zero(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: orthotorch " + " ".join(path))
    assert ":func:" not in out and "``" not in out  # no raw RST markup in help text


def test_a_broken_subcommand_module_fails_loudly(monkeypatch):
    from orthotorch.apps import cli

    monkeypatch.setattr(
        cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, ("ghost", "orthotorch.apps.no_such"))
    )
    with pytest.raises(ModuleNotFoundError, match="no_such"):
        cli.build_parser()
