"""The `orthotorch` command: --version, info, and subcommand discovery."""

import subprocess
import sys

import pytest

import orthotorch
from orthotorch.cli import build_parser, main


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
        [sys.executable, "-m", "orthotorch.cli", "info"], capture_output=True, text=True, check=True
    )
    assert "orthotorch" in proc.stdout


def test_subcommands_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "info" in sub.choices
