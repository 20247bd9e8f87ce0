"""Namespace helpers only the tests use, on top of portproxy.lab's topology."""

from __future__ import annotations

from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology, plug_container
from portproxy.offloop import off_loop


@off_loop
def add_container(topo: DemoTopology, name_prefix: str, ip: str, ip6: str, port: str) -> Namespace:
    """Plug one more container into ``topo``'s bridge (for hairpin and multi-target cases);
    it is removed with the rest of the topology."""
    ns = Namespace.create(name_prefix)
    topo.extra.append(ns)
    plug_container(topo, ns, ip, ip6, port)
    return ns


def read_sysctl(ns: Namespace, key: str) -> str:
    """/proc/sys/<key> as ``ns`` sees it."""

    def read() -> str:
        with open(f"/proc/sys/{key}") as f:
            return f.read().strip()

    return ns.run(read)
