"""What the runtime takes from a testbed: the launcher of each device, launch options, all-or-none worker start, link shapes."""

from __future__ import annotations

import math
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.runtime.launchers import POLL_S, LocalLauncher, WorkerHandle
from edgeshard_kit.runtime.protocol import SILENCE_S, LinkShape
from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
from edgeshard_kit.testbed import netns
from edgeshard_kit.testbed.inventory import Device, Testbed

LAUNCH_KINDS = ("local", "ssh")


@dataclass(frozen=True)
class LaunchOptions:
    """Keyword options per launch kind: `local` for LocalLauncher, `ssh` for SSHLauncher (e.g. ssh_config, python).

    `silence_s`: the silence bound in seconds, in every phase: a worker whose process stays stopped this long
    before it listens, or that sends nothing (no frame, no PROGRESS, no PONG) this long afterwards, is reported.
    """

    local: dict[str, Any] = field(default_factory=dict)
    ssh: dict[str, Any] = field(default_factory=dict)
    silence_s: float = SILENCE_S

    @classmethod
    def of(cls, opts: "LaunchOptions | dict | None") -> "LaunchOptions":
        """Options as given: a LaunchOptions, a dict {"local": {...}, "ssh": {...}, "silence_s": s}, or None (none)."""
        if isinstance(opts, LaunchOptions):
            return opts
        opts = dict(opts or {})
        silence = opts.pop("silence_s", SILENCE_S)
        if isinstance(silence, bool) or not isinstance(silence, (int, float)) or not math.isfinite(silence) \
                or silence <= 0:
            raise KitError(f"launch options: silence_s must be a number of seconds > 0, got {silence!r}")
        unknown = set(opts) - set(LAUNCH_KINDS)
        if unknown:
            raise KitError(f"launch options: unknown launch kinds {sorted(unknown)} (local or ssh)")
        return cls(**{k: dict(v or {}) for k, v in opts.items()}, silence_s=float(silence))

    def for_kind(self, launch: str) -> dict[str, Any]:
        """The options of one launch kind ({} for a kind without options)."""
        return dict(getattr(self, launch)) if launch in LAUNCH_KINDS else {}

    def to_dict(self) -> dict:
        out: dict[str, Any] = {k: dict(getattr(self, k)) for k in LAUNCH_KINDS if getattr(self, k)}
        if self.silence_s != SILENCE_S:
            out["silence_s"] = self.silence_s
        return out


def default_launch_options(testbed: Testbed) -> LaunchOptions:
    """How to reach the devices when the caller says nothing: an emulated (netns) testbed's SSH options, else none."""
    if testbed.emulation == "netns":
        return LaunchOptions.of(netns.launch_opts(testbed))  # KitError when the testbed is not up
    return LaunchOptions()


def launcher_for(device: Device, **opts: Any) -> LocalLauncher | SSHLauncher:
    """The launcher for `device.launch`: LocalLauncher for "local", SSHLauncher for "ssh"."""
    if device.launch == "local":
        return LocalLauncher(**opts)
    if device.launch == "ssh":
        return SSHLauncher(**opts)
    raise KitError(f"device {device.name}: unknown launch {device.launch!r} (local or ssh)")


class StartError(KitError):
    """Worker `index` (in the order given to start_workers) did not start, or `ready` failed for it: `cause`."""

    def __init__(self, index: int, cause: BaseException):
        super().__init__(str(cause))
        self.index, self.cause = index, cause


def start_workers(devices: list[Device], token: bytes, opts: LaunchOptions,
                  ready: Callable[[int, WorkerHandle], None] | None = None,
                  watch: Callable[[], None] | None = None) -> list[WorkerHandle]:
    """One worker per device, started in parallel; the handles in the devices' order.

    `ready(i, handle)` runs in worker i's starting thread as soon as it listens (the coordinator connects there);
    `watch()` runs in the caller's thread every POLL_S while workers start (it raises to give up). All or none:
    at the first failure (a StartError naming the index, or what `watch` raised) the workers still starting give
    up, the started ones are stopped, and it raises without waiting for the slowest.
    """
    abort, lock = threading.Event(), threading.Lock()
    handles: list[WorkerHandle | None] = [None] * len(devices)

    def start(i: int, dev: Device) -> None:
        kw = {"silence_s": opts.silence_s, **opts.for_kind(dev.launch)}
        h = launcher_for(dev, **kw).start(dev, token, abort=abort)
        with lock:
            late = abort.is_set()
            if not late:
                handles[i] = h
        if late:  # the caller gave up meanwhile: this one is not in its list
            h.stop(3.0)
            return
        if ready is not None:
            ready(i, h)

    ex = ThreadPoolExecutor(max_workers=max(1, len(devices)), thread_name_prefix="edgeshard-start")
    futures = {ex.submit(start, i, d): i for i, d in enumerate(devices)}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is not None:
                    raise StartError(futures[fut], fut.exception())
            if watch is not None:
                watch()
    except BaseException:
        abort.set()
        with lock:
            started = [h for h in handles if h is not None]
        for h in started:
            h.stop(3.0)
        ex.shutdown(wait=False, cancel_futures=True)  # the threads still starting see `abort` and clean up
        raise
    ex.shutdown()
    return list(handles)


def link_shape(testbed: Testbed, src: str, dst: str) -> LinkShape | None:
    """The app-level shaping of src -> dst for its sender; None when the testbed is not app-emulated or the link is free."""
    if testbed.emulation != "app" or src == dst:
        return None
    ln = testbed.link(src, dst)
    if not ln.shaped and not ln.latency_ms:
        return None
    return LinkShape(ln.mbps if ln.shaped else None, ln.latency_ms)
