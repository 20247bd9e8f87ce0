"""Reading a metrics endpoint from inside a namespace."""

from __future__ import annotations

import re


def http_get(ns, port: int, path: str, host: str = "127.0.0.1") -> str:
    def fetch() -> str:
        import http.client

        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        conn.close()
        return body

    return ns.run(fetch)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one series of ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{"): line.rindex("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


METRICS_PORT = 9779
"""Where ``--metrics-addr`` without a value serves."""


def scrape(ns) -> str:
    """The /metrics page of a process serving on the default metrics address in ``ns``."""
    return http_get(ns, METRICS_PORT, "/metrics")
