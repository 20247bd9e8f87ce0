"""Durable state: the mappings the daemon runs, written atomically before a change is acknowledged.

temp file in the same directory → fsync → rename over the old file → fsync the
directory. A crash at any point leaves either the old or the new state, never a
torn file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..spec import Mapping, SpecError, parse_spec
from .config import MODES, Mode

STATE_FILE = "state.json"


class StateError(Exception):
    """The state file is unreadable; the message is one line."""


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> dict[Mapping, tuple[Mode, str]] | None:
        """Saved mappings with (mode, source), or None when there is no state yet."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{self.path}: cannot read state: {exc}") from None
        result: dict[Mapping, tuple[Mode, str]] = {}
        for entry in raw.get("mappings", []):
            try:
                mapping = parse_spec(entry["spec"])
            except (SpecError, KeyError, TypeError) as exc:
                raise StateError(f"{self.path}: bad entry {entry!r}: {exc}") from None
            mode = entry.get("mode", "userland")
            if mode not in MODES:
                raise StateError(f"{self.path}: bad mode in {entry!r}")
            result[mapping] = (mode, entry.get("source", "api"))
        return result

    def save(self, mappings: dict[Mapping, tuple[Mode, str]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {"version": 1, "mappings": [
            {"spec": str(m), "mode": mode, "source": source} for m, (mode, source) in sorted(mappings.items())
        ]}
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
