"""``portproxy-docker-proxy``: a drop-in for Docker's docker-proxy (daemon.json ``userland-proxy-path``).

dockerd starts one proxy per published port, address family and protocol, with Go-style flags,
and waits on fd 3:

    portproxy-docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 9090 \\
        -container-ip 172.17.0.2 -container-port 80 [-use-listen-fd]

* readiness: ``0\\n`` on fd 3 once listening, or ``1\\n`` and the error text on failure; then
  fd 3 is closed (docker-proxy's contract). fd 3 is written only if, when the program starts,
  it is a pipe open for writing (what dockerd passes): started by hand or by another
  supervisor, fd 3 may be anything, and later it is whatever the process opens next;
* families as docker-proxy's: ``-host-ip 0.0.0.0`` listens on IPv4 only and ``-host-ip ::`` on
  IPv6 only, so the two proxies dockerd starts for one ``-p 9090:80`` coexist;
* ``-use-listen-fd`` (newer dockerd): the socket dockerd already bound is fd 4. It must be a
  bound TCP or UDP socket of the flag's protocol; a TCP socket that is not listening yet is
  made to listen; anything else is refused, so no handed socket can make the loop spin;
* exits on SIGINT/SIGTERM; ``-v``/``-version`` prints the version;
* delegation: when a ``portproxy serve`` answers on its delegate socket
  (``$PORTPROXY_SOCKET.delegate``, default ``/run/portproxy/portproxy.sock.delegate``), the bound
  socket is handed to it (SCM_RIGHTS), its answer goes to fd 3, and the process becomes a
  waiting shell holding the connection, whose end removes the mapping from the daemon
  (see :mod:`portproxy.controller.delegate`). Without a daemon it serves in-process.

Start-up is lean on purpose: dockerd waits for fd 3 before it starts the next proxy of a
port range, so the flags are checked, the socket bound and ``0\\n`` written using only
modules the interpreter has loaded anyway (``os``, ``_socket``, ``fcntl``); asyncio, uvloop
and the proxy are imported afterwards. Connections that arrive meanwhile wait in the
listen backlog (datagrams in the socket's buffer).

dockerd passes only those flags, so portproxy's own tunables come from the environment
dockerd runs in (``Environment=`` in a drop-in for docker.service):
``PORTPROXY_TARGET_CC`` is ``--target-cc``, the congestion control toward the container.

Flags follow Go's flag package: ``-x v``, ``-x=v``, ``--x``, ``--x=v``; parsing stops at
``--`` or the first non-flag argument; integers as Go's ``strconv.ParseInt(s, 0, 64)``.
"""

from __future__ import annotations

import os
import sys

import _signal  # C modules: ``socket`` and ``signal`` would import enum & co before readiness
import _socket

from . import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .proxy.options import ProxyOptions
    from .spec import Mapping

STATUS_FD = 3
LISTEN_FD = 4
SOCKET_ENV = "PORTPROXY_SOCKET"
DEFAULT_SOCKET = "/run/portproxy/portproxy.sock"  # defaults.DEFAULT_SOCKET; pathlib would cost the lean start
WAITER_SHELL = "/bin/sh"
WAITER_SCRIPT = (  # the waiting process of a delegated port; its stdin is the connection to the daemon
    "trap 'exit 0' INT TERM\n"
    "while read -r _; do :; done\n"
    "echo \"$0: the portproxy daemon ended the delegation of this port\" >&2\n"
    "exit 1\n"
)
BACKLOG = 4096  # ProxyOptions.listen_backlog; Go's listeners take net.core.somaxconn
IDLE_LIMIT = 0.3  # seconds at most of SCHED_IDLE after readiness, see _idle_while_importing

_VALUE_FLAGS: dict[str, str] = {
    "proto": "tcp", "host-ip": "0.0.0.0", "host-port": "-1", "container-ip": "0.0.0.0", "container-port": "-1",
}
_INT_FLAGS = {"host-port", "container-port"}
_BOOL_FLAGS = {"use-listen-fd", "v", "version", "h", "help"}
_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
_GO_DIGITS = set("0123456789abcdefABCDEF_")  # ASCII only: Python's int() also takes spaces and other scripts
USAGE = """Usage of portproxy-docker-proxy:
  -container-ip value
    \tcontainer ip (default 0.0.0.0)
  -container-port int
    \tcontainer port (default -1)
  -host-ip value
    \thost ip (default 0.0.0.0)
  -host-port int
    \thost port (default -1)
  -proto string
    \tproxy protocol (default "tcp")
  -use-listen-fd
    \tuse a supplied listen fd
  -v\tprint version information and quit
  -version
    \tprint version information and quit"""


class UsageError(Exception):
    """A command line Go's flag package would refuse (exit status 2)."""


class StartError(Exception):
    """The proxy cannot start; the message is the one line for fd 3 and stderr (exit status 1)."""


# --- fd 3: the status pipe -------------------------------------------------------------------------
class StatusPipe:
    """docker-proxy's fd 3, written once and closed, and only if it was verified at start."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def adopt(cls, fd: int = STATUS_FD) -> "StatusPipe":
        """Take ``fd`` if it is a pipe (FIFO) open for writing, as dockerd passes it.

        Must run before the program opens anything: a process started without fd 3
        would otherwise find its own epoll fd or log file there and write into it.
        """
        import fcntl  # C module, already loaded by the interpreter's start-up

        try:
            mode = os.fstat(fd).st_mode
            access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            return cls(None)
        if mode & 0o170000 != 0o010000 or access not in (os.O_WRONLY, os.O_RDWR):  # S_ISFIFO, writable
            return cls(None)
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)  # a reader that never reads must not hang us (docker-proxy does the same)
        return cls(fd)

    def report(self, error: str | None) -> None:
        """``0\\n`` or ``1\\n<error>``, then close; later calls do nothing."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.write(fd, b"0\n" if error is None else b"1\n" + error.encode(errors="replace"))
        except OSError:
            pass  # dockerd gone or not reading: nothing to tell
        finally:
            os.close(fd)


# --- flags (pure) ----------------------------------------------------------------------------------
def parse_go_int(text: str, flag: str) -> int:
    """``strconv.ParseInt(text, 0, 64)`` as Go's flag package uses it for ``-flag int``."""
    body = text[1:] if text[:1] in "+-" else text
    base = 10
    if body[:2].lower() in ("0x", "0o", "0b"):
        base = {"x": 16, "o": 8, "b": 2}[body[1].lower()]
        digits = body[2:]
    elif len(body) > 1 and body[0] == "0":
        base, digits = 8, body[1:]
    else:
        digits = body
    try:
        # Go's underscoreOK: "_" only right after a digit or a base prefix (a leading 0 counts),
        # and followed by a digit.
        if not digits.strip("_") or not set(digits) <= _GO_DIGITS or (digits.startswith("_") and base == 10) \
                or digits.endswith("_") or "__" in digits:
            raise ValueError
        value = int(digits.replace("_", ""), base)
    except ValueError:
        raise UsageError(f'invalid value "{text}" for flag -{flag}: parse error') from None
    value = -value if text.startswith("-") else value
    if not -(2 ** 63) <= value < 2 ** 63:
        raise UsageError(f'invalid value "{text}" for flag -{flag}: value out of range')
    return value


def parse_go_flags(argv: list[str]) -> dict[str, str | bool]:
    """Go's ``flag.Parse`` for docker-proxy's flags; raise UsageError as it would exit 2."""
    values: dict[str, str | bool] = dict(_VALUE_FLAGS)
    values.update({name: False for name in _BOOL_FLAGS})
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        name, eq, value = name.partition("=")
        if name in _BOOL_FLAGS:
            if eq and value not in _GO_TRUE | _GO_FALSE:
                raise UsageError(f'invalid boolean value "{value}" for -{name}: parse error')
            values[name] = not eq or value in _GO_TRUE
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            if name in _INT_FLAGS:
                parse_go_int(value, name)
            values[name] = value
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return values


class Endpoint:
    """A parsed address: family, packed bytes and text, without importing ipaddress."""

    __slots__ = ("family", "packed", "text")

    def __init__(self, family: int, packed: bytes) -> None:
        if family == _socket.AF_INET6 and packed[:12] == b"\0" * 10 + b"\xff\xff":
            family, packed = _socket.AF_INET, packed[12:]  # ::ffff:a.b.c.d is IPv4, as Go's To4()
        self.family, self.packed = family, packed
        self.text = _socket.inet_ntop(family, packed)

    @classmethod
    def parse(cls, text: str, flag: str) -> "Endpoint":
        """Go's ``net.ParseIP``: dotted IPv4 or IPv6 text, no zone, no brackets."""
        for family in (_socket.AF_INET, _socket.AF_INET6):
            try:
                return cls(family, _socket.inet_pton(family, text))
            except OSError:
                pass
        raise UsageError(f'invalid value "{text}" for flag -{flag}: invalid IP address: {text}')

    @property
    def unspecified(self) -> bool:
        return not any(self.packed)

    @property
    def multicast(self) -> bool:
        first = self.packed[0]
        return 224 <= first <= 239 if self.family == _socket.AF_INET else first == 0xFF

    @property
    def broadcast(self) -> bool:
        return self.packed == b"\xff" * 4

    def endpoint(self, port: int) -> str:
        return f"[{self.text}]:{port}" if self.family == _socket.AF_INET6 else f"{self.text}:{port}"


class Request:
    """What dockerd asked for, checked: the proxy of one port, one family, one protocol."""

    __slots__ = ("proto", "host", "host_port", "container", "container_port", "use_listen_fd")

    def __init__(self, flags: dict[str, str | bool]) -> None:
        proto = str(flags["proto"])
        if proto not in ("tcp", "udp", "sctp"):
            raise StartError(f"unsupported protocol {proto}")
        if proto == "sctp":
            raise StartError("sctp: not supported by portproxy-docker-proxy; use Docker's docker-proxy for SCTP ports")
        self.proto = proto
        self.host = Endpoint.parse(str(flags["host-ip"]), "host-ip")
        self.container = Endpoint.parse(str(flags["container-ip"]), "container-ip")
        self.host_port = _port(flags, "host-port")
        self.container_port = _port(flags, "container-port")
        self.use_listen_fd = bool(flags["use-listen-fd"])
        if self.host.multicast or self.host.broadcast:
            raise StartError(f"-host-ip {self.host.text}: a multicast or broadcast address cannot be published")
        if self.container.unspecified or self.container.multicast or self.container.broadcast:
            raise StartError(f"-container-ip {self.container.text}: not a container address")

    @property
    def where(self) -> str:
        return f"{self.host.endpoint(self.host_port)}/{self.proto}"


def _port(flags: dict[str, str | bool], name: str) -> int:
    port = parse_go_int(str(flags[name]), name)
    if port == -1:
        raise StartError(f"-{name} is required")
    if not 0 < port < 65536:
        raise StartError(f"-{name} {port}: not a port (1-65535)")
    return port


# --- the host socket (still lean: _socket only) -----------------------------------------------------
def _kind(proto: str) -> int:
    return _socket.SOCK_STREAM if proto == "tcp" else _socket.SOCK_DGRAM


def listen(request: Request) -> _socket.socket:
    """Bind (and for TCP listen on) the host address, in its family only."""
    import errno

    family = request.host.family
    sock = _socket.socket(family, _kind(request.proto) | _socket.SOCK_CLOEXEC)
    try:
        if request.proto == "tcp":
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)  # as Go's listeners
        if family == _socket.AF_INET6:
            sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)  # as Go's "tcp6"/"udp6"
        if not request.host.unspecified:
            sock.setsockopt(_socket.SOL_IP, getattr(_socket, "IP_FREEBIND", 15), 1)
        sock.bind((request.host.text, request.host_port))
        if request.proto == "tcp":
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: "port is already in use",
               errno.EACCES: "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"}.get(exc.errno or 0)
        raise StartError(f"cannot listen on {request.where}: {why or exc.strerror}") from None
    return sock


def adopt_listen_fd(request: Request, fd: int = LISTEN_FD) -> _socket.socket:
    """dockerd's pre-bound socket on fd 4, checked so that serving it cannot spin."""
    where = f"-use-listen-fd: fd {fd}"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise StartError(f"{where}: {exc.strerror}") from None
    if mode & 0o170000 != 0o140000:  # S_ISSOCK
        raise StartError(f"{where} is not a socket")
    sock = _socket.socket(fileno=os.dup(fd))
    try:
        expected = _kind(request.proto)
        protocol = sock.getsockopt(_socket.SOL_SOCKET, getattr(_socket, "SO_PROTOCOL", 38))
        if sock.family not in (_socket.AF_INET, _socket.AF_INET6) or sock.type != expected or \
                protocol not in (0, _socket.IPPROTO_TCP if request.proto == "tcp" else _socket.IPPROTO_UDP):
            raise StartError(f"{where} is not an IP {request.proto} socket")
        if sock.getsockname()[1] == 0:
            raise StartError(f"{where} is not bound to a port")
        if request.proto == "tcp" and not sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN):
            try:
                sock.listen(BACKLOG)
            except OSError as exc:
                raise StartError(f"{where}: cannot listen: {exc.strerror}") from None
        if request.proto == "udp":
            try:
                sock.getpeername()
            except OSError:
                pass
            else:
                raise StartError(f"{where} is a connected socket")
    except BaseException:
        sock.close()
        raise
    os.close(fd)  # the copy (os.dup: close-on-exec) is the one served
    return sock


ENVIRONMENT: dict[str, object] = {}
"""The per-mapping options dockerd's environment sets (PORTPROXY_TARGET_CC, PORTPROXY_SOURCE,
PORTPROXY_PROXY_PROTOCOL), checked by the one options schema."""


def _check_environment() -> None:
    # The schema (and the re module it brings) is imported only when such a variable is set.
    if not any(name.startswith("PORTPROXY_") and name != SOCKET_ENV for name in os.environ):
        return
    from . import schema
    from .errors import BadInput

    try:
        ENVIRONMENT.update(schema.from_environment(os.environ))
    except BadInput as exc:
        raise StartError(str(exc)) from None


def start(argv: list[str], status: StatusPipe) -> tuple[Request, _socket.socket] | int:
    """Everything up to readiness: parse, check, bind, report. An exit status if it stops here."""
    try:
        flags = parse_go_flags(argv)
    except UsageError as exc:
        print(f"{exc}\n{USAGE}", file=sys.stderr)
        status.report(str(exc))
        return 2
    if flags["h"] or flags["help"]:
        print(USAGE, file=sys.stderr)
        return 0
    if flags["v"] or flags["version"]:
        print(f"portproxy-docker-proxy (portproxy {__version__})")
        return 0
    try:
        request = Request(flags)
        _check_environment()
        sock = adopt_listen_fd(request) if request.use_listen_fd else listen(request)
    except (UsageError, StartError) as exc:
        print(f"portproxy-docker-proxy: {exc}", file=sys.stderr)
        status.report(str(exc))
        return 2 if isinstance(exc, UsageError) else 1
    except Exception as exc:  # a bug: dockerd still gets a line instead of a silent close
        status.report(f"portproxy-docker-proxy: internal error: {exc!r}")
        raise
    # dockerd may stop the proxy as soon as it reads the status: until the event loop takes
    # over SIGTERM, it ends the process cleanly (exit 0, as docker-proxy's handler).
    _signal.signal(_signal.SIGTERM, _exit_on_signal)
    _signal.signal(_signal.SIGINT, _exit_on_signal)
    connection = connect_daemon()
    if connection is not None:
        error = delegate(connection, request, sock)
        if error != OTHER_NAMESPACE:  # else: this daemon serves another namespace; serve in-process
            status.report(error)
            sock.close()  # the daemon holds the port now (or refused it)
            if error is not None:
                print(f"portproxy-docker-proxy: {error}", file=sys.stderr)
                return 1
            wait_delegated(connection, argv)
        connection.close()
    status.report(None)
    return request, sock


# --- delegation: the daemon serves the port (still lean) --------------------------------------------
def delegate_socket_path() -> str:
    """The daemon's delegate socket, beside its control socket ($PORTPROXY_SOCKET or the default);
    see portproxy.controller.delegate."""
    return (os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET) + ".delegate"


def connect_daemon(path: str | None = None) -> _socket.socket | None:
    """A connection to the daemon's delegate socket, or None when no daemon answers there."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        conn.connect(path or delegate_socket_path())
    except OSError:  # no socket, nobody listening, not allowed: serve in-process
        conn.close()
        return None
    return conn


def delegation_request(request: Request, pid: int) -> bytes:
    """The one request message (see :mod:`portproxy.delegation`): the port, its owner (unique
    per drop-in and port) and the options dockerd's environment sets."""
    from . import delegation  # only when a daemon answers: a standalone start does without

    container = request.container.endpoint(request.container_port)
    spec = f"{request.host.endpoint(request.host_port)}:{container}/{request.proto}"
    owner = {"kind": delegation.OWNER_KIND, "id": f"docker-proxy-{pid}-{request.where}",
             "name": f"docker-proxy[{pid}]", "container": container}
    return delegation.encode_request(spec, owner, ENVIRONMENT)


OTHER_NAMESPACE = "the portproxy daemon serves another network namespace"


def parse_answer(data: bytes) -> str | None:
    """None when the daemon serves the port, OTHER_NAMESPACE when it serves another network
    namespace (serve in-process), else the one line that says why not."""
    from . import delegation

    try:
        kind, error = delegation.decode_answer(data)
    except delegation.MalformedMessage as exc:
        return str(exc)
    return None if kind == delegation.OK else OTHER_NAMESPACE if kind == delegation.OTHER_NAMESPACE else error


def delegate(conn: _socket.socket, request: Request, sock: _socket.socket) -> str | None:
    """Hand ``sock`` to the daemon (SCM_RIGHTS); None when it serves the port, OTHER_NAMESPACE
    when the daemon serves another network namespace, else why it does not."""
    from . import delegation

    fd = sock.fileno().to_bytes(4, sys.byteorder)
    try:
        conn.settimeout(delegation.ANSWER_TIMEOUT)
        conn.sendmsg([delegation_request(request, os.getpid())],
                     [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd)])
        answer = conn.recv(delegation.MAX_ANSWER)
    except OSError as exc:
        return f"delegating {request.where} to the portproxy daemon: {exc.strerror or exc}"
    return parse_answer(answer)


def wait_delegated(conn: _socket.socket, argv: list[str]) -> None:
    """Become the waiting process: a shell (a few hundred KB) whose stdin is the connection.
    Its end, however it comes (dockerd's SIGINT or SIGTERM, SIGKILL), ends the connection,
    and the daemon then removes the mapping. It leaves, too, when the daemon goes away."""
    conn.setblocking(True)
    os.dup2(conn.fileno(), 0)
    os.closerange(3, 1 << 16)
    name = sys.argv[0] if sys.argv and sys.argv[0] else "portproxy-docker-proxy"
    try:
        os.execv(WAITER_SHELL, [name, "-c", WAITER_SCRIPT, "portproxy-docker-proxy", *argv])
    except OSError:  # no shell: wait here, heavier but as sure
        while os.read(0, 1):
            pass
        raise SystemExit(1)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


# --- serving (imports the proxy only now) -----------------------------------------------------------
def _mapping(request: Request, sock: _socket.socket) -> Mapping:
    import ipaddress

    from .spec import Mapping

    host_ip, host_port = sock.getsockname()[:2]
    return Mapping(request.proto, ipaddress.ip_address(host_ip), host_port, host_port,  # type: ignore[arg-type]
                   ipaddress.ip_address(request.container.text), request.container_port, request.container_port)


def _options() -> ProxyOptions:
    """docker-proxy's fixed behaviour plus what the environment asks for (checked in start)."""
    from .schema import proxy_options
    from .proxy.options import ProxyOptions

    return proxy_options(ENVIRONMENT, ProxyOptions(drain_timeout=0))


def _idle_while_importing() -> bool:
    """Import the proxy at idle CPU priority (SCHED_IDLE), back to normal once it serves.

    dockerd starts the proxies of a port range one after the other, each waiting for the
    previous one's fd 3; on a small machine the previous proxy's imports (~100 ms of CPU)
    would otherwise slow every following start. Only where the way back is sure (root, as
    under dockerd): an unprivileged process might not be allowed to leave SCHED_IDLE. On a
    saturated machine an idle task gets almost no CPU, so a timer (SIGALRM, handled by the
    first bytecode that runs) ends the idle phase after IDLE_LIMIT seconds in any case.
    """
    if os.geteuid() != 0 or not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    _signal.signal(_signal.SIGALRM, lambda signum, frame: _normal_priority())
    _signal.setitimer(_signal.ITIMER_REAL, IDLE_LIMIT)
    return True


def _normal_priority() -> None:
    _signal.setitimer(_signal.ITIMER_REAL, 0)
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


async def _serve(request: Request, lean_sock: _socket.socket, idle: bool = False) -> int:
    import asyncio
    import socket

    from .errors import PortproxyError
    from .map_command import stop_signal, stop_transparent
    from .proxy import ProxyServer

    stop = stop_signal()
    sock = socket.socket(fileno=lean_sock.detach())
    options = _options()
    server = ProxyServer(asyncio.get_running_loop(), options)
    routing = None
    try:
        if options.source == "client":
            # Every drop-in of the namespace shares one routing; the last one removes it.
            from .map_command import start_transparent
            from .schema import transparent_options

            routing = await start_transparent(transparent_options({}))
        server.add(_mapping(request, sock), {sock.getsockname()[1]: sock})
    except PortproxyError as exc:  # readiness is already reported; say why on stderr and leave
        print(f"portproxy-docker-proxy: {exc}", file=sys.stderr)
        await stop_transparent(routing)
        return 1
    finally:
        if idle:
            _normal_priority()  # root may always leave SCHED_IDLE; a failure here is a bug to see
    await stop
    await server.stop(drain_timeout=0)
    await stop_transparent(routing)
    return 0


def main(argv: list[str] | None = None) -> int:
    status = StatusPipe.adopt()  # first of all: see the docstring of StatusPipe.adopt
    started = start(sys.argv[1:] if argv is None else argv, status)
    if isinstance(started, int):
        return started
    idle = _idle_while_importing()
    from .runtime import raise_fd_limit, run, setup_logging

    setup_logging("warning")
    raise_fd_limit()
    return run(lambda: _serve(*started, idle))


if __name__ == "__main__":
    sys.exit(main())
