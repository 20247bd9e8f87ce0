"""The list of modes is written once (portproxy.options.MODES); every user of it agrees. No root."""

from __future__ import annotations

from typing import get_args

import pytest

from portproxy import cli, options
from portproxy.controller import config
from portproxy.errors import BadInput
from portproxy.metrics import collector


def test_one_list_of_modes() -> None:
    assert options.MODES == get_args(options.Mode) == get_args(config.Mode)
    assert list(options.MODE_HELP) == list(options.MODES)
    assert options.BY_NAME["mode"].choices == options.MODES
    assert options.BY_NAME["mode"].default == options.MODES[0] == config.Settings().mode
    assert collector.MODES is options.MODES and cli.MODES is options.MODES
    for mode in options.MODES:
        assert options.check("mode", mode, "mode") == mode
        assert options.MODE_HELP[mode] in options.BY_NAME["mode"].help
    with pytest.raises(BadInput):
        options.check("mode", "warp", "mode")


def test_the_command_line_takes_every_mode() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["add", "9090:10.0.0.2:80"]).mode == options.MODES[0]
    for mode in options.MODES:
        assert parser.parse_args(["add", "9090:10.0.0.2:80", "--mode", mode]).mode == mode
        assert parser.parse_args(["switch", "9090", "--mode", mode]).mode == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["switch", "9090", "--mode", "warp"])
