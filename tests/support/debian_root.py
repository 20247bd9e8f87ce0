"""Debian roots for the tests: ``debootstrap --variant=minbase`` of a suite, made once and kept.

One mechanism for every root the tests boot or chroot into (bookworm today, other suites
next): the root of a suite with a given set of extra packages is debootstrapped once, under
a lock (parallel test runs may want it too), and kept as a tarball in
/var/cache/portproxy-test (``$PORTPROXY_TEST_CACHE``); each test unpacks its own copy.

The archive is the machine's own, as apt finds it: the first source in /etc/apt/sources.list
and /etc/apt/sources.list.d (``*.list``, and deb822 ``*.sources``) whose ``deb`` entry serves
the ``main`` component of the Debian archive. A source is the Debian archive when the Release
file apt fetched for it says ``Label: Debian`` (not Debian-Security: that archive has no base
suites); before apt has fetched one, when it is signed by Debian's archive keyring and
serves a base suite (not ``-security`` or ``-updates``). No
archive address is written in the project: a machine behind a mirror or a snapshot uses it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pytest

CACHE = Path(os.environ.get("PORTPROXY_TEST_CACHE", "/var/cache/portproxy-test"))
ETC_APT = Path("/etc/apt")
APT_LISTS = Path("/var/lib/apt/lists")
DEBIAN_KEYRING = "debian-archive-keyring"
SCHEMES = ("http://", "https://", "ftp://", "file:")  # what debootstrap can fetch from


@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of apt's sources, in either format."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""
    enabled: bool = True


def parse_one_line(text: str) -> list[Source]:
    """``deb [opt=val ...] URI SUITE [COMPONENT...]`` lines (sources.list(5), one-line style)."""
    sources = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        options: dict[str, str] = {}
        match = re.match(r"(\S+)\s+\[([^\]]*)\]\s*(.*)", line)
        if match:
            kind, opts, rest = match.groups()
            options = dict(o.split("=", 1) for o in opts.split() if "=" in o)
            words = [kind, *rest.split()]
        else:
            words = line.split()
        if len(words) < 3:
            continue
        sources.append(Source(types=(words[0],), uris=(words[1],), suites=(words[2],),
                              components=tuple(words[3:]), signed_by=options.get("signed-by", "")))
    return sources


def parse_deb822(text: str) -> list[Source]:
    """Stanzas of ``Types:``/``URIs:``/``Suites:``/``Components:`` (sources.list(5), deb822 style)."""
    sources = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key is not None:  # a continuation line (e.g. an inline key)
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if not {"types", "uris", "suites"} <= fields.keys():
            continue
        sources.append(Source(types=tuple(fields["types"].split()), uris=tuple(fields["uris"].split()),
                              suites=tuple(fields["suites"].split()),
                              components=tuple(fields.get("components", "").split()),
                              signed_by=fields.get("signed-by", ""),
                              enabled=fields.get("enabled", "yes").lower() not in ("no", "false", "0")))
    return sources


def read_sources(etc_apt: Path = ETC_APT) -> list[Source]:
    """The machine's sources in apt's order: sources.list, then sources.list.d by name."""
    files = [etc_apt / "sources.list"]
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    sources: list[Source] = []
    for path in files:
        if path.is_file():
            text = path.read_text(errors="replace")
            sources += parse_deb822(text) if path.suffix == ".sources" else parse_one_line(text)
    return sources


def release_file_name(uri: str, suite: str) -> str:
    """The name apt gives the Release file of ``uri`` ``suite`` in its lists directory
    (apt-pkg's URItoFileName: no scheme, no credentials, special characters quoted, / as _)."""
    rest = re.sub(r"^[a-z0-9+.-]+:(//)?", "", uri.rstrip("/"))
    rest = re.sub(r"^[^/@]*@", "", rest)
    rest += f"/dists/{suite}/"
    quoted = "".join(f"%{ord(c):02x}" if c in "\\|{}[]<>\"^~_=!@#$%^&*" else c for c in rest)
    return quoted.replace("/", "_")


def release_label(uri: str, suite: str, lists: Path = APT_LISTS) -> str | None:
    """``Label:`` of the Release file apt fetched for ``uri`` ``suite``; None if it has none."""
    for name in ("InRelease", "Release"):
        path = lists / (release_file_name(uri, suite) + name)
        if path.is_file():
            match = re.search(r"(?m)^Label:\s*(.+)$", path.read_text(errors="replace"))
            return match.group(1).strip() if match else ""
    return None


def debian_mirror(sources: Iterable[Source], label_of: Callable[[str, str], str | None]) -> str | None:
    """The first URI serving the Debian archive's ``main`` (see the module's docstring)."""
    for source in sources:
        if not source.enabled or "deb" not in source.types or "main" not in source.components:
            continue
        for uri in source.uris:
            if not uri.startswith(SCHEMES):
                continue
            labels = [label_of(uri, suite) for suite in source.suites]
            unknown = all(label is None for label in labels)
            base_suite = any("-" not in suite for suite in source.suites)  # not -security, -updates
            if "Debian" in labels or (unknown and base_suite and DEBIAN_KEYRING in source.signed_by):
                return uri
    return None


def host_mirror() -> str:
    """The machine's Debian archive, or the test skipped with one line saying why."""
    mirror = debian_mirror(read_sources(), release_label)
    if mirror is None:
        pytest.skip(f"no Debian archive serving 'main' in {ETC_APT}/sources.list or {ETC_APT}/sources.list.d "
                    "(a deb entry apt knows as Label: Debian, or signed by debian-archive-keyring)")
    return mirror


def tarball(suite: str, include: Sequence[str] = ()) -> Path:
    """``suite``'s minbase root with ``include`` (and their dependencies) installed, as a tarball:
    debootstrapped on first use (about a minute; needs root and debootstrap), then reused."""
    packages = sorted(set(include))
    tag = "" if not packages else "-" + hashlib.sha256(",".join(packages).encode()).hexdigest()[:12]
    path = CACHE / f"{suite}-minbase{tag}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            pytest.skip("a Debian root needs root and debootstrap (setup.sh installs debootstrap)")
        mirror = host_mirror()
        scratch = CACHE / f"{path.stem}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        argv = ["debootstrap", "--variant=minbase", *([f"--include={','.join(packages)}"] if packages else []),
                suite, str(scratch), mirror]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
            if result.returncode != 0:
                pytest.fail(f"debootstrap {suite} from {mirror} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
            subprocess.run(["tar", "-C", str(scratch), "-cf", f"{path}.tmp", "."], check=True)
            os.rename(f"{path}.tmp", path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return path


def package_depends(control: str) -> list[str]:
    """The binary package's Depends in a debian/control text (substitution variables left out)."""
    binary = control.split("\nPackage:", 1)[1]
    depends = re.search(r"(?ms)^Depends:(.*?)^\S", binary + "\nEnd:").group(1)
    return [d.split()[0] for d in depends.replace("\n", " ").split(",") if d.strip() and "${" not in d]


def unpack(tar: Path, dest: Path) -> Path:
    """A private copy of a cached root at ``dest`` (created), for one test or module to change."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(dest), "-xf", str(tar)], check=True)
    return dest
