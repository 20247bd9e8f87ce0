"""Network-namespace identity (portproxy.netident). No root: the other namespace is a child's own,
made with an unprivileged user namespace where the kernel allows one."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from portproxy import netident

CHILD = """
import ctypes, os, socket, sys
from portproxy import netident
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x40000000):  # CLONE_NEWUSER | CLONE_NEWNET
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
channel = socket.socket(fileno=int(sys.argv[1]))
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
socket.send_fds(channel, [netident.netns_id().encode()], [probe.fileno()])
sys.stdin.read()
"""


def test_this_threads_namespace() -> None:
    assert re.fullmatch(r"[ci][0-9]+", netident.netns_id())
    assert netident.netns_id() == netident.netns_id()
    assert netident.own_netns() == netident.netns_of_pid(os.getpid())
    with socket.socket() as sock:
        assert netident.in_own_netns(sock, os.getpid())
        assert netident.in_own_netns(pid=os.getpid())
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(netident.netns_id()))
    thread.start()
    thread.join()
    assert seen == [netident.netns_id()]


def test_nothing_to_tell_by_is_an_oserror() -> None:
    with pytest.raises(OSError):
        netident.in_own_netns()
    with pytest.raises(OSError):
        netident.in_own_netns(pid=0)  # a peer outside this pid namespace
    with pytest.raises(OSError):
        netident.netns_of_pid(2 ** 22 + 1)  # above pid_max's ceiling: no such process


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert netident.peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def test_another_namespace_is_another() -> None:
    parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = {**os.environ, "PYTHONPATH": str(Path(netident.__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(child_end.fileno())], pass_fds=[child_end.fileno()],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    child_end.close()
    try:
        parent.settimeout(30)
        try:
            data, fds, _, _ = socket.recv_fds(parent, 100, 1)
        except (OSError, TimeoutError):
            data, fds = b"", []
        if not fds:
            child.kill()
            pytest.skip(f"no user namespace for an unprivileged child here: {child.communicate()[1][-200:]!r}")
        theirs = socket.socket(fileno=fds[0])
        with theirs:
            assert data.decode() != netident.netns_id()
            assert netident.netns_of_pid(child.pid) != netident.own_netns()
            assert not netident.in_own_netns(pid=child.pid)
            assert not netident.in_own_netns(theirs, child.pid)
            try:
                netident.netns_of_socket(theirs)
            except PermissionError:
                pass  # without CAP_NET_ADMIN the sender's pid stands in, as above
            else:  # the socket's own namespace decides, whoever sent it
                assert not netident.in_own_netns(theirs, os.getpid())
    finally:
        parent.close()
        child.stdin.close()
        child.wait(timeout=30)
