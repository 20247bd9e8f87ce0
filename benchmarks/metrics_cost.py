"""What metrics cost the data plane: single-stream throughput with metrics served and
scraped every second vs without metrics, rounds alternated.

    .venv/bin/python benchmarks/metrics_cost.py [--seconds 5] [--rounds 5]

Per-chunk byte counting is a plain integer add that both runs do (it is how the
data plane keeps counts); what differs is the exposition thread and the scrapes.
Writes benchmarks/results/metrics_cost.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from portproxy.bench.paths import portproxy_starter  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with harness.topology() as topo:
        running = [portproxy_starter()(topo, [(9002, harness.IPERF_PORT, "tcp")]),
                   portproxy_starter("--metrics-addr", "127.0.0.1:9779")(topo, [(9003, harness.IPERF_PORT, "tcp")])]
        stop = threading.Event()
        scrapes = [0]

        def scraper() -> None:
            def one() -> None:
                with urllib.request.urlopen("http://127.0.0.1:9779/metrics", timeout=5) as response:
                    response.read()

            while not stop.is_set():
                topo.host.run(one)
                scrapes[0] += 1
                stop.wait(1.0)

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        results: dict[str, list[float]] = {"metrics off": [], "metrics on, scraped every 1 s": []}
        try:
            with harness.container_servers(topo):
                for rnd in range(args.rounds):
                    for label, port in zip(results, (9002, 9003)):
                        value = harness.gbits(harness.iperf(topo.client, topo.host_ip, port, args.seconds))
                        results[label].append(value)
                        print(f"round {rnd + 1}/{args.rounds} {label:<30} {value:6.2f} Gbit/s", file=sys.stderr)
        finally:
            stop.set()
            thread.join(timeout=10)
            for r in running:
                r.stop()
    summary = {label: harness.summarize(values) for label, values in results.items()}
    harness.write_result("metrics_cost", {"seconds": args.seconds, "scrapes": scrapes[0], "gbit_per_s": summary})
    harness.print_ratio_table("userland splice, 1 stream", summary, "metrics off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
