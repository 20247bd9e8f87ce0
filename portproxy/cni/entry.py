"""The ``portproxy-cni`` executable: VERSION answered before anything else is imported.

Runtimes probe VERSION whenever they load a network (podman: on every ``podman run``), so
that answer costs only the interpreter's start; every other command (and a VERSION whose
stdin is not a JSON object, which gets the full error handling) goes to :mod:`.main`.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    if os.environ.get("CNI_COMMAND") == "VERSION":
        stdin = sys.stdin.buffer.read()
        try:
            request = json.loads(stdin) if stdin.strip() else {}
        except ValueError:
            request = None
        if isinstance(request, dict):
            from .versions import version_json

            requested = request.get("cniVersion")
            json.dump(version_json(requested if isinstance(requested, str) else None), sys.stdout)
            sys.stdout.flush()
            sys.exit(0)
        from .main import run

        sys.exit(run(os.environ, stdin, sys.stdout))
    from .main import main as full

    full()


if __name__ == "__main__":
    main()
