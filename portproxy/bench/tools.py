"""The field's load generators, run inside the client namespace, and what their output means.

Each function runs one tool once and returns plain numbers; parsing lives next to
the command line that produced the text, so a tool's quirks stay in one place.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

from typing import TYPE_CHECKING

from .. import debcache
from .checks import Unmeasured

if TYPE_CHECKING:
    from ..lab.namespaces import Namespace


class ToolError(RuntimeError):
    """A load generator failed or printed something we cannot read."""


def _tool(name: str) -> list[str]:
    """The argv prefix of a load generator unpacked from its Debian package (see debcache)."""
    try:
        return debcache.command(name)
    except debcache.ToolUnavailable as exc:
        raise ToolError(str(exc)) from None


def _run(ns: Namespace, argv: list[str], timeout: float) -> str:
    proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ToolError(f"{debcache.program_of(argv)} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0 and not out:
        raise ToolError(f"{debcache.program_of(argv)} failed: {(err or '').strip().splitlines()[-1:] or proc.returncode}")
    return out


# --- iperf3 ------------------------------------------------------------------------------------
def iperf(ns: Namespace, host: str, port: int, seconds: float, parallel: int = 1,
          udp_rate: str | None = None, length: int | None = None, reverse: bool = False) -> dict:
    """One iperf3 client run (JSON report); ``reverse``: the server sends (``-R``)."""
    argv = [*_tool("iperf3"), "-c", host, "-p", str(port), "-t", str(max(1, round(seconds))), "-J", "-P", str(parallel)]
    if reverse:
        argv.append("-R")
    if udp_rate:
        argv += ["-u", "-b", udp_rate]
    if length:
        argv += ["-l", str(length)]
    for attempt in range(_BUSY_RETRIES + 1):
        out = _run(ns, argv, seconds + 60)
        try:
            result = json.loads(out)
        except json.JSONDecodeError:
            raise ToolError(f"iperf3 printed no JSON: {out[:200]!r}") from None
        if "server is busy" not in result.get("error", "") or attempt == _BUSY_RETRIES:
            break
        # The server still winds down the previous test (after -R it is the sender, and
        # finishes last): it takes one test at a time.
        time.sleep(0.5)
    if "error" in result:
        raise ToolError(f"iperf3 to {host}:{port}: {result['error']}")
    return result


_BUSY_RETRIES = 10


def tcp_stream(result: dict) -> tuple[float, float]:
    """(Gbit/s received, bytes received) of a TCP run; nothing received is no measurement."""
    received = result.get("end", {}).get("sum_received", {})
    if not received.get("bytes"):
        raise Unmeasured("iperf3's server received no byte")
    return received["bits_per_second"] / 1e9, received["bytes"]


def udp_stream(result: dict) -> dict[str, float]:
    """What the server got of a UDP run: datagrams/s delivered, loss, Gbit/s.

    Nothing sent, or nothing delivered, is a failed run rather than a loss figure: a
    path that delivers no datagram at all is broken, not lossy."""
    s = result.get("end", {}).get("sum", {})
    sent = s.get("packets", 0)
    lost = s.get("lost_packets", 0)
    seconds = s.get("seconds", 0.0)
    if not sent or not seconds:
        raise Unmeasured("iperf3 sent no datagram")
    delivered = sent - lost
    if delivered <= 0:
        raise Unmeasured(f"no datagram reached the server ({sent} sent)")
    return {
        "delivered_datagrams_per_s": delivered / seconds,
        "loss_percent": 100.0 * lost / sent,
        "gbit_per_s": s.get("bits_per_second", 0.0) / 1e9,
        "delivered_datagrams": float(delivered),
    }


# --- sockperf ----------------------------------------------------------------------------------
_PERCENTILE = re.compile(r"percentile\s+(\d+\.\d+)\s*=\s*([\d.]+)")


def sockperf_ping_pong(ns: Namespace, host: str, port: int, seconds: float, tcp: bool) -> dict[str, float]:
    """Request/response round trips of 64-byte messages: p50 and p99 in microseconds (full RTT)."""
    argv = [*_tool("sockperf"), "ping-pong", "-i", host, "-p", str(port), "-t", str(max(1, round(seconds))),
            "-m", "64", "--full-rtt"]
    if tcp:
        argv.append("--tcp")
    return parse_sockperf(_run(ns, argv, seconds + 30), tcp)


_OBSERVATIONS = re.compile(r"Total (\d+) observations")


def parse_sockperf(out: str, tcp: bool) -> dict[str, float]:
    """p50/p99 of sockperf's ping-pong report, and how many round trips they rest on."""
    proto = "TCP" if tcp else "UDP"
    observations = _OBSERVATIONS.search(out)
    if not observations or int(observations.group(1)) == 0:
        raise Unmeasured(f"sockperf completed no round trip (is the path passing {proto}?)")
    percentiles = {float(p): float(v) for p, v in _PERCENTILE.findall(out)}
    if 50.0 not in percentiles or 99.0 not in percentiles:
        raise ToolError(f"sockperf printed no percentiles (is the path passing {proto}?)")
    return {"p50_us": percentiles[50.0], "p99_us": percentiles[99.0], "round_trips": float(observations.group(1))}


# --- wrk ---------------------------------------------------------------------------------------
_REQUESTS = re.compile(r"Requests/sec:\s+([\d.]+)")
_TOTAL = re.compile(r"(\d+) requests in ")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk_short_connections(ns: Namespace, host: str, port: int, seconds: float, connections: int) -> dict[str, float]:
    """Connection rate: every request on a fresh TCP connection (``Connection: close``)."""
    argv = [*_tool("wrk"), "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "5s",
            "-H", "Connection: close", f"http://{host}:{port}/"]
    return parse_wrk(_run(ns, argv, seconds + 30))


def parse_wrk(out: str) -> dict[str, float]:
    """Rate, completed requests (= connections: one request each) and errors of a wrk run."""
    match = _REQUESTS.search(out)
    total = _TOTAL.search(out)
    if not match or not total:
        raise ToolError(f"wrk printed no rate: {out[-200:]!r}")
    socket_errors = _SOCKET_ERRORS.search(out)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    non_2xx = _NON_2XX.search(out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    completed = int(total.group(1)) - (int(non_2xx.group(1)) if non_2xx else 0)
    if completed <= 0:
        raise Unmeasured(f"wrk completed no request ({errors} errors)")
    return {"connections_per_s": float(match.group(1)), "errors": float(errors), "connections": float(completed)}
