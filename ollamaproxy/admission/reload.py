# -*- test-case-name: tests.admission.test_reload -*-
"""
Reloading the keys file while the proxy runs.

L{KeysReloader} reloads the keys file when it changes and at once on
C{SIGHUP} (C{kill -HUP $(cat twistd.pid)}), so adding or revoking a key needs
no restart.  The file is polled every couple of seconds: a change is a
different modification time, size or inode (C{os.stat} follows symbolic
links, so swapping a link to a new file counts too).

A file that cannot be used (bad JSON, a bad entry, two keys with one name)
changes nothing: the keys already loaded stay, and a warning says which file
is wrong and why.  A file that cannot be read is not read again until it
changes or C{SIGHUP} arrives.  A file whose keys cannot be taken (two keys
with one name, or a name that C{--api-key} or the database has too) is read
again at every poll, with one warning, so that the keys are taken as soon as
the clash is cleared in the other source too.

A missing file is an empty one: only the keys that always stay (C{--api-key})
remain, as when the proxy starts without a keys file.  The keys file is only
ever replaced by an atomic rename, so a missing file means someone removed
it, and revoking its keys is what they asked for.  Keeping the old keys
instead would leave revoked keys working with no file left that shows them;
the price of failing closed is that a hand edit done as C{mv keys.json x;
...; mv x keys.json} rejects the file's keys for the seconds in between.

Keys and digests never appear in log events: only the file and a count.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Final, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ollamaproxy.admission.keys import ApiKey, KeysFileError, load_keys_file

log = Logger()

DEFAULT_INTERVAL: Final = 2.0


class KeySink(Protocol):
    """
    Where reloaded keys go: a L{KeyStore}, or one source's part of the keys
    (L{ollamaproxy.admission.key_sources.SourceKeys}).
    """

    def replace(self, keys: Sequence[ApiKey]) -> None:
        """
        Accept C{keys} from now on.

        @raise ValueError: If they cannot be (two keys of one name).
        """

    def __len__(self) -> int:
        """
        How many keys are accepted in all.
        """

SighupInstaller = Callable[[Callable[[], None]], Callable[[], None]]
"""
Installs a C{SIGHUP} handler that calls the given function in the reactor
thread, and returns a function that removes it again.
"""

# What identifies one version of the keys file: (mtime_ns, size, inode); None
# for no file; the errno if it cannot be looked at (so that, like a broken
# file, it is warned about once and not at every poll).
_Signature = tuple[int, int, int] | int | None


class _Unknown:
    """
    The signature before the first look at the file: unlike every real one.
    """


_UNKNOWN: Final = _Unknown()


def _signature(path: str) -> _Signature:
    """
    The modification time, size and inode of the file at C{path}; L{None}
    if there is none; the C{errno} if it cannot be looked at.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.errno
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def sighup_installer(
    call_from_thread: Callable[[Callable[[], None]], object],
) -> SighupInstaller:
    """
    The real way to handle C{SIGHUP}: with C{signal.signal}, handing the
    work to the reactor with C{call_from_thread} (a signal handler runs
    between any two bytecodes, so it must not touch the key store itself).

    Use it from the main thread, as twistd does: Python allows signal
    handlers nowhere else.

    @param call_from_thread: The reactor's C{callFromThread}.
    @return: An installer for L{KeysReloader}.  Removing the handler puts
        back the one that was there before (the default action if that was
        not set from Python), unless something else has replaced ours since.
    """

    def install(on_sighup: Callable[[], None]) -> Callable[[], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            call_from_thread(on_sighup)

        previous = signal.signal(signal.SIGHUP, handler)

        def uninstall() -> None:
            if signal.getsignal(signal.SIGHUP) is handler:
                signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)

        return uninstall

    return install


class KeysReloader(Service):
    """
    Keeps a L{KeyStore} in step with the keys file while the service runs.

    Starting it reloads the file once (catching any change made since the
    store was built), then polls it every C{interval} seconds and listens
    for C{SIGHUP}.  Stopping it undoes both and leaves no delayed call.
    """

    def __init__(
        self,
        store: KeySink,
        path: str,
        extra: Sequence[ApiKey],
        clock: IReactorTime,
        interval: float = DEFAULT_INTERVAL,
        *,
        install_sighup: SighupInstaller,
    ) -> None:
        """
        @param store: The keys the proxy accepts; replaced on every reload.
        @param path: The keys file.
        @param extra: Keys that stay whatever the file says (the
            C{--api-key} one).
        @param clock: Times the polling.
        @param interval: Seconds between looks at the file.
        @param install_sighup: Installs the C{SIGHUP} handler (for the real
            one, L{sighup_installer} of the reactor's C{callFromThread}).
        """
        self._store = store
        self._path = path
        self._extra = tuple(extra)
        self._clock = clock
        self._interval = interval
        self._install_sighup = install_sighup
        self._signature: _Signature | _Unknown = _UNKNOWN
        # The reason last warned of for keys that could not be taken.
        self._said_unusable: str | None = None
        self._loop: LoopingCall | None = None
        self._uninstall_sighup: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self._uninstall_sighup = self._install_sighup(self._on_sighup)
        loop = LoopingCall(self._poll)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            self._loop = None
        if self._uninstall_sighup is not None:
            self._uninstall_sighup()
            self._uninstall_sighup = None

    def reload(self) -> None:
        """
        Read the keys file and accept the C{extra} keys and the file's keys
        from now on; if the file cannot be used, keep the keys accepted now
        and log a warning that says why.
        """
        # Look before reading: if the file changes while it is read, the
        # next poll sees a signature different from this one and reads it
        # again.  (If the file cannot be looked at, it cannot be read either:
        # the warning below says why.)
        signature = _signature(self._path)
        previous = self._signature
        try:
            loaded = load_keys_file(self._path)
        except KeysFileError as e:
            self._signature = signature
            self._said_unusable = None
            self._unusable(str(e))
            return
        try:
            self._store.replace([*self._extra, *loaded])
        except ValueError as e:
            # The signature stays the one last taken: the file is read again
            # at the next poll, in case the clash was cleared elsewhere.
            reason = str(e)
            if reason != self._said_unusable:
                self._said_unusable = reason
                self._unusable(reason)
            return
        self._signature = signature
        self._said_unusable = None
        if signature is None and isinstance(previous, tuple):
            log.warn(
                "Keys file {keys_file} was removed: its keys are revoked, "
                "{count} other keys remain",
                keys_file=self._path,
                count=len(self._extra),
            )
        else:
            log.info(
                "Reloaded {count} keys from {keys_file}",
                keys_file=self._path,
                count=len(loaded),
                total=len(self._store),
            )

    def _unusable(self, reason: str) -> None:
        log.warn(
            "Keys file {keys_file} is not usable, keeping the keys accepted now: {reason}",
            keys_file=self._path,
            reason=reason,
        )

    def _poll(self) -> None:
        """
        Reload if the keys file is not the one last read.  Nothing escapes:
        an exception would stop the polling for good.
        """
        try:
            if _signature(self._path) != self._signature:
                self.reload()
        except Exception:
            log.failure("Checking keys file {keys_file} failed", keys_file=self._path)

    def _on_sighup(self) -> None:
        """
        Reload now (in the reactor thread), unless the service has stopped
        since the signal came.
        """
        if not self.running:
            return
        log.info("SIGHUP: reloading keys from {keys_file}", keys_file=self._path)
        # Asked for: a clash still there is warned of again.
        self._said_unusable = None
        try:
            self.reload()
        except Exception:
            log.failure("Reloading keys file {keys_file} failed", keys_file=self._path)
