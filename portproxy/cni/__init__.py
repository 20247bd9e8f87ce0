"""``portproxy-cni``: a chained CNI plugin that publishes container ports, in place of ``portmap``.

- :mod:`.protocol` is the CNI contract (environment, stdin config, prevResult, results
  and errors), pure and testable without root;
- :mod:`.conditions` turns portmap's ``conditionsV4/V6`` into match tuples, or refuses them;
- :mod:`.table` keeps the mappings in the kernel, in the ``inet portproxy_cni`` table
  built by :mod:`portproxy.kernel.builders`; the plugin is a short-lived process, so all
  its bookkeeping (who owns which element) lives in that table;
- :mod:`.main` is the command-line entry point: one CNI command per process.

Importing this package must stay cheap: a runtime runs the plugin for every container
start and stop, so nothing here imports asyncio, aiohttp or prometheus.
"""
