"""The kernel path: mappings as nftables DNAT in portproxy's own ``inet portproxy`` table.

:mod:`.builders` turns mappings into libnftables JSON (pure, testable without root),
:mod:`.executor` applies a batch atomically, :mod:`.path` keeps the bookkeeping, and
:mod:`.conntrack`, :mod:`.hairpin`, :mod:`.sysctls` handle what the rules depend on.

Nothing is imported here: the CNI plugin, which starts for every container, imports
only the builders and the executor, not the path's bookkeeping (and its logging).
"""
