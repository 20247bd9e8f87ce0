"""nftables as the tests read it: through libnftables' JSON API or the nft program, inside a namespace."""

from __future__ import annotations

import json
import subprocess


def nft_json(ns, *command: str) -> dict:
    import nftables

    def run() -> dict:
        ctx = nftables.Nftables()
        ctx.set_json_output(True)
        rc, out, err = ctx.cmd(" ".join(command))
        assert rc == 0, err
        return json.loads(out) if out else {}

    return ns.run(run)


def tables(ns) -> list[tuple[str, str]]:
    return [(i["table"]["family"], i["table"]["name"]) for i in nft_json(ns, "list tables")["nftables"] if "table" in i]


def nft(topo, *args: str) -> subprocess.CompletedProcess:
    return topo.host.run(lambda: subprocess.run(["nft", *args], capture_output=True, text=True, timeout=20))


def _table_elements(topo) -> dict[str, list[str]]:
    """Keys of every map and set of the table, sorted (ids and counters left out: a restart
    may number the mappings differently)."""
    out = nft_json(topo.host, "list table inet portproxy")
    result = {}
    for item in out["nftables"]:
        container = item.get("map") or item.get("set")
        if container:
            keys = []
            for elem in container.get("elem", []):
                key = elem[0] if isinstance(elem, list) else elem
                if isinstance(key, dict) and "elem" in key:
                    key = key["elem"]["val"]
                keys.append(json.dumps(key) if not container["name"].startswith("to_") else "mark")
            result[container["name"]] = sorted(keys)
    return result
