"""The pipe other threads write to, to wake an I/O thread out of its poll."""

from __future__ import annotations

import os
import threading


class WakePipe:
    """``wake()`` from any thread makes ``fd`` readable; the I/O thread ``drain()``s it
    before it looks at what it was woken for. Writes stop at ``close()``: a closed
    descriptor's number may name any file opened since (a finalizer, or a second
    shutdown, still wakes a finished I/O thread), so never write to it then."""

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        self.pending = False  # a byte is on its way: later wakes need not write
        self._lock = threading.Lock()  # guards _write_fd against close()

    def wake(self, force: bool = False) -> None:
        """``force``: write even if a wake is pending (the caller may have taken the
        signal the I/O thread waits on, with a socket operation of its own)."""
        if force or not self.pending:
            self.pending = True
            with self._lock:
                if self._write_fd < 0:
                    return
                try:
                    os.write(self._write_fd, b"x")
                except OSError:  # the read end is closed: the I/O thread is finishing
                    pass

    def drain(self) -> None:
        """Take every byte written, then accept the next wake. (A wake that found
        ``pending`` still set before this returned is for work the caller looks at
        next; one after it writes again.)"""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        self.pending = False

    def close(self) -> None:
        with self._lock:
            os.close(self._write_fd)
            self._write_fd = -1
        os.close(self.fd)
