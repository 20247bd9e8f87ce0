"""DELs a stopped daemon missed: the word the plugin leaves for it.

With a daemon, a container's mappings live in the daemon's saved state. While the daemon
is stopped (its socket gone) or crashed (its socket dead), a runtime's DEL cannot reach
it, and the mappings would come back with it: DNAT towards an address the runtime may
have given to another container since, and the host port refused to whoever asks next.

So a daemon holding CNI mappings keeps a small table, ``inet portproxy_cni_departures``,
with one set; a DEL that no daemon answers records there the attachment's owner token
(:meth:`~portproxy.cni.protocol.Owner.token`, as an element comment under a random key),
and the daemon, when it starts, drops those owners' saved mappings before installing
anything, then deletes the words it read. The word is about the saved mappings only: an
ADD of the same attachment made later, while the daemon is still away (``podman network
reload`` is DEL then ADD), went into the plugin's table, which the daemon adopts after
dropping the old ones. Where no daemon ever held CNI mappings the table does not exist
and the plugin records nothing, so nothing grows.

A table of its own: the plugin's ``inet portproxy_cni`` is created and deleted with its
mappings, and the daemon's ``inet portproxy`` is rewritten whole at every start. The daemon
creates it (a transaction of its own, after the change that gave it its first CNI mapping;
a failure is logged) and removes it once it holds none. A random 32-bit key per word: two
DELs drawing the same key would keep one word (nft's ``add`` leaves an element as it is),
which at a handful of words is negligible.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from ..kernel.builders import FAMILY, Json, batch
from ..kernel.executor import Nft, NftError

TABLE = "portproxy_cni_departures"
SET = "owners"


# --- commands (pure) ---------------------------------------------------------------------------

def _set() -> Json:
    return {"family": FAMILY, "table": TABLE, "name": SET}


def create_commands() -> list[Json]:
    """The table and its set; adding them again is harmless (nft's ``add`` is idempotent)."""
    return [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"add": {"set": {**_set(), "type": "mark"}}}]


def record_commands(key: int, token: str) -> list[Json]:
    return [{"add": {"element": {**_set(), "elem": [{"elem": {"val": key, "comment": token}}]}}}]


def forget_commands(keys: Iterable[int]) -> list[Json]:
    keys = sorted(keys)
    return [{"delete": {"element": {**_set(), "elem": keys}}}] if keys else []


def parse(listing: dict) -> dict[int, str]:
    """key → owner token, from ``nft -j list set`` output."""
    words: dict[int, str] = {}
    for item in listing.get("nftables", []):
        for elem in (item.get("set") or {}).get("elem", []):
            if isinstance(elem, dict) and "comment" in elem.get("elem", {}):
                words[elem["elem"]["val"]] = elem["elem"]["comment"]
    return words


# --- against the kernel ----------------------------------------------------------------------------

def read(nft: Nft) -> dict[int, str] | None:
    """The recorded departures; None when there is no table (no daemon expects any)."""
    try:
        return parse(nft.query(batch([{"list": {"set": _set()}}])))
    except NftError:
        return None


def record(nft: Nft, token: str) -> bool:
    """Leave word that ``token``'s attachment is gone; False when no daemon expects it."""
    if read(nft) is None:
        return False
    nft.apply(record_commands(int.from_bytes(os.urandom(4), "little"), token))
    return True


def settle(nft: Nft, consumed: Iterable[int], expect: bool) -> None:
    """The daemon, after its start: delete the words it acted on, and keep the table while
    it holds CNI mappings (``expect``), else remove it once empty."""
    commands: list[Any] = forget_commands(consumed)
    if expect:
        commands = create_commands() + commands
    if commands:
        nft.apply(commands)
    if not expect and read(nft) == {}:
        nft.apply([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
