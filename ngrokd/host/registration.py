# -*- test-case-name: ngrokd.test.test_nameservice -*-
"""
The DNS server registered with the system's resolver, one way per mode:
routing domains on ngrokd's link in systemd-resolved
(L{ResolvedRegistration}), or files in C{/etc/resolver}
(L{FilesRegistration}). Each remembers what it registered, so that an
unchanged apply changes nothing, and undoes it at the stop.
L{ngrokd.host.nameservice} decides when; what goes wrong is a L{Fallback}:
the names go to the hosts file meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.logger import Logger

from ngrokd.host.allocator import IPAddress
from ngrokd.host.dbus import DBusConnection, DBusError
from ngrokd.host.namechoice import Fallback
from ngrokd.host.resolved import LinkSettings, ResolvedError, ResolvedLink
from ngrokd.host.resolverfiles import ResolverFiles


class FilesRegistration:
    """
    The server in C{/etc/resolver} files, one per routing domain (macOS).

    @param files: makes the L{ResolverFiles} on first use.
    @param log: where the problems with the files are said.
    """

    def __init__(self, files: Callable[[], ResolverFiles], log: Logger) -> None:
        self._make = files
        self._log = log
        self._files: ResolverFiles | None = None
        self._registered: tuple[tuple[str, ...], IPAddress, int] | None = None

    @property
    def registered(self) -> bool:
        """
        Whether files were written since the last L{forget}.
        """
        return self._registered is not None

    async def register(
        self, domains: tuple[str, ...], server: IPAddress, port: int
    ) -> bool:
        """
        Point C{domains} at C{server} on C{port}.

        @return: whether that changed anything.
        """
        wanted = (domains, server, port)
        if wanted == self._registered:
            return False
        if self._files is None:
            self._files = self._make()
        result = await self._files.apply(domains, server, port)
        for problem in result.problems:
            self._log.warn("/etc/resolver: {problem}", problem=problem)
        self._registered = wanted
        return True

    def forget(self) -> None:
        """
        Write the files again at the next L{register}.
        """
        self._registered = None

    async def remove(self) -> None:
        """
        Remove our files.
        """
        files, self._files, self._registered = self._files, None, None
        if files is None:
            return
        result = await files.remove()
        for problem in result.problems:
            self._log.warn("/etc/resolver: {problem}", problem=problem)


class ResolvedRegistration:
    """
    The server as the DNS server of ngrokd's link in systemd-resolved, for
    its routing domains (L{ResolvedLink}).

    @param connect: the bus connection the link's settings are made over.
    @param changed: called when resolved left the bus, or came back and
        took our settings again.
    @param log: where the removal of the settings is said.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[DBusConnection]],
        changed: Callable[[], object],
        log: Logger,
    ) -> None:
        self._connect = connect
        self._changed = changed
        self._log = log
        #: The link's settings, while they are kept.
        self.link: ResolvedLink | None = None
        self._registered: LinkSettings | None = None

    @property
    def registered(self) -> bool:
        """
        Whether settings were asked for since the last L{forget}.
        """
        return self._registered is not None

    async def register(self, settings: LinkSettings) -> bool:
        """
        Give the link C{settings}.

        @return: whether that changed anything.
        @raise Fallback: they cannot be in place now.
        """
        if settings == self._registered and self.link is not None:
            if self.link.error is not None:
                raise Fallback(self.link.error)
            return False
        self._registered = settings
        try:
            if self.link is None:
                self.link = ResolvedLink(await self._connect(), settings, self._changed)
                await self.link.start()
            else:
                await self.link.update(settings)
        except (DBusError, ResolvedError) as e:
            raise Fallback(str(e)) from e
        return True

    def forget(self) -> None:
        """
        The bus connection is gone, and the link's settings with it: make
        them afresh at the next L{register}.
        """
        self.link = None
        self._registered = None

    async def remove(self) -> None:
        """
        Revert the link's settings.
        """
        link, self.link, self._registered = self.link, None, None
        if link is None:
            return
        try:
            await link.stop()
        except ResolvedError as e:
            self._log.warn("systemd-resolved: {error}", error=str(e))
        else:
            self._log.info("systemd-resolved: our link's settings removed")
