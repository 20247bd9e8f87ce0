"""portproxy: port mapping for Linux containers, in userland (splice) or in the kernel (nftables)."""

__version__ = "0.1.0"
