# -*- test-case-name: ngrokd.test.test_service -*-
"""
What C{ngrokd install} writes and which service manager commands drive it:
pure functions of the templates in C{contrib/} (shipped in the package as
C{ngrokd/cli/templates}), the instance and this installation's interpreter.

The unit and the job are C{contrib/}'s, hardening included, with only what
must differ changed: the command (this installation's Python running
C{-m ngrokd run}), the names of a named instance, and C{ProtectHome=}
when the installation lives in a home directory, where C{yes} would hide
the daemon's own code from it.
"""

from __future__ import annotations

import plistlib
import re
import shlex
import stat
from collections.abc import Iterable, Sequence

from attrs import frozen

from ngrokd.instance import config_path, state_dir

#: Where home directories are; systemd's C{ProtectHome=yes} hides them.
HOME_DIRECTORIES = ("/home", "/root", "/run/user")
SYSTEMD = "systemd"
LAUNCHD = "launchd"


@frozen
class Service:
    """
    One instance's service under one service manager.
    """

    manager: str
    instance: str

    @property
    def name(self) -> str:
        """
        The systemd unit's name, or the launchd job's label.
        """
        suffix = f"-{self.instance}" if self.instance else ""
        if self.manager == SYSTEMD:
            return f"ngrokd{suffix}.service"
        return "com.ngrok.ngrokd" + (f".{self.instance}" if self.instance else "")

    @property
    def path(self) -> str:
        """
        The unit or job file.
        """
        if self.manager == SYSTEMD:
            return f"/etc/systemd/system/{self.name}"
        return f"/Library/LaunchDaemons/{self.name}.plist"

    @property
    def config(self) -> str:
        return config_path(self.instance)

    @property
    def state(self) -> str:
        return state_dir(self.instance)

    @property
    def log(self) -> str:
        """
        Where launchd writes the daemon's output.
        """
        suffix = f"-{self.instance}" if self.instance else ""
        return f"/var/log/ngrokd{suffix}.log"


def daemon_command(interpreter: str, service: Service) -> list[str]:
    """
    The command the service runs: this installation's interpreter running
    the daemon in the foreground with the instance's config.
    """
    command = [interpreter, "-m", "ngrokd", "run", "--config", service.config]
    if service.instance:
        command += ["--instance", service.instance]
    return command


def protects_home(paths: Iterable[str]) -> bool:
    """
    Whether C{ProtectHome=yes} leaves every one of C{paths} (the
    interpreter, the installation) visible to the service.
    """
    return not any(
        path == home or path.startswith(home + "/")
        for path in paths
        for home in HOME_DIRECTORIES
    )


def others_can_change(mode: int, uid: int) -> bool:
    """
    Whether a file or directory of this owner and mode can be changed by
    someone other than root: the service runs its code as root.
    """
    return uid != 0 or bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def _systemd_word(word: str, program: bool = False) -> str:
    """
    C{word} as one word of a systemd command line: specifiers escaped, and
    variables too but in the C{program} (where systemd substitutes none),
    quoted when it holds a space or a quote.
    """
    word = word.replace("%", "%%")
    if not program:
        word = word.replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(
    template: str, command: Sequence[str], service: Service, home: bool
) -> str:
    """
    The unit C{install} writes: C{template} (C{contrib}'s unit) running
    C{command}, named for C{service}'s instance; with C{home}, the
    installation is in a home directory and C{ProtectHome=read-only}
    keeps it visible.
    """
    label = f"ngrokd-{service.instance}" if service.instance else "ngrokd"
    program, *arguments = command
    exec_start = " ".join(
        [_systemd_word(program, program=True), *map(_systemd_word, arguments)]
    )
    header = (
        f"# Written by 'ngrokd install' for {shlex.join(command[:1])};"
        f" 'ngrokd uninstall{instance_option(service)}' removes it.\n"
    )
    if home:
        header += (
            "# ProtectHome=read-only, not yes: this installation is in a home"
            " directory.\n"
        )
    unit = _set(template, "ExecStart", exec_start)
    unit = _set(unit, "SyslogIdentifier", label)
    if service.instance:
        description = _get(unit, "Description")
        unit = _set(unit, "Description", f"{description} (instance {service.instance})")
        unit = _set(unit, "RuntimeDirectory", label)
    if home:
        unit = _set(unit, "ProtectHome", "read-only")
    return header + unit


def launchd_job(template: bytes, command: Sequence[str], service: Service) -> bytes:
    """
    The job C{install} writes: C{template} (C{contrib}'s job) running
    C{command}, labelled and logging for C{service}'s instance.
    """
    job = plistlib.loads(template)
    job["Label"] = service.name
    job["ProgramArguments"] = list(command)
    job["StandardOutPath"] = job["StandardErrorPath"] = service.log
    return plistlib.dumps(job)


def manager_commands(service: Service, action: str) -> list[list[str]]:
    """
    The service manager's command lines for C{action}: C{install} (after
    writing), C{uninstall} (before removing), C{removed} (after), C{start},
    C{stop}, C{restart}, C{status}.
    """
    name = service.name
    if service.manager == SYSTEMD:
        return {
            "install": [["systemctl", "daemon-reload"], ["systemctl", "enable", name]],
            "uninstall": [["systemctl", "disable", "--now", name]],
            "removed": [["systemctl", "daemon-reload"]],
            "start": [["systemctl", "start", name]],
            "stop": [["systemctl", "stop", name]],
            "restart": [["systemctl", "restart", name]],
            "status": [["systemctl", "status", "--no-pager", name]],
        }[action]
    target = f"system/{name}"
    return {
        "install": [],
        "uninstall": [["launchctl", "bootout", target]],
        "removed": [],
        "start": [["launchctl", "bootstrap", "system", service.path]],
        "stop": [["launchctl", "bootout", target]],
        "restart": [["launchctl", "kickstart", "-k", target]],
        "status": [["launchctl", "print", target]],
    }[action]


def instance_option(service: Service) -> str:
    """
    The C{--instance} option that names C{service}'s instance, if any.
    """
    return f" --instance {service.instance}" if service.instance else ""


def _get(unit: str, key: str) -> str:
    found = re.search(rf"(?m)^{key}=(.*)$", unit)
    if found is None:
        raise ValueError(f"the unit template has no {key}=")
    return found.group(1)


def _set(unit: str, key: str, value: str) -> str:
    """
    C{unit} with C{key}'s one line set to C{value}.
    """
    _get(unit, key)
    return re.sub(rf"(?m)^{key}=.*$", lambda _: f"{key}={value}", unit, count=1)
