"""The list of modes is written once (portproxy.schema.MODES); every user of it agrees. No root."""

from __future__ import annotations

from typing import get_args

import pytest

from portproxy import cli, schema
from portproxy.controller import config
from portproxy.errors import BadInput
from portproxy.metrics import collector


def test_one_list_of_modes() -> None:
    assert schema.MODES == get_args(schema.Mode) == get_args(config.Mode)
    assert list(schema.MODE_HELP) == list(schema.MODES)
    assert schema.BY_NAME["mode"].choices == schema.MODES
    assert schema.BY_NAME["mode"].default == schema.MODES[0] == config.Settings().mode
    assert collector.MODES is schema.MODES and cli.MODES is schema.MODES
    for mode in schema.MODES:
        assert schema.check("mode", mode, "mode") == mode
        assert schema.MODE_HELP[mode] in schema.BY_NAME["mode"].help
    with pytest.raises(BadInput):
        schema.check("mode", "warp", "mode")


def test_the_command_line_takes_every_mode() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["add", "9090:10.0.0.2:80"]).mode == schema.MODES[0]
    for mode in schema.MODES:
        assert parser.parse_args(["add", "9090:10.0.0.2:80", "--mode", mode]).mode == mode
        assert parser.parse_args(["switch", "9090", "--mode", mode]).mode == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["switch", "9090", "--mode", "warp"])
