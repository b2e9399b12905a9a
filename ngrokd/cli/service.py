# -*- test-case-name: ngrokd.test.test_service -*-
"""
C{ngrokd install|uninstall|start|stop|restart|status}: the files and the
service manager's commands of L{ngrokd.cli.units}, carried out on a
L{Host}.

Everything happens under C{Host.root} (C{/} but in images and tests), and
the service manager (C{systemctl}, C{launchctl}, found on C{PATH}) is asked
only when it runs there: on a machine where systemd is not PID 1 the unit
is written and the user told how to run the daemon instead. A file that
differs from what this installation writes is never replaced without
C{--force}, and the config file never: it holds the API key.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import TextIO

from attrs import define

from ngrokd.atomic import read_if_exists, write_atomic
from ngrokd.cli.units import (
    LAUNCHD,
    SYSTEMD,
    Service,
    daemon_command,
    instance_option,
    launchd_job,
    manager_commands,
    others_can_change,
    protects_home,
    systemd_unit,
)

#: Exit statuses: a step failed; not allowed to this user (as ngrokctl's).
EXIT_FAILED = 1
EXIT_PERMISSION = 4
#: Seconds a service manager command may take (a start waits for the
#: daemon's readiness, which systemd bounds at 90 s by default).
MANAGER_TIMEOUT = 300.0


@define
class Host:
    """
    The machine the commands act on, and where they report.

    @ivar root: the file system's top, C{/} but in images and tests.
    @ivar environ: the environment the service manager runs with (its
        C{PATH} finds it).
    @ivar euid: who runs the command; changing the system needs root.
    @ivar platform: a C{sys.platform} value.
    @ivar interpreter: this installation's Python, which the service runs.
    @ivar prefix: this installation's directory (C{sys.prefix}).
    """

    root: str
    environ: Mapping[str, str]
    euid: int
    platform: str
    interpreter: str
    prefix: str
    out: TextIO
    err: TextIO

    def path(self, path: str) -> str:
        """
        C{path}, a path of the real system, under L{root}.
        """
        return os.path.join(self.root, path.lstrip("/"))

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def warn(self, line: str) -> None:
        self.err.write(f"ngrokd: {line}\n")
        self.err.flush()

    def manager_runs(self, manager: str) -> bool:
        """
        Whether C{manager} runs the system under L{root}.
        """
        if manager == SYSTEMD:
            return os.path.isdir(self.path("/run/systemd/system"))
        return os.path.exists(self.path("/sbin/launchd"))

    def run(self, argv: Sequence[str]) -> int:
        """
        Run a command found on L{environ}'s C{PATH}, its output passed on;
        its exit status.
        """
        found = shutil.which(argv[0], path=self.environ.get("PATH", os.defpath))
        if found is None:
            self.warn(f"{argv[0]} is not on PATH")
            return EXIT_FAILED
        try:
            ran = subprocess.run(
                [found, *argv[1:]],
                capture_output=True,
                text=True,
                errors="replace",
                env=dict(self.environ),
                stdin=subprocess.DEVNULL,
                timeout=MANAGER_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            self.warn(f"{' '.join(argv)}: no answer in {MANAGER_TIMEOUT:.0f} s")
            return EXIT_FAILED
        self.out.write(ran.stdout)
        self.err.write(ran.stderr)
        return ran.returncode


def service_of(args: argparse.Namespace, host: Host) -> Service:
    manager = args.service_manager or (
        LAUNCHD if host.platform == "darwin" else SYSTEMD
    )
    return Service(manager, args.instance or "")


def _refuse_unless_root(host: Host, action: str, service: Service) -> bool:
    """
    Whether C{action} is refused: it changes the system's files or
    services, and this is not root (under any C{--root}, so that a mistake
    can never reach the real system's files).
    """
    if host.euid == 0:
        return False
    host.warn(
        f"{action} needs root (it changes {service.path} and the service):"
        f" sudo ngrokd {action}{instance_option(service)}"
    )
    return True


def install(args: argparse.Namespace, host: Host) -> int:
    """
    Write the service and, when there is none, the config file; enable the
    service; say what was done and what comes next.
    """
    service = service_of(args, host)
    if _refuse_unless_root(host, "install", service):
        return EXIT_PERMISSION
    config = host.path(service.config)
    if service.instance and not os.path.exists(config):
        host.warn(
            f"{config} does not exist: a named instance sets its own"
            " server.health_address and net.subnet (or net.start_port), so"
            " write its config first (see docs/operations.rst, Several"
            " instances)"
        )
        return EXIT_FAILED
    content = _service_file(service, host)
    target = host.path(service.path)
    existing = read_if_exists(target)
    if existing not in (None, content) and not args.force:
        host.warn(
            f"{target} differs from what this installation writes; left as it"
            " is. 'ngrokd install --force' replaces it:"
        )
        host.err.writelines(_diff(existing or b"", content, target))
        return EXIT_FAILED
    if existing == content:
        host.say(f"{target}: already as this installation writes it")
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_atomic(target, content, 0o644)
        command = " ".join(daemon_command(host.interpreter, service))
        host.say(f"wrote {target}, which runs: {command}")
    _create_config(config, host)
    _warn_if_others_can_change(host)
    if host.manager_runs(service.manager):
        for argv in manager_commands(service, "install"):
            if host.run(argv) != 0:
                host.warn(f"{' '.join(argv)} failed")
                return EXIT_FAILED
            host.say(f"ran {' '.join(argv)}")
    else:
        host.say(
            f"{service.manager} is not running here: nothing enabled. 'ngrokd"
            f" run{instance_option(service)}' runs the daemon in the foreground."
        )
    _check_config(config, service, host)
    host.say()
    host.say("Next:")
    host.say(f"  sudo ngrokd start{instance_option(service)}")
    host.say(
        f"  sudo ngrokctl{instance_option(service)} set-api-key   (paste the ngrok API"
        " key, then Enter)"
    )
    host.say(f"  ngrokctl{instance_option(service)} status")
    return 0


def uninstall(args: argparse.Namespace, host: Host) -> int:
    """
    Stop and remove the service; with C{--purge}, the config and state too.
    """
    service = service_of(args, host)
    if _refuse_unless_root(host, "uninstall", service):
        return EXIT_PERMISSION
    target = host.path(service.path)
    if os.path.exists(target):
        running = host.manager_runs(service.manager)
        if running:
            for argv in manager_commands(service, "uninstall"):
                host.run(argv)
        os.remove(target)
        host.say(f"removed {target}")
        if running:
            for argv in manager_commands(service, "removed"):
                host.run(argv)
    else:
        host.say(f"{target} does not exist: no service to remove")
    if args.purge:
        _purge(service, host)
    else:
        host.say(
            f"kept {host.path(service.config)} and the state in"
            f" {host.path(service.state)} ('--purge' removes them)"
        )
    return 0


def control(args: argparse.Namespace, host: Host) -> int:
    """
    C{start}, C{stop} or C{restart} the installed service.
    """
    service = service_of(args, host)
    if _refuse_unless_root(host, args.command, service):
        return EXIT_PERMISSION
    if not _usable(service, host):
        return EXIT_FAILED
    for argv in manager_commands(service, args.command):
        if host.run(argv) != 0:
            host.warn(f"{' '.join(argv)} failed")
            return EXIT_FAILED
    host.say(f"{args.command} {service.name}: done")
    if args.command != "stop":
        host.say(f"'ngrokctl{instance_option(service)} status' shows how it does")
    return 0


def status(args: argparse.Namespace, host: Host) -> int:
    """
    The service manager's view of the service, then the daemon's own
    (C{ngrokctl status}); the first failure's exit status.
    """
    service = service_of(args, host)
    code = 0
    if _usable(service, host):
        code = host.run(manager_commands(service, "status")[0])
    else:
        code = EXIT_FAILED
    host.say()
    ctl = [host.interpreter, "-m", "ngrokd.ctl"]
    if service.instance:
        ctl += ["--instance", service.instance]
    daemon = host.run([*ctl, "status"])
    return code or daemon


def _usable(service: Service, host: Host) -> bool:
    """
    Whether the service is installed and its manager runs; says why not.
    """
    if not os.path.exists(host.path(service.path)):
        host.warn(
            f"{service.name} is not installed:"
            f" sudo ngrokd install{instance_option(service)}"
        )
        return False
    if not host.manager_runs(service.manager):
        host.warn(
            f"{service.manager} is not running here: 'ngrokd"
            f" run{instance_option(service)}' runs the daemon in the foreground"
        )
        return False
    return True


def _service_file(service: Service, host: Host) -> bytes:
    command = daemon_command(host.interpreter, service)
    templates = files("ngrokd.cli").joinpath("templates")
    if service.manager == SYSTEMD:
        home = not protects_home([host.interpreter, host.prefix])
        template = templates.joinpath("ngrokd.service").read_text("utf-8")
        return systemd_unit(template, command, service, home).encode("utf-8")
    template_job = templates.joinpath("com.ngrok.ngrokd.plist").read_bytes()
    return launchd_job(template_job, command, service)


def _create_config(config: str, host: Host) -> None:
    """
    Write the example config (every key at its default) as C{config}, mode
    0600 in a directory of mode 0700, unless a file is there.
    """
    directory = os.path.dirname(config)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)
    text = files("ngrokd.cli").joinpath("templates", "config.yml").read_bytes()
    try:
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        host.say(f"kept {config}, which exists")
        return
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    host.say(f"wrote {config} (mode 0600): every key at its default, no API key")


def _check_config(config: str, service: Service, host: Host) -> None:
    from ngrokd.config import ConfigError, load_config

    try:
        load_config(config, instance=service.instance or None)
    except ConfigError as e:
        host.warn(f"the daemon will not start with this config: {e}")


def _warn_if_others_can_change(host: Host) -> None:
    for path in (host.prefix, os.path.dirname(os.path.dirname(__file__))):
        info = os.stat(path)
        if others_can_change(info.st_mode, info.st_uid):
            host.warn(
                f"{path} can be changed by others than root (owner uid"
                f" {info.st_uid}, mode {info.st_mode & 0o777:o}), and the"
                " service runs it as root: install ngrokd as root (sudo pipx"
                " install --global, or a venv root owns)"
            )
            return


def _purge(service: Service, host: Host) -> None:
    """
    Remove the instance's config file and state directory. The unnamed
    instance's directory also holds named instances' directories: those
    stay.
    """
    config = host.path(service.config)
    if os.path.exists(config):
        os.remove(config)
        host.say(f"removed {config}")
    state = host.path(service.state)
    if not os.path.isdir(state):
        return
    if service.instance:
        shutil.rmtree(state)
        host.say(f"removed {state}")
        return
    kept = []
    for entry in sorted(os.listdir(state)):
        path = os.path.join(state, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            kept.append(path)
        else:
            os.remove(path)
    if kept:
        host.say(f"removed the files in {state}; kept {', '.join(kept)}")
    else:
        os.rmdir(state)
        host.say(f"removed {state}")


def _diff(old: bytes, new: bytes, path: str) -> list[str]:
    return list(
        difflib.unified_diff(
            old.decode("utf-8", "replace").splitlines(keepends=True),
            new.decode("utf-8", "replace").splitlines(keepends=True),
            fromfile=f"{path} (now)",
            tofile=f"{path} (this installation's)",
            n=1,
        )
    )
