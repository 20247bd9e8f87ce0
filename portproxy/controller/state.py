"""Durable state: the mappings the daemon runs, written atomically before a change is acknowledged.

temp file in the same directory → fsync → rename over the old file → fsync the
directory. A crash at any point leaves either the old or the new state, never a
torn file. A state file that cannot be read is never overwritten: the daemon refuses
to start with one line naming it, so nothing an operator added is lost to a bad moment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import BadInput, SystemFailure, shorten
from ..spec import Mapping
from .config import Settings, parse_mapping_entry

STATE_FILE = "state.json"
VERSION = 2


class StateError(SystemFailure):
    """The state file is unreadable; the message is one line."""


@dataclasses.dataclass(frozen=True)
class SavedEntry:
    """One mapping as the state file keeps it. ``origin`` (who asked for it: "config", "api",
    "cni") is written and read under the key "source" (the file's format)."""
    mapping: Mapping
    settings: Settings
    origin: str
    owner: dict[str, str] | None = None
    kernel_id: int | None = None


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> list[SavedEntry]:
        """Saved mappings (none when there is no state yet); StateError for anything unreadable."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:
            raise StateError(f"{self.path}: cannot read state: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("mappings", []), list):
            raise StateError(f"{self.path}: not a portproxy state file (expected an object with 'mappings')")
        if not isinstance(raw.get("version", 1), int) or raw.get("version", 1) > VERSION:
            raise StateError(f"{self.path}: state version {shorten(raw.get('version'))} is newer than this "
                             f"portproxy understands ({VERSION})")
        result = []
        seen: set[Mapping] = set()
        for i, item in enumerate(raw.get("mappings", [])):
            where = f"{self.path}: entry #{i + 1}"
            if not isinstance(item, dict) or not isinstance(item.get("options", {}), dict):
                raise StateError(f"{where}: not an object with an 'options' object")
            body = {"spec": item.get("spec"), "mode": item.get("mode", "userland"), **item.get("options", {})}
            try:
                mapping, settings = parse_mapping_entry(body, where)
            except BadInput as exc:
                raise StateError(str(exc)) from None
            if mapping in seen:
                raise StateError(f"{where}: {mapping} is saved twice")
            seen.add(mapping)
            kernel_id = item.get("id")
            origin = item.get("source", "api")
            # Entries of the config file (older state files kept them) come from the file
            # again; anything else is kept as the operator's, whatever it says it is.
            origin = origin if origin in ("config", "api", "cni") else "api"
            result.append(SavedEntry(mapping, settings, origin, _owner(item.get("owner")),
                                     kernel_id if isinstance(kernel_id, int) else None))
        return result

    def save(self, entries: list[SavedEntry]) -> None:
        """Replace the state with ``entries``; OSError (and the old state intact) when the disk refuses."""
        self.directory.mkdir(parents=True, exist_ok=True)
        items: list[dict[str, Any]] = []
        for e in sorted(entries, key=lambda e: e.mapping.sort_key()):
            item: dict[str, Any] = {"spec": str(e.mapping), "mode": e.settings.mode, "source": e.origin}
            if e.settings.overrides:
                item["options"] = dict(e.settings.overrides)
            if e.owner:
                item["owner"] = e.owner
            if e.kernel_id:
                item["id"] = e.kernel_id
            items.append(item)
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"version": VERSION, "mappings": items}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)  # a refused write leaves nothing behind
            except OSError:
                pass
            raise
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _owner(raw: Any) -> dict[str, str] | None:
    if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        return {str(k): v for k, v in raw.items()}
    return None
