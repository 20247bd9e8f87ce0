"""The ways operators install portproxy, each tested against the real installer.

* ``setup.sh``'s apt part, run in a throw-away Debian 12 root whose ``policy-rc.d`` logs and
  refuses every service action a maintainer script asks for: it must ask for none, and
  enable nothing.
* The Debian package: built with ``packaging/build-deb.sh`` (lintian included), installed
  with apt into that root, ``portproxy demo`` and a daemon smoke test run from the
  installed files (on Debian's own python3-uvloop, -pyroute2, -prometheus-client,
  -nftables, -aiohttp), then purged: nothing of it may be left.
* The Python way: ``python -m build`` gives an sdist and a wheel ``twine check`` accepts;
  the wheel in a fresh venv runs the demo.

Why a throw-away root and not this machine: installing the package here would replace a
developer's /usr/bin/portproxy, and a failed purge would leave it behind; on a machine where
every package is already installed, apt would also attempt nothing a test could observe.
The root is a ``debootstrap --variant=minbase`` of bookworm from the machine's own Debian
archive, made once and kept as a tarball (tests/support/debian_root.py: about a minute; then
seconds). Each command runs chrooted in
mount and PID namespaces of its own (``unshare``): /proc, /sys, /dev and a fresh /run are
mounted there and vanish with every process started, even when a test fails. The host's
own /usr/sbin/policy-rc.d is never touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from portproxy import debcache
from tests.support import debian_root as roots
from tests.support import programs as test_programs
from tests.support.programs import setup_sh_packages
from tests.support.systemd_boot import BootedSystemd, cgroup_layout
from portproxy.lab.namespaces import Namespace

ROOT = Path(__file__).resolve().parents[2]
CACHE = roots.CACHE
APT_ARCHIVES = CACHE / "apt-archives"  # the root's downloaded .debs, kept across runs
SERVICE_LOG = "var/log/policy-rc.d.log"

POLICY_RC_D = f"""#!/bin/sh
# tests/system/test_packaging.py, in a throw-away root: log each service action asked for, refuse it.
echo "$*" >> /{SERVICE_LOG}
exit 101
"""

needs_root_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("debootstrap", "unshare", "chroot")),
    reason="needs root, debootstrap and unshare (setup.sh installs debootstrap)")


class ThrowawayRoot:
    """A Debian 12 tree to chroot into; every command gets namespaces of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, script: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """Run ``script`` (sh -e) chrooted into the root, as on a systemd host: /run/systemd/system
        exists, so maintainer scripts do try to start services (and policy-rc.d answers)."""
        setup = f"""set -e
R="{self.path}"
mount --bind "$R" "$R"  # the root a mount point of its own, as ip-netns-exec expects of /
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
mkdir -p "$R/run/systemd/system" "$R/run/lock"
mount --bind "{APT_ARCHIVES}" "$R/var/cache/apt/archives"
exec chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \\
    DEBIAN_FRONTEND=noninteractive /bin/sh -ec "$1"
"""
        # APT_ARCHIVES is shared with other test runs' roots, and apt does not wait for its lock.
        with open(CACHE / ".apt-archives.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return subprocess.run(["unshare", "--mount", "--propagation", "private", "--pid", "--kill-child",
                                   "sh", "-c", setup, "sh", script], capture_output=True, text=True, timeout=timeout)

    def check(self, script: str, timeout: float = 900) -> str:
        result = self.run(script, timeout)
        assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        return result.stdout

    def service_actions(self) -> list[str]:
        log = self.path / SERVICE_LOG
        return log.read_text().splitlines() if log.exists() else []

    def enabled_units(self) -> set[str]:
        """Every unit or init script some target or runlevel pulls in."""
        found = {str(p.relative_to(self.path)) for p in (self.path / "etc/systemd/system").glob("*.wants/*")}
        return found | {str(p.relative_to(self.path)) for p in self.path.glob("etc/rc[2-5].d/S*")}


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory):
    path = roots.unpack(roots.tarball("bookworm"), tmp_path_factory.mktemp("debian-root"))
    (APT_ARCHIVES / "partial").mkdir(parents=True, exist_ok=True)
    # The host's view of the archive (suites, and settings such as a proxy or a frozen snapshot).
    for sources in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if sources.is_file():
            shutil.copy(sources, path / "etc/apt" / sources.relative_to("/etc/apt"))
    for conf in Path("/etc/apt/apt.conf.d").glob("*"):
        if conf.is_file() and "Acquire::" in conf.read_text(errors="replace"):
            shutil.copy(conf, path / "etc/apt/apt.conf.d" / conf.name)
    # A throw-away root: dpkg need not fsync, man-db need not index the build tools' pages.
    (path / "etc/dpkg/dpkg.cfg.d/unsafe-io").write_text("force-unsafe-io\n")
    policy = path / "usr/sbin/policy-rc.d"
    policy.write_text(POLICY_RC_D)
    policy.chmod(0o755)
    root = ThrowawayRoot(path)
    root.check("apt-get update -qq && echo 'man-db man-db/auto-update boolean false' | debconf-set-selections")
    yield root
    # Nothing is mounted here outside the namespaces that died with each command.
    shutil.rmtree(path, ignore_errors=True)


# --- the roots' archive: the machine's own, read from its apt sources ------------------------
DEB822 = """Types: deb
# a comment inside the stanza
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src deb
URIs: http://mirror.example/other
Suites: nodistro
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 -----END PGP PUBLIC KEY BLOCK-----

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: https://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_sources_in_both_formats_parse() -> None:
    one_line = roots.parse_one_line("# deb http://commented.example/debian bookworm main\n"
                                    "deb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main  # x\n"
                                    "deb-src http://a.example/debian bookworm main\n")
    assert one_line == [roots.Source(("deb",), ("http://a.example/debian",), ("bookworm",), ("main",), "/k.gpg"),
                        roots.Source(("deb-src",), ("http://a.example/debian",), ("bookworm",), ("main",))]
    stanzas = roots.parse_deb822(DEB822)
    assert [s.uris[0] for s in stanzas] == ["http://mirror.example/debian-security", "http://mirror.example/other",
                                            "http://disabled.example/debian", "https://mirror.example/debian/"]
    assert stanzas[1].types == ("deb-src", "deb") and "BEGIN PGP" in stanzas[1].signed_by
    assert not stanzas[2].enabled and stanzas[3].suites == ("bookworm", "bookworm-updates")


def test_the_mirror_is_the_first_debian_archive_serving_main() -> None:
    sources = roots.parse_deb822(DEB822)
    labels = {("http://mirror.example/debian-security", "bookworm-security"): "Debian-Security",
              ("http://mirror.example/other", "nodistro"): "Nodesource",
              ("https://mirror.example/debian/", "bookworm"): "Debian"}
    assert roots.debian_mirror(sources, lambda uri, suite: labels.get((uri, suite))) == "https://mirror.example/debian/"
    # Before apt has fetched any Release file: the first signed by Debian's archive keyring
    # that serves a base suite (the security archive has none).
    assert roots.debian_mirror(sources, lambda uri, suite: None) == "https://mirror.example/debian/"
    ubuntu = roots.parse_one_line("deb http://x.example/ubuntu jammy main")
    assert roots.debian_mirror(ubuntu, lambda uri, suite: "Ubuntu") is None


def test_release_files_are_found_where_apt_keeps_them(tmp_path: Path) -> None:
    assert roots.release_file_name("http://user:pw@deb.example/de_bian/", "bookworm") == \
        "deb.example_de%5fbian_dists_bookworm_"
    (tmp_path / "deb.example_debian_dists_bookworm_InRelease").write_text("Origin: Debian\nLabel: Debian\n")
    assert roots.release_label("http://deb.example/debian", "bookworm", tmp_path) == "Debian"
    assert roots.release_label("http://deb.example/debian", "trixie", tmp_path) is None


# --- setup.sh ---------------------------------------------------------------------------------


@needs_root_tools
def test_setup_sh_starts_and_enables_no_service(debian_root: ThrowawayRoot) -> None:
    shutil.copy(ROOT / "setup.sh", debian_root.path / "tmp/setup.sh")
    enabled = debian_root.enabled_units()
    debian_root.check("bash /tmp/setup.sh --packages-only")
    installed = debian_root.check("dpkg-query -W -f '${Package}\\n'").split()
    assert set(setup_sh_packages()) <= set(installed)
    assert debian_root.service_actions() == []
    assert debian_root.enabled_units() == enabled


@needs_root_tools
def test_the_service_start_detector_sees_a_daemon_package(debian_root: ThrowawayRoot) -> None:
    """The control: a package with a service (cron, small) is caught asking to start it."""
    debian_root.check("apt-get install -y -qq --no-install-recommends cron >/dev/null")
    try:
        assert any("cron" in action and "start" in action for action in debian_root.service_actions())
    finally:
        debian_root.check("apt-get purge -y -qq cron >/dev/null")
        (debian_root.path / SERVICE_LOG).unlink(missing_ok=True)


# --- the test programs: unpacked, not installed ----------------------------------------------


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian)")
@pytest.mark.parametrize("name, args", [("haproxy", ["-v"]), ("iperf3", ["--version"]), ("socat", ["-V"]),
                                        ("nginx", ["-v"]), ("promtool", ["--version"])])
def test_programs_run_from_the_cache_unknown_to_dpkg(name: str, args: list[str]) -> None:
    argv = test_programs.command(name)
    binary = argv[-1]
    assert binary.startswith(str(debcache.cache_dir()))
    assert subprocess.run(["dpkg", "-S", binary], capture_output=True).returncode != 0  # not installed
    result = subprocess.run([*argv, *args], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- the Debian package -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_deb(debian_root: ThrowawayRoot) -> str:
    """The package, built in the root with packaging/build-deb.sh (lintian included).

    Built there, not here: the build tools pull in man-db, whose installation starts
    man-db.service and enables man-db.timer, which setup.sh must not do to a host."""
    src = debian_root.path / "tmp/src"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    debian_root.check("apt-get build-dep -y -qq --no-install-recommends /tmp/src >/dev/null && "
                      "apt-get install -y -qq --no-install-recommends lintian >/dev/null")
    out = debian_root.check("bash /tmp/src/packaging/build-deb.sh /tmp/dist", timeout=600)
    return out.strip().splitlines()[-1]


SMOKE = r"""
ip netns add pp-smoke
trap 'kill $serve $web 2>/dev/null; wait; ip netns delete pp-smoke' EXIT
ip -n pp-smoke link set lo up
in_ns() { ip netns exec pp-smoke "$@"; }
# The daemon as the unit runs it: the shipped config (no mappings), default state and socket.
in_ns portproxy serve --log-level warning > /tmp/serve.out 2>&1 & serve=$!
for i in $(seq 100); do [ -S /run/portproxy/portproxy.sock ] && break; sleep 0.1; done
in_ns portproxy ls
in_ns python3 -m http.server --bind 127.0.0.1 8080 --directory /usr/share/doc/portproxy >/dev/null 2>&1 & web=$!
in_ns portproxy add 127.0.0.1:8081:127.0.0.1:8080
in_ns python3 -c '
import time, urllib.request
for _ in range(50):
    try:
        body = urllib.request.urlopen("http://127.0.0.1:8081/README.Debian", timeout=5).read().decode()
        break
    except OSError:
        time.sleep(0.1)
print("fetched:", body.splitlines()[0])
metrics = urllib.request.urlopen("http://127.0.0.1:9779/metrics", timeout=5).read().decode()
print("metrics:", [l for l in metrics.splitlines() if l.startswith("portproxy_connections_total")][0])
'
in_ns portproxy ls
"""


@needs_root_tools
def test_deb_installs_starts_nothing_runs_and_purges_clean(debian_root: ThrowawayRoot, built_deb: str) -> None:
    enabled, actions = debian_root.enabled_units(), len(debian_root.service_actions())
    debian_root.check(f"apt-get install -y -qq {built_deb} >/dev/null")  # as an operator does: with Recommends
    assert debian_root.service_actions()[actions:] == []
    assert debian_root.enabled_units() == enabled
    files = debian_root.check("dpkg -L portproxy").split("\n")
    for path in ("/usr/bin/portproxy", "/usr/bin/portproxy-docker-proxy", "/lib/systemd/system/portproxy.service",
                 "/usr/share/man/man1/portproxy.1.gz", "/usr/share/doc/portproxy/README.Debian"):
        assert path in files
    assert "/etc/portproxy/portproxy.toml" in debian_root.check("cat /var/lib/dpkg/info/portproxy.conffiles")
    unit = (debian_root.path / "lib/systemd/system/portproxy.service").read_text()
    assert "ExecStart=/usr/bin/portproxy serve" in unit

    demo = debian_root.check("portproxy demo", timeout=300)
    assert "-- kernel path" in demo and "HTTP/1.0 200 OK" in demo
    assert debian_root.check("portproxy-docker-proxy -version").startswith("portproxy-docker-proxy")
    # The CNI plugin where runtimes look for it, answering VERSION as a runtime asks it.
    version = debian_root.check("echo '{\"cniVersion\": \"1.0.0\"}' | CNI_COMMAND=VERSION /usr/lib/cni/portproxy")
    assert "1.1.0" in json.loads(version)["supportedVersions"]
    # ... and the Python half of its launcher, from Debian's python3 and dist-packages: a version
    # the shell does not answer, and an ADD without its CNI_* variables (CNI error 4, exit 1).
    version = debian_root.check("echo '{\"cniVersion\": \"0.3.1\"}' | CNI_COMMAND=VERSION /usr/lib/cni/portproxy")
    assert json.loads(version)["cniVersion"] == "1.1.0"
    refused = debian_root.run("echo '{}' | CNI_COMMAND=ADD /usr/lib/cni/portproxy")
    assert refused.returncode == 1 and json.loads(refused.stdout)["code"] == 4, refused
    smoke = debian_root.check(SMOKE, timeout=120).splitlines()
    assert smoke[0].startswith("MAPPING") and smoke[1].startswith("added 127.0.0.1:8081")  # nothing served before
    smoke = "\n".join(smoke)
    assert "fetched: portproxy for Debian" in smoke
    assert re.search(r"metrics: portproxy_connections_total\{.*\} [1-9]", smoke), smoke
    assert (debian_root.path / "var/lib/portproxy").is_dir()  # the daemon's state, for purge to remove

    debian_root.check("apt-get purge -y -qq portproxy >/dev/null")
    assert debian_root.run("dpkg -s portproxy").returncode != 0  # not even config-files left
    left = [f for f in files if f.startswith("/") and (debian_root.path / f.lstrip("/")).is_file()]
    assert left == []
    named = debian_root.check("find / -xdev -name '*portproxy*' -not -path '/tmp/*' -not -path '/proc/*'")
    assert named.split() == []
    assert debian_root.enabled_units() == enabled


@needs_root_tools
@pytest.mark.skipif(cgroup_layout() is None, reason="needs a hybrid or unified cgroup layout")
def test_deb_under_a_real_systemd_installs_disabled_serves_removes_and_purges(
        debian_root: ThrowawayRoot, built_deb: str, tmp_path: Path) -> None:
    """The same package with the root's own systemd booted as PID 1 (tests/support/systemd_boot.py):
    installed, it is known to systemd yet neither enabled nor started; started, the packaged
    unit serves and reloads; removed, it is stopped; purged, nothing of it is left."""
    depends = roots.package_depends((ROOT / "debian/control").read_text())
    debian_root.check(f"apt-get install -y -qq --no-install-recommends systemd {' '.join(depends)} >/dev/null")
    netns = Namespace.create("ppdeb")
    dist = (debian_root.path / built_deb.lstrip("/")).parent  # the root's /tmp: not the container's
    container = BootedSystemd(debian_root.path, netns.name, tmp_path / "container", {dist: "/srv/dist"})
    deb = "/srv/dist/" + Path(built_deb).name
    try:
        # As on a real host: no policy-rc.d (in the container's overlay only), no console getty.
        container.upper_file("etc/systemd/system/console-getty.service").symlink_to("/dev/null")
        container.boot()
        container.check(["rm", "/usr/sbin/policy-rc.d"])
        enabled = set(container.sh("find /etc/systemd/system -path '*.wants/*'").split())

        container.check(["dpkg", "-i", deb])
        assert container.show("portproxy.service", "LoadState") == "loaded"
        assert container.show("portproxy.service", "FragmentPath") == "/lib/systemd/system/portproxy.service"
        assert container.systemctl("is-enabled", "portproxy").stdout.strip() == "disabled"
        assert container.systemctl("is-active", "portproxy").stdout.strip() == "inactive"
        assert set(container.sh("find /etc/systemd/system -path '*.wants/*'").split()) == enabled

        assert container.systemctl("start", "portproxy").returncode == 0, "\n".join(container.journal("portproxy"))
        assert container.sh("portproxy ls").startswith("MAPPING")
        assert container.systemctl("reload", "portproxy").returncode == 0
        main = container.main_pid("portproxy.service")

        container.check(["dpkg", "-r", "portproxy"])
        assert container.systemctl("is-active", "portproxy").stdout.strip() == "inactive"
        assert container.run(["test", "-e", f"/proc/{main}"]).returncode != 0
        container.check(["dpkg", "-P", "portproxy"])
        assert container.run(["dpkg", "-s", "portproxy"]).returncode != 0
        assert container.show("portproxy.service", "LoadState") == "not-found"
        named = container.sh("find / -xdev -name '*portproxy*' -not -path '/srv/dist/*' -not -path '/proc/*'")
        assert named.split() == []
        assert container.run(["test", "-e", "/run/portproxy"]).returncode != 0
        assert set(container.sh("find /etc/systemd/system -path '*.wants/*'").split()) == enabled
    finally:
        container.kill()
        netns.remove()


# --- the Python way ---------------------------------------------------------------------------
def test_sdist_and_wheel_pass_twine_and_the_wheel_runs_the_demo(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo needs root (network namespaces)")
    tools = tmp_path / "tools"
    venv.create(tools, with_pip=True)
    pip = [str(tools / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "build", "twine"], check=True, capture_output=True, timeout=600)
    dist = tmp_path / "dist"
    # A copy of the tree: the build writes portproxy.egg-info next to the sources.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "dist", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".hypothesis", "benchmarks"))
    built = subprocess.run([str(tools / "bin/python"), "-m", "build", "--outdir", str(dist), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1
    twine = subprocess.run([str(tools / "bin/twine"), "check", "--strict", *map(str, sdists + wheels)],
                           capture_output=True, text=True)
    assert twine.returncode == 0, twine.stdout + twine.stderr

    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    subprocess.run([str(fresh / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(wheels[0])], check=True, capture_output=True, timeout=600)
    demo = subprocess.run([str(fresh / "bin/portproxy"), "demo"], capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "-- kernel path" in demo.stdout and "HTTP/1.0 200 OK" in demo.stdout
