"""``portproxy bench``: both paths, direct routing and peer proxies, measured side by side.

The rooms, in the order a run uses them:

* ``topology``  — the namespaces (client → host with the bridge → container), their
  sysctls, and the conntrack reset between runs;
* ``servers``   — what runs in the container: iperf3, sockperf, nginx, an idle sink;
* ``paths``     — the ways from the client to those servers: direct routing, the
  kernel path, portproxy's userland variants, docker-proxy, HAProxy, socat;
* ``tools``     — the field's load generators (iperf3, sockperf, wrk) and their output;
* ``workloads`` — one measurement each, run round by round over every path;
* ``checks``    — a figure from what happened, or the reason it did not (never a zero);
* ``memory``    — RSS with many mappings and per idle connection;
* ``report``    — JSON, Markdown with medians and ratios, the chart;
* ``run``       — the command itself.
"""
