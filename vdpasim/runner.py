"""Data-path threads: wait for kicks (epoll on eventfds) or busy-poll, run the device's kernels, signal calls.

One thread per device. The control plane never touches a queue while a kernel runs: it calls
``pause()``, which returns once the thread is parked between bursts (kernels only ever leave a
queue between two chains, so nothing is lost or processed twice), and ``resume()`` afterwards.

Busy-polling kernels may spin for many bursts in one call: they watch ``interrupt[0]``, which every
control-plane request (pause, stop, wake) raises and the thread lowers before it looks at the
requests again, so a request made at any moment either sees the thread park or stops the spin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

__all__ = ["DataPath", "Processor", "signal"]

log = logging.getLogger("vdpasim.runner")


class Processor(Protocol):
    name: str

    def active_queues(self) -> list[tuple[int, int]]:
        """(queue index, kick fd) of every queue the thread should serve now."""

    def process(self, idx: int) -> bool:
        """Serve queue ``idx``; True if work may remain (budget exhausted)."""


class DataPath:
    def __init__(self, device: Processor, *, busy_poll: bool = False) -> None:
        self.device = device
        self.busy_poll = busy_poll
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.interrupt = np.zeros(1, dtype=np.int64)  # non-zero: a compiled polling loop must return
        self._state = threading.Condition()
        self._pause_requests = 0
        self._parked = False
        self._stopping = False
        self._running = False  # the thread is in _run (False once it returned, even after a crash)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # Test-only fault hook: the next burst raises this instead of serving (a data-path thread that
        # crashes with a bug). Set by tests, or through the daemon's ``test_fault`` control operation.
        self.inject_fault: BaseException | None = None

    # --- control side ---
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._running = True
            self._thread = threading.Thread(target=self._run, name=f"vdpasim-dp-{self.device.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._state:
            self._stopping = True
            self._state.notify_all()
        self.wake()
        if thread is not threading.current_thread():
            thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
        os.close(self._wake)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the data path between bursts; nested and cross-thread safe."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def pause(self) -> None:
        with self._state:
            self._pause_requests += 1
            if self._thread is None or self._thread is threading.current_thread():
                return
            self.wake()
            self._state.wait_for(lambda: self._parked or self._thread is None or not self._running)

    def resume(self) -> None:
        with self._state:
            self._pause_requests -= 1
            self._state.notify_all()
        self.wake()  # queues may have changed: rebuild the epoll set

    def wake(self) -> None:
        """Make the thread re-read its queues (and requests): end a wait or a compiled polling loop."""
        self.interrupt[0] = 1
        os.eventfd_write(self._wake, 1)

    # --- thread side ---
    def _park_if_asked(self) -> bool:
        """Block while paused; False once stopping."""
        self.interrupt[0] = 0  # before reading the requests: one raised after this is seen by the kernels
        with self._state:
            if self._pause_requests and not self._stopping:
                self._parked = True
                self._state.notify_all()
                self._state.wait_for(lambda: not self._pause_requests or self._stopping)
                self._parked = False
            return not self._stopping

    def _run(self) -> None:
        try:
            while self._park_if_asked():
                queues = self.device.active_queues()
                if self.busy_poll:
                    self._poll_once(queues)
                else:
                    self._wait_and_serve(queues)
        except BaseException as exc:  # a bug in a device must not pass silently, nor take others down
            self.error = exc
            log.exception("data path of %s stopped", self.device.name)
            crashed = getattr(self.device, "datapath_crashed", None)
            if crashed is not None:
                try:
                    crashed(exc)  # the device goes NEEDS_RESET; a reset starts a new thread
                except Exception:
                    log.exception("%s: reporting the crash failed", self.device.name)
        finally:
            with self._state:
                self._running = False  # nobody may wait for this thread to park any more
                self._state.notify_all()

    def _serve(self, idx: int) -> None:
        if self.inject_fault is not None:
            fault, self.inject_fault = self.inject_fault, None
            raise fault
        budget = 64  # bursts per wake-up before giving other queues and the control plane a turn
        while self.device.process(idx) and budget:
            budget -= 1

    def _poll_once(self, queues: list[tuple[int, int]]) -> None:
        if not queues:
            # Nothing to poll (not started yet, or NEEDS_RESET): sleep until the control plane changes.
            select.select([self._wake], [], [], 0.1)
            _drain(self._wake)
        for idx, _ in queues:
            self._serve(idx)

    def _wait_and_serve(self, queues: list[tuple[int, int]]) -> None:
        poller = select.epoll()
        try:
            poller.register(self._wake, select.EPOLLIN)
            by_fd: dict[int, list[int]] = {}
            for idx, fd in queues:
                by_fd.setdefault(fd, []).append(idx)
            for fd in by_fd:
                poller.register(fd, select.EPOLLIN)
            # Serve once at start: kicks may have arrived before the queue was watched.
            for idx, _ in queues:
                self._serve(idx)
            while True:
                events = poller.poll()
                for fd, _ in events:
                    _drain(fd)
                    if fd == self._wake:
                        return  # control-plane change: re-read the queue set
                    for idx in by_fd.get(fd, ()):
                        self._serve(idx)
        finally:
            poller.close()


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        os.eventfd_read(fd)


def signal(call: int | Callable[[], None] | None) -> None:
    """Notify the driver: write its call eventfd, or run an in-process callback."""
    if call is None:
        return
    if callable(call):
        call()
    else:
        with contextlib.suppress(OSError):
            os.eventfd_write(call, 1)
