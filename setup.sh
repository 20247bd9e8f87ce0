#!/usr/bin/env bash
# Set up portproxy from a clone on Debian 12 (as root), then run the demo.
#
# Installs with apt only what portproxy needs to run, and the demo (RUNTIME_PACKAGES), and
# curl and debootstrap for the tests (TEST_PACKAGES; the Debian package is built and tested
# inside a throw-away root, so its build tools never land on this host). None of them starts
# or enables a service (tests/system/test_packaging.py checks it). The programs the tests and `portproxy bench` drive —
# nginx, HAProxy, Prometheus, iperf3, sockperf, wrk, socat, docker-proxy — are NOT installed:
# installing nginx or prometheus on a systemd host starts a web server on port 80 and a
# Prometheus on 9090. They are unpacked from their Debian packages (apt-get download +
# dpkg -x: no maintainer script runs, dpkg does not know them) into
# /var/cache/portproxy-test/unpacked by `python -m portproxy.debcache` (portproxy/debcache.py)
# and `python -m tests.support.programs` (the programs only the tests run).
# .venv/ at the repository root gets portproxy installed editable, with the test and bench extras.
#
#   --no-demo        install, do not run the demo
#   --packages-only  only the apt part (tests/system/test_packaging.py runs it in a throw-away root)
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive

RUNTIME_PACKAGES=(python3 python3-venv iproute2 nftables libnftables1 conntrack)
TEST_PACKAGES=(curl debootstrap)

if command -v apt-get >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}" >/dev/null
fi
[ "${1:-}" = "--packages-only" ] && exit 0

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
.venv/bin/python -m portproxy.debcache >/dev/null   # the benchmark's programs, unpacked
.venv/bin/python -m tests.support.programs >/dev/null   # and the tests' (dockerd, podman, CNI plugins, ...)
if [ "${1:-}" != "--no-demo" ]; then
    .venv/bin/portproxy demo
fi
