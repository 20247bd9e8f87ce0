#!/usr/bin/env bash
# Set up portproxy on a fresh Debian 12 machine (as root) and run the demo.
#   system packages: iproute2, nftables + libnftables1 (the kernel path), conntrack, prometheus (its
#   promtool and server are used by the metrics tests), and what `portproxy bench` drives: iperf3,
#   sockperf, wrk, nginx, HAProxy and socat (docker-proxy is fetched by the bench with dpkg -x)
#   .venv/ at the repository root with portproxy installed editable (.venv/bin/portproxy), with the
#   test and bench (matplotlib) extras
# Pass --no-demo to only install.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
if command -v apt-get >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        python3 python3-venv python3-pip iproute2 nftables libnftables1 conntrack iperf3 prometheus curl \
        sockperf wrk nginx-light haproxy socat \
        >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
if [ "${1:-}" != "--no-demo" ]; then
    .venv/bin/portproxy demo
fi
