"""The controller daemon (``portproxy serve``): all mappings in one process, a control API,
live switching between the userland and kernel paths, persistence."""

from .config import Config, ConfigError, DaemonOptions, load_config, parse_config
from .core import Controller

__all__ = ["Config", "ConfigError", "Controller", "DaemonOptions", "load_config", "parse_config"]
