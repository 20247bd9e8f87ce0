"""Single-stream throughput with and without a PROXY protocol header (the target:
PROXY v2 at >= 0.9x the default userland path).

iperf3 cannot read a PROXY header, so the stream is an HTTP download from nginx in the
container: one listener plain, one ``listen ... proxy_protocol``, both serving the same
1 GiB file (sparse, from the temp directory) with sendfile. The client runs curl in the
client namespace through ``portproxy map`` (splice), with and without --proxy-protocol v2
(and --source client, transparent mode, for comparison), rounds alternating.

    .venv/bin/python benchmarks/proxy_protocol_stream.py [--rounds 5] [--out benchmarks/results/client-address]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from portproxy import debcache
from portproxy.bench.servers import nginx_conf
from portproxy.lab.topology import demo_topology

SIZE = 1 << 30
NGINX = """\
    access_log off;
    sendfile on;
    server {{
        listen 8080;
        listen 8081 proxy_protocol;
        root {root};
    }}"""
PATHS = {
    "userland (default)": ["9090:172.16.1.1:8080"],
    "PROXY v2": ["9090:172.16.1.1:8081", "--proxy-protocol", "v2"],
    "transparent": ["9090:172.16.1.1:8080", "--source", "client"],
}


def download(topo) -> float:
    """Gbit/s of one 1 GiB download through the host's port 9090, from the client."""
    out = topo.client.popen(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                             f"http://{topo.host_ip}:9090/big"], stdout=subprocess.PIPE, text=True)
    size, seconds = out.communicate(timeout=300)[0].split()
    assert int(size) == SIZE, size
    return int(size) * 8 / float(seconds) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/client-address"))
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in PATHS}
    with demo_topology("ppstream") as topo, tempfile.TemporaryDirectory(prefix="portproxy-stream-") as tmp:
        with open(Path(tmp) / "big", "wb") as f:
            f.truncate(SIZE)
        os.chmod(tmp, 0o755)  # nginx's workers are not root
        os.chmod(Path(tmp) / "big", 0o644)
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(nginx_conf(tmp, NGINX.format(root=tmp)))
        nginx = topo.container.popen([*debcache.command("nginx"), "-c", str(conf), "-p", tmp, "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            for round_ in range(args.rounds):
                for name, spec in PATHS.items():
                    proxy = topo.host.popen([sys.executable, "-m", "portproxy", "map", *spec, "--log-level", "error"],
                                            stdout=subprocess.PIPE, text=True)
                    assert proxy.stdout is not None and proxy.stdout.readline().startswith("ready")
                    try:
                        results[name].append(download(topo))
                    finally:
                        proxy.terminate()
                        proxy.wait(timeout=20)
                print(f"round {round_ + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in results.items()),
                      file=sys.stderr)
        finally:
            nginx.terminate()
            nginx.wait(timeout=20)
    base = statistics.median(results["userland (default)"])
    lines = ["| path | Gbit/s median (min-max) | x default |", "|---|---|---|"]
    for name, values in results.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | "
                     f"{statistics.median(values) / base:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream.json").write_text(json.dumps(results, indent=1))
    (args.out / "stream.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
