"""
The real systemd-resolved, with a system bus of its own, in a throwaway
namespace (L{ngrokd.test.namespace}); nothing of this machine's resolver,
bus or links is touched.

resolved's binaries come unpacked from its Debian package, not installed
(installing it would replace this machine's C{/etc/resolv.conf}):
C{.ci/run} puts them in C{.cache/systemd-resolved} and names that directory
in C{NGROKD_TEST_RESOLVED_ROOT}; by hand::

    apt-get download systemd-resolved
    dpkg -x systemd-resolved_*.deb .cache/systemd-resolved

One mount namespace holds the bus, resolved and everything that talks to
them: a tmpfs on C{/run} (the bus socket, resolved's state), and in the
namespace's own C{/etc} the user resolved drops to, a C{resolved.conf}, and
a C{resolv.conf} pointing at resolved's stub (127.0.0.53), so that glibc
programs there resolve through it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import ngrokd
from ngrokd.test.dbusdaemon import bus_config
from ngrokd.test.namespace import Namespace, end_process, namespace

#: What every skip for want of resolved starts with (CI fails a root run
#: that skipped any).
SKIP_PREFIX = "no systemd-resolved here:"
ROOT_VARIABLE = "NGROKD_TEST_RESOLVED_ROOT"
#: How long resolved may take to appear on the bus.
START_TIMEOUT = 15.0
#: The calls that register a link, in their order.
SETUP = [
    "SetLinkDomains",
    "SetLinkDefaultRoute",
    "SetLinkLLMNR",
    "SetLinkMulticastDNS",
    "SetLinkDNSSEC",
    "SetLinkDNSOverTLS",
    "SetLinkDNS",
    "FlushCaches",
]
RESOLVED = "lib/systemd/systemd-resolved"
RESOLVECTL = "usr/bin/resolvectl"

_RESOLVED_CONF = """[Resolve]
DNS={dns}
FallbackDNS=
LLMNR=no
MulticastDNS=no
"""

_SETUP = """
set -e
mount -t tmpfs ngrokd-test-run /run
mkdir -p /run/dbus /run/systemd
echo 'systemd-resolve:x:991:991::/:/usr/sbin/nologin' >> /etc/passwd
echo 'systemd-resolve:x:991:' >> /etc/group
rm -f /etc/resolv.conf
echo 'nameserver 127.0.0.53' > /etc/resolv.conf
mkdir -p /etc/systemd
cp "$1" /etc/systemd/resolved.conf
dbus-daemon --config-file="$2" --fork --print-pid > /run/bus.pid
echo ready
exec cat > /dev/null
"""

_START_RESOLVED = """
SYSTEMD_LOG_LEVEL=debug setsid "$1" >> "$2" 2>&1 < /dev/null &
echo $! > /run/resolved.pid
"""

_STOP_RESOLVED = """
pid=$(cat /run/resolved.pid)
kill "$pid"
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
kill -9 "$pid"
"""


def resolved_root() -> str:
    """
    Where resolved's package is unpacked: C{NGROKD_TEST_RESOLVED_ROOT}, or
    C{.cache/systemd-resolved} in the source tree.
    """
    source = os.path.dirname(os.path.dirname(os.path.abspath(ngrokd.__file__)))
    return os.environ.get(ROOT_VARIABLE) or os.path.join(
        source, ".cache", "systemd-resolved"
    )


def unavailable() -> str | None:
    """
    Why the real resolved cannot run here, or C{None} if it can.
    """
    root = resolved_root()
    if not os.access(os.path.join(root, RESOLVED), os.X_OK):
        return (
            f"{os.path.join(root, RESOLVED)} is missing (unpack Debian's"
            f" systemd-resolved package there, or name its directory in"
            f" {ROOT_VARIABLE}: see ngrokd/test/resolvedns.py)"
        )
    if shutil.which("dbus-daemon") is None:
        return "dbus-daemon is not installed"
    return None


class ResolvedNamespace:
    """
    A namespace running resolved and its bus, until C{case} ends.

    @ivar ns: the L{Namespace} (its network side: links via
        C{IPRoute(netns=ns.net_path)}).
    @ivar log: resolved's debug log, appended to across restarts.
    """

    def __init__(self, case: SynchronousTestCase, dns: Sequence[str] = ()) -> None:
        reason = unavailable()
        if reason is not None:
            raise SkipTest(f"{SKIP_PREFIX} {reason}")
        self.ns: Namespace = namespace(case)
        self.root = resolved_root()
        self._workdir = tempfile.mkdtemp(prefix="ngrokd-resolved-")
        case.addCleanup(shutil.rmtree, self._workdir, True)
        self.log = os.path.join(self._workdir, "resolved.log")
        config = os.path.join(self._workdir, "resolved.conf")
        with open(config, "w") as f:
            f.write(_RESOLVED_CONF.format(dns=" ".join(dns)))
        bus = os.path.join(self._workdir, "bus.conf")
        with open(bus, "w") as f:
            f.write(bus_config("/run/dbus/system_bus_socket", type="system"))
        self._holder = subprocess.Popen(
            self.ns.command(["sh", "-c", _SETUP, "setup", config, bus]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        case.addCleanup(self._close)
        assert self._holder.stdout is not None
        if self._holder.stdout.readline() != b"ready\n":
            self._holder.wait(timeout=START_TIMEOUT)
            assert self._holder.stderr is not None
            raise AssertionError(
                f"the namespace's bus did not start: {self._holder.stderr.read()!r}"
            )
        self.start_resolved()

    def enter(self, argv: Sequence[str]) -> list[str]:
        """
        The command line that runs C{argv} beside resolved (its network and
        mount namespaces).
        """
        return ["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--", *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.enter(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def resolvectl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.run([os.path.join(self.root, RESOLVECTL), *argv])

    def start_resolved(self) -> None:
        """
        Start resolved and wait until it owns its bus name.
        """
        started = self.run(
            [
                "sh",
                "-c",
                _START_RESOLVED,
                "start",
                os.path.join(self.root, RESOLVED),
                self.log,
            ]
        )
        if started.returncode != 0:
            raise AssertionError(f"resolved did not start: {started.stderr}")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.resolvectl("status").returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"resolved did not come up; its log:\n{self.read_log()}")

    def stop_resolved(self) -> None:
        stopped = self.run(["sh", "-c", _STOP_RESOLVED])
        if stopped.returncode != 0:
            raise AssertionError(f"resolved did not stop: {stopped.stderr}")

    def read_log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-20000:]
        except FileNotFoundError:
            return ""

    def _close(self) -> None:
        for pidfile in ("/run/resolved.pid", "/run/bus.pid"):
            read = self.run(["cat", pidfile])
            if read.returncode == 0 and read.stdout.strip().isdigit():
                try:
                    os.kill(int(read.stdout.strip()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        end_process(self._holder)
