# -*- test-case-name: ngrokd.test.test_netif,ngrokd.test.test_hosts -*-
"""
Throwaway Linux namespaces for tests that need real netlink, a real hosts
file and the system resolver, without touching this machine's interfaces,
routes or C{/etc}.

A L{Namespace} is a new network namespace (only C{lo}, brought up) kept alive
by a holder process, so that several commands, and pyroute2 sockets opened
with C{IPRoute(netns=ns.net_path)}, share it. The test process itself never
changes namespace. Each command runs in a mount namespace of its own, where
C{/etc} is an overlay whose writes land in a temporary directory, and where a
file of the test's can be bind-mounted over C{/etc/hosts}: commands given the
same file see the same hosts file, as the system resolver does
(C{getent hosts NAME}, C{socket.getaddrinfo}).

It needs root, util-linux (C{unshare}, C{nsenter}, C{mount}), iproute2 and
overlayfs; L{namespace} skips the test with the reason when any is missing.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

#: What every skip for want of namespaces starts with.
SKIP_PREFIX = "no network namespace here:"
#: How long the holder may take to set up the namespace.
START_TIMEOUT = 10.0
#: The default bound on one command.
RUN_TIMEOUT = 30.0

_HOLD = "ip link set lo up && echo ready && exec cat >/dev/null"
_ENTER = (
    'mount -t overlay ngrokd-test-etc -o "lowerdir=/etc,upperdir=$1,workdir=$2"'
    ' /etc && if [ -n "$3" ]; then mount --bind "$3" /etc/hosts; fi'
    ' && shift 3 && exec "$@"'
)
_TOOLS = ("unshare", "nsenter", "mount", "ip", "sh")


class NamespaceError(Exception):
    """
    The namespace could not be made, or a command in it failed.
    """


class Namespace:
    """
    A network namespace that lives until L{close}.

    @ivar net_path: its C{/proc/PID/ns/net}, for C{nsenter --net} and
        C{pyroute2.IPRoute(netns=...)}.
    """

    def __init__(self, holder: subprocess.Popen[bytes], workdir: str) -> None:
        self._holder = holder
        self._workdir = workdir
        self.net_path = f"/proc/{holder.pid}/ns/net"

    @classmethod
    def start(cls, timeout: float = START_TIMEOUT) -> Namespace:
        """
        Make a namespace and wait until its C{lo} is up.

        @raise NamespaceError: with what the holder said, if it failed.
        """
        workdir = tempfile.mkdtemp(prefix="ngrokd-ns-")
        holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", _HOLD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], timeout)
        if ready and holder.stdout.readline() == b"ready\n":
            return cls(holder, workdir)
        try:
            _, said = holder.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            holder.kill()
            _, said = holder.communicate()
        shutil.rmtree(workdir, ignore_errors=True)
        raise NamespaceError(
            "cannot create a network namespace: "
            + (said.decode("utf-8", "replace").strip() or "timed out")
        )

    def command(self, argv: Sequence[str], hosts_file: str | None = None) -> list[str]:
        """
        The command line that runs C{argv} in this network namespace, in a
        mount namespace of its own (C{/etc} an overlay; C{hosts_file}, if
        given, bind-mounted over C{/etc/hosts}). For long-running processes
        (spawn it, and end it before L{close}); L{run} runs and waits.
        """
        etc = tempfile.mkdtemp(prefix="etc-", dir=self._workdir)
        upper, work = os.path.join(etc, "upper"), os.path.join(etc, "work")
        os.mkdir(upper)
        os.mkdir(work)
        return [
            "nsenter",
            f"--net={self.net_path}",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            _ENTER,
            "ngrokd-namespace",
            upper,
            work,
            os.path.abspath(hosts_file) if hosts_file else "",
            *argv,
        ]

    def run(
        self,
        argv: Sequence[str],
        hosts_file: str | None = None,
        timeout: float = RUN_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """
        Run C{argv} as L{command} does and wait for it (at most C{timeout}
        seconds: then it is killed and L{subprocess.TimeoutExpired} raised).
        """
        return subprocess.run(
            self.command(argv, hosts_file),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_python(
        self, code: str, hosts_file: str | None = None, timeout: float = RUN_TIMEOUT
    ) -> Any:
        """
        Run Python C{code} (with this interpreter, so C{ngrokd} imports)
        and decode the JSON it prints.

        @raise NamespaceError: if it exits with an error, with its stderr.
        """
        result = self.run([sys.executable, "-c", code], hosts_file, timeout)
        if result.returncode != 0:
            raise NamespaceError(
                f"python in the namespace exited with {result.returncode}:\n"
                f"{result.stderr}"
            )
        return json.loads(result.stdout)

    def close(self) -> None:
        """
        End the holder: the namespace goes once nothing else uses it.
        """
        end_process(self._holder)
        shutil.rmtree(self._workdir, ignore_errors=True)


def end_process(process: subprocess.Popen[Any]) -> None:
    """
    End a process a test started: close its stdin where it has one (a
    holder's cue to exit), else terminate it; kill it if it has not ended
    within L{START_TIMEOUT}; close its pipes.
    """
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()
    elif process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


@functools.cache
def unavailable() -> str | None:
    """
    Why namespaces cannot be used here, or C{None} if they can.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces exist only on Linux"
    if os.geteuid() != 0:
        return "creating network and mount namespaces needs root"
    for tool in _TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        probe = Namespace.start()
    except (NamespaceError, OSError) as e:
        return str(e)
    try:
        result = probe.run(["true"], timeout=START_TIMEOUT)
    finally:
        probe.close()
    if result.returncode != 0:
        return f"cannot set up a mount namespace: {result.stderr.strip()}"
    return None


def namespace(case: SynchronousTestCase) -> Namespace:
    """
    A fresh namespace for C{case}, closed when it ends.

    @raise SkipTest: saying why, where namespaces cannot be made, after
        L{SKIP_PREFIX} (CI fails a root run that skipped any).
    """
    reason = unavailable()
    if reason is not None:
        raise SkipTest(f"{SKIP_PREFIX} {reason}")
    made = Namespace.start()
    case.addCleanup(made.close)
    return made


def run_in_namespace(
    argv: Sequence[str], hosts_file: str | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """
    Run C{argv} in a namespace of its own, gone when it exits.
    """
    made = Namespace.start()
    try:
        return made.run(argv, hosts_file, timeout)
    finally:
        made.close()
