"""Prometheus metrics for both paths, read at scrape time from plain counters.

:mod:`.snapshot` describes what a scrape sees, :mod:`.collector` turns it into metric
families, :mod:`.server` serves the exposition from its own thread (never on the
data-plane loop: reading kernel counters blocks on libnftables).
"""

from .collector import MappingCollector
from .server import DEFAULT_METRICS_ADDR, parse_metrics_addr, start_metrics_server
from .snapshot import MappingSnapshot

__all__ = ["DEFAULT_METRICS_ADDR", "MappingCollector", "MappingSnapshot", "parse_metrics_addr", "start_metrics_server"]
