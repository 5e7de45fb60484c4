"""What the runtime takes from a testbed: the launcher of each device, launch options, all-or-none worker start, link shapes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.runtime.launchers import LocalLauncher, WorkerHandle
from edgeshard_kit.runtime.protocol import LinkShape
from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
from edgeshard_kit.testbed import netns
from edgeshard_kit.testbed.inventory import Device, Testbed

LAUNCH_KINDS = ("local", "ssh")


@dataclass(frozen=True)
class LaunchOptions:
    """Keyword options per launch kind: `local` for LocalLauncher, `ssh` for SSHLauncher (e.g. ssh_config, python)."""

    local: dict[str, Any] = field(default_factory=dict)
    ssh: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, opts: "LaunchOptions | dict | None") -> "LaunchOptions":
        """Options as given: a LaunchOptions, a dict {"local": {...}, "ssh": {...}}, or None (none)."""
        if isinstance(opts, LaunchOptions):
            return opts
        unknown = set(opts or {}) - set(LAUNCH_KINDS)
        if unknown:
            raise KitError(f"launch options: unknown launch kinds {sorted(unknown)} (local or ssh)")
        return cls(**{k: dict(v or {}) for k, v in (opts or {}).items()})

    def for_kind(self, launch: str) -> dict[str, Any]:
        """The options of one launch kind ({} for a kind without options)."""
        return dict(getattr(self, launch)) if launch in LAUNCH_KINDS else {}

    def to_dict(self) -> dict:
        return {k: dict(getattr(self, k)) for k in LAUNCH_KINDS if getattr(self, k)}


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


def start_workers(devices: list[Device], token: bytes, opts: LaunchOptions) -> list[WorkerHandle]:
    """One worker per device, started in parallel, in order; if any fails, the others are stopped and it raises."""
    def start(dev: Device) -> WorkerHandle:
        return launcher_for(dev, **opts.for_kind(dev.launch)).start(dev, token)

    handles: list[WorkerHandle] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as ex:
        for fut in [ex.submit(start, d) for d in devices]:
            try:
                handles.append(fut.result())
            except Exception as e:
                errors.append(e)
    if errors:
        for h in handles:
            h.stop(3.0)
        raise errors[0]
    return handles


def link_shape(testbed: Testbed, src: str, dst: str) -> LinkShape | None:
    """The app-level shaping of src -> dst for its sender; None when the testbed is not app-emulated or the link is free."""
    if testbed.emulation != "app" or src == dst:
        return None
    ln = testbed.link(src, dst)
    if not ln.shaped and not ln.latency_ms:
        return None
    return LinkShape(ln.mbps if ln.shaped else None, ln.latency_ms)
