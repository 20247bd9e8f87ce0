"""The kernel path: mappings as nftables DNAT in portproxy's own ``inet portproxy`` table.

:mod:`.builders` turns mappings into libnftables JSON (pure, testable without root),
:mod:`.executor` applies a batch atomically, :mod:`.path` keeps the bookkeeping, and
:mod:`.conntrack`, :mod:`.hairpin`, :mod:`.sysctls` handle what the rules depend on.
"""

from .builders import KernelMappingError, KernelOptions
from .executor import NftError
from .path import KernelCounters, KernelPath

__all__ = ["KernelCounters", "KernelMappingError", "KernelOptions", "KernelPath", "NftError"]
