"""A sockmap relay's kernel half: hand-assembled eBPF and the raw ``bpf()`` syscall via ctypes.

No compiler, libbpf or bpftool is needed at runtime: the verdict program is 23
instructions written out below, one comment each, and the objects are made with
``BPF_MAP_CREATE`` / ``BPF_PROG_LOAD`` / ``BPF_PROG_ATTACH``. Every object is a file
descriptor of the calling process, so all of it dies with the process (nothing is
pinned, nothing is attached to a cgroup or an interface).

The data model (one relayed connection = two sockets, a *pair*):

* ``sockmap`` (``BPF_MAP_TYPE_SOCKMAP``, key u32 slot, value socket fd): the pair's two
  sockets sit in slots ``2i`` and ``2i + 1``. Attaching the verdict program to this map
  makes the kernel run it for every skb either socket receives.
* ``peers`` (``BPF_MAP_TYPE_HASH``, key u64 socket cookie, value :data:`PEER`): for each
  socket, the slot of its peer and a byte counter the program adds every skb's length to
  (atomically). The relay reads it to count bytes and to know when a direction has
  drained before it forwards a FIN.

The program: drop an empty skb (see :func:`verdict_program`); look up the receiving socket's cookie in ``peers``; if found, add
``skb->len`` to its counter and return ``bpf_sk_redirect_map(skb, sockmap, peer, 0)``
(flags 0 = the peer's *egress*: the bytes are sent out of the peer socket); if not found,
``SK_PASS`` (the bytes stay on the socket for the process to read).

:func:`verdict_program` and :func:`encode` are pure (no syscall) and can be checked
without root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

# --- the bpf() ABI (linux/bpf.h) -------------------------------------------------------
SYS_BPF = 321  # x86_64
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD, BPF_PROG_ATTACH = 5, 8
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_SOCKMAP = 1, 15
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_PARSER, BPF_SK_SKB_STREAM_VERDICT = 4, 5
BPF_ANY = 0
SK_DROP, SK_PASS = 0, 1

FN_MAP_LOOKUP_ELEM = 1
FN_GET_SOCKET_COOKIE = 46
FN_SK_REDIRECT_MAP = 52

SO_COOKIE = 57

PEER = struct.Struct("<IIQ")
"""``peers`` value: u32 peer slot, u32 padding, u64 bytes received by this socket (and
redirected to the peer)."""
COOKIE = struct.Struct("<Q")
SLOT = struct.Struct("<I")

# --- instruction encoding ----------------------------------------------------------------
# struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }
_INSN = struct.Struct("<BBhi")

MOV64_X = 0xBF   # BPF_ALU64 | BPF_MOV | BPF_X: dst = src
MOV64_K = 0xB7   # BPF_ALU64 | BPF_MOV | BPF_K: dst = imm
ADD64_K = 0x07   # BPF_ALU64 | BPF_ADD | BPF_K: dst += imm
LDX_W = 0x61     # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
STX_DW = 0x7B    # BPF_STX | BPF_MEM | BPF_DW: *(u64 *)(dst + off) = src
ATOMIC_DW = 0xDB  # BPF_STX | BPF_ATOMIC | BPF_DW, imm BPF_ADD: lock *(u64 *)(dst + off) += src
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two slots; src = BPF_PSEUDO_MAP_FD makes imm a map fd
JEQ_K = 0x15     # BPF_JMP | BPF_JEQ | BPF_K: if dst == imm goto pc + 1 + off
CALL = 0x85      # BPF_JMP | BPF_CALL: r0 = helper imm(r1..r5)
EXIT = 0x95      # BPF_JMP | BPF_EXIT: return r0
BPF_ADD = 0x00
BPF_PSEUDO_MAP_FD = 1


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, (src << 4) | dst, off, imm)


def ld_map_fd(dst: int, fd: int) -> bytes:
    """``dst = &map`` (the verifier turns the fd into the map's address): two slots."""
    return insn(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, fd) + insn(0)


def encode(program: list[bytes]) -> bytes:
    return b"".join(program)


SKB_LEN = 0  # offsetof(struct __sk_buff, len)


def verdict_program(peers_fd: int, sockmap_fd: int) -> list[bytes]:
    """The SK_SKB stream verdict: redirect to the peer's egress, counting bytes.

    Registers: r1 = ctx (struct __sk_buff *) on entry, r6 = ctx and r7 = its length kept
    across calls (r1-r5 are clobbered by every call), r10 = frame pointer (read only).

    An skb of length 0 (the kernel hands the verdict the FIN's empty skb) is dropped, not
    redirected: redirected, the peer's workqueue "sends" it, gets 0 bytes sent back, and
    reports EPIPE on the peer socket, which a relay can only read as a broken connection.
    """
    return [
        insn(MOV64_X, 6, 1),                        # 0: r6 = r1 (keep the skb)
        insn(LDX_W, 7, 1, SKB_LEN),                 # 1: r7 = skb->len (r7 survives calls)
        insn(JEQ_K, 7, off=18, imm=0),              # 2: if r7 == 0 goto 21 (an empty skb: the FIN's)
        insn(CALL, imm=FN_GET_SOCKET_COOKIE),       # 3: r0 = bpf_get_socket_cookie(skb)
        insn(STX_DW, 10, 0, -8),                    # 4: *(u64 *)(fp - 8) = r0 (the key, on the stack)
        insn(MOV64_X, 2, 10),                       # 5: r2 = fp
        insn(ADD64_K, 2, imm=-8),                   # 6: r2 = fp - 8 (&key)
        ld_map_fd(1, peers_fd),                     # 7-8: r1 = &peers
        insn(CALL, imm=FN_MAP_LOOKUP_ELEM),         # 9: r0 = bpf_map_lookup_elem(&peers, &key)
        insn(JEQ_K, 0, off=8, imm=0),               # 10: if r0 == NULL goto 19 (not ours: pass)
        insn(ATOMIC_DW, 0, 7, 8, BPF_ADD),          # 11: lock value->bytes += skb->len
        insn(LDX_W, 3, 0, 0),                       # 12: r3 = value->peer (the slot to redirect to)
        insn(MOV64_X, 1, 6),                        # 13: r1 = skb
        ld_map_fd(2, sockmap_fd),                   # 14-15: r2 = &sockmap
        insn(MOV64_K, 4, imm=0),                    # 16: r4 = 0 (flags: the peer's egress)
        insn(CALL, imm=FN_SK_REDIRECT_MAP),         # 17: r0 = bpf_sk_redirect_map(skb, &sockmap, r3, 0)
        insn(EXIT),                                 # 18: return r0 (SK_PASS if queued to the peer, else SK_DROP)
        insn(MOV64_K, 0, imm=SK_PASS),              # 19: r0 = SK_PASS
        insn(EXIT),                                 # 20: return SK_PASS: the bytes stay for the process
        insn(MOV64_K, 0, imm=SK_DROP),              # 21: r0 = SK_DROP
        insn(EXIT),                                 # 22: return SK_DROP: free the empty skb
    ]


def parser_program() -> list[bytes]:
    """A stream parser that makes every skb one message (only for kernels that need a
    parser beside the verdict; 6.18 does not)."""
    return [
        insn(LDX_W, 0, 1, SKB_LEN),                 # 0: r0 = skb->len
        insn(EXIT),                                 # 1: return r0
    ]


# --- the syscall -----------------------------------------------------------------------
class BPFError(OSError):
    pass


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    ret = _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), buf, ctypes.c_uint(128))
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
    return ret


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    # u32 map_type, key_size, value_size, max_entries, map_flags
    return _bpf(BPF_MAP_CREATE, struct.pack("<5I", map_type, key_size, value_size, max_entries, 0))


def prog_load(program: list[bytes], prog_type: int = BPF_PROG_TYPE_SK_SKB) -> int:
    """Load a program; on failure the verifier's log is in the exception's message."""
    code = ctypes.create_string_buffer(encode(program))
    license_ = ctypes.create_string_buffer(b"GPL")  # the sockmap helpers are GPL-only
    log = ctypes.create_string_buffer(1 << 16)
    # u32 prog_type, insn_cnt; u64 insns, license; u32 log_level, log_size; u64 log_buf
    attr = struct.pack("<IIQQIIQ", prog_type, len(encode(program)) // 8,
                       ctypes.addressof(code), ctypes.addressof(license_), 1, len(log), ctypes.addressof(log))
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BPFError as exc:
        raise BPFError(exc.errno, f"BPF_PROG_LOAD: {exc.strerror}; verifier log:\n"
                                  f"{log.value.decode(errors='replace')}") from None


def prog_attach(prog_fd: int, map_fd: int, attach_type: int) -> None:
    # u32 target_fd, attach_bpf_fd, attach_type, attach_flags
    _bpf(BPF_PROG_ATTACH, struct.pack("<4I", map_fd, prog_fd, attach_type, 0))


def _elem(cmd: int, map_fd: int, key: bytes, value: ctypes.Array | None, flags: int = 0) -> None:
    k = ctypes.create_string_buffer(key)
    # u32 map_fd, pad; u64 key, value; u64 flags
    _bpf(cmd, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(k),
                          ctypes.addressof(value) if value is not None else 0, flags))


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    _elem(BPF_MAP_UPDATE_ELEM, map_fd, key, ctypes.create_string_buffer(value), BPF_ANY)


def map_lookup(map_fd: int, key: bytes, size: int) -> bytes | None:
    out = ctypes.create_string_buffer(size)
    try:
        _elem(BPF_MAP_LOOKUP_ELEM, map_fd, key, out)
    except BPFError as exc:
        if exc.errno == 2:  # ENOENT
            return None
        raise
    return out.raw


def map_delete(map_fd: int, key: bytes) -> None:
    try:
        _elem(BPF_MAP_DELETE_ELEM, map_fd, key, None)
    except BPFError as exc:
        if exc.errno != 2:
            raise


class SockmapRelayKernel:
    """The relay's BPF objects: ``peers``, ``sockmap`` and the attached verdict program.

    ``pairs`` is the most relayed connections at once (two sockmap slots each)."""

    def __init__(self, pairs: int = 1024, with_parser: bool = False) -> None:
        self.slots = 2 * pairs
        self.peers = map_create(BPF_MAP_TYPE_HASH, COOKIE.size, PEER.size, self.slots)
        self.sockmap = map_create(BPF_MAP_TYPE_SOCKMAP, SLOT.size, 4, self.slots)
        self.verdict = prog_load(verdict_program(self.peers, self.sockmap))
        if with_parser:
            self.parser = prog_load(parser_program())
            prog_attach(self.parser, self.sockmap, BPF_SK_SKB_STREAM_PARSER)
        prog_attach(self.verdict, self.sockmap, BPF_SK_SKB_STREAM_VERDICT)
        self._free = list(range(pairs - 1, -1, -1))

    def insert(self, a_fd: int, a_cookie: int, b_fd: int, b_cookie: int) -> int:
        """Join two established TCP sockets: from now on each one's bytes go out of the other.
        Returns the pair's number (for :meth:`remove`)."""
        pair = self._free.pop()
        map_update(self.peers, COOKIE.pack(a_cookie), PEER.pack(2 * pair + 1, 0, 0))
        map_update(self.peers, COOKIE.pack(b_cookie), PEER.pack(2 * pair, 0, 0))
        map_update(self.sockmap, SLOT.pack(2 * pair), SLOT.pack(a_fd))
        map_update(self.sockmap, SLOT.pack(2 * pair + 1), SLOT.pack(b_fd))
        return pair

    def received(self, cookie: int) -> int:
        """Bytes the program has redirected from this socket to its peer so far."""
        value = map_lookup(self.peers, COOKIE.pack(cookie), PEER.size)
        return PEER.unpack(value)[2] if value else 0

    def remove(self, pair: int, a_cookie: int, b_cookie: int) -> None:
        """Forget a pair (closing a socket also takes it out of the sockmap)."""
        for slot in (2 * pair, 2 * pair + 1):
            map_delete(self.sockmap, SLOT.pack(slot))
        for cookie in (a_cookie, b_cookie):
            map_delete(self.peers, COOKIE.pack(cookie))
        self._free.append(pair)
