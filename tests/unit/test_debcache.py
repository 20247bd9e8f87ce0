"""portproxy.debcache's contract without fetching: program names through env(1), one line for an
unknown program, and none of the programs installed by setup.sh."""

from __future__ import annotations

import subprocess
import sys

from portproxy import debcache
from tests.support import programs as test_programs
from tests.support.programs import setup_sh_packages


def test_setup_sh_installs_none_of_the_test_programs() -> None:
    """What the tests and the benchmark run (servers among them) is unpacked, never installed."""
    packages = set(setup_sh_packages())
    programs = {tool.package for tool in test_programs.TOOLS.values()}
    assert packages & (programs | {"nginx-light", "nginx-full", "nginx-core"}) == set()


def test_program_names_are_read_through_env() -> None:
    assert debcache.program_of(["env", "LD_LIBRARY_PATH=/c/usr/lib", "/c/usr/sbin/haproxy", "-db"]) == "haproxy"
    assert debcache.program_of(["/c/usr/bin/socat", "TCP-LISTEN:1"]) == "socat"


def test_unknown_program_is_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "portproxy.debcache", "warp-drive"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown program(s): warp-drive" in result.stderr
