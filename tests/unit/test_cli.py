"""The `ser` command line: help for every command, and clear errors instead of tracebacks."""

import subprocess
import sys

import pytest

from ser_platform.cli import build_parser, main

COMMANDS = ["synth", "prepare", "model-summary", "cache", "train", "sweep", "tables", "predict"]


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "ser_platform.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ser " + command in capsys.readouterr().out


def test_bad_override_is_a_clear_error_not_a_traceback(capsys):
    assert main(["model-summary", "--set", "loss.alpah=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'loss.alpah'" in err and "Traceback" not in err
