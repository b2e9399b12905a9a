"""
A real C{dbus-daemon} of a test's own, and a peer on it that answers
method calls, for the tests of L{ngrokd.host.dbus} and of resolved.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ngrokd.test.namespace import end_process

#: How long the bus and the peer may take to start.
START_TIMEOUT = 10.0

_CONFIG = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{type}</type>
  <listen>unix:path={path}</listen>
  <auth>{auth}</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""


def bus_config(path: str, type: str = "session", auth: str = "EXTERNAL") -> str:
    """
    A bus configuration listening on C{path} where anyone may own any name
    and send anything.
    """
    return _CONFIG.format(type=type, path=path, auth=auth)


class Bus:
    """
    A running bus: C{path} is its socket.
    """

    def __init__(self, process: subprocess.Popen[bytes], path: str) -> None:
        self.process = process
        self.path = path

    def stop(self) -> None:
        end_process(self.process)


def start_bus(case: SynchronousTestCase, auth: str = "EXTERNAL") -> Bus:
    """
    Start a session-type bus in a temporary directory, stopped when C{case}
    ends.

    @raise SkipTest: when C{dbus-daemon} is not installed.
    """
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        raise SkipTest("dbus-daemon is not installed (Debian: dbus-daemon)")
    directory = tempfile.mkdtemp(prefix="ngrokd-bus-")
    case.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "bus")
    config = os.path.join(directory, "bus.conf")
    with open(config, "w") as f:
        f.write(bus_config(path, auth=auth))
    process = subprocess.Popen(
        [daemon, f"--config-file={config}", "--nofork", "--print-address"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    case.addCleanup(end_process, process)
    _wait_line(process, "dbus-daemon")
    return Bus(process, path)


class Peer:
    """
    A process on the bus that owns C{name} and answers C{Echo} (its
    arguments), C{Fail} (an error), C{Slow} (after a second), C{Big} (a
    string of the asked length) and C{Emit} (sends signal C{Ping}).
    """

    def __init__(self, case: SynchronousTestCase, path: str, name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PEER, path, name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        case.addCleanup(self.stop)
        _wait_line(self.process, "the test's D-Bus peer")

    def stop(self) -> None:
        end_process(self.process)


def _wait_line(process: subprocess.Popen[bytes], what: str) -> bytes:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline() if ready else b""
    if not line or time.monotonic() > deadline:
        end_process(process)
        assert process.stderr is not None
        raise AssertionError(f"{what} did not start: {process.stderr.read()!r}")
    return line


_PEER = """
import sys, threading, time
from jeepney import DBusAddress, MessageType, new_error, new_method_return, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

path, name = sys.argv[1:]
connection = open_dbus_connection(bus="unix:path=" + path)
reply = connection.send_and_get_reply(message_bus.RequestName(name, 4), timeout=5)
assert reply.body == (1,), reply.body
print("ready", flush=True)
lock = threading.Lock()

def send(message):
    with lock:
        connection.send(message)

def later(message):
    time.sleep(1)
    send(new_method_return(message, "s", ("late",)))

while True:
    message = connection.receive()
    if message.header.message_type is not MessageType.method_call:
        continue
    member = message.header.fields[3]
    if member == "Echo":
        signature = message.header.fields.get(8)
        send(new_method_return(message, signature, message.body))
    elif member == "Fail":
        send(new_error(message, "org.ngrokd.Test.Error.Refused", "s", ("no, never",)))
    elif member == "Slow":
        threading.Thread(target=later, args=(message,), daemon=True).start()
    elif member == "Big":
        send(new_method_return(message, "s", ("x" * message.body[0],)))
    elif member == "Emit":
        emitter = DBusAddress("/org/ngrokd/Test", interface="org.ngrokd.Test")
        send(new_signal(emitter, "Ping", "s", (message.body[0],)))
        send(new_method_return(message))
"""
