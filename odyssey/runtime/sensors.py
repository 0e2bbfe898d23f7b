"""What the guard reads each sample, apart from the process tree (`memory`): the CPU temperature,
MemAvailable and swap, and the `Sample` it assembles. No torch."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from odyssey.runtime import memory


def read_millidegrees(path: str | os.PathLike) -> float | None:
    """A sysfs-style temperature file ("51000\\n" = 51.0 C) -> degrees C, or None if unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64).strip()
        value = float(raw) / 1000.0
    except (OSError, ValueError):
        return None
    return value if -50.0 < value < 200.0 else None


class Thermometer:
    """CPU temperature in degrees C, or None when unavailable (normal on VMs; nothing breaks).

    Source, chosen once: the given file; else psutil.sensors_temperatures() (the hottest CPU-ish
    sensor); else the hottest /sys/class/thermal/thermal_zone*/temp; else none."""

    CPU_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal", "acpitz", "thinkpad")

    def __init__(self, thermal_file: str | None = None):
        self.thermal_file = thermal_file
        self.zones: list[str] = []
        if thermal_file:
            self.source = f"file {thermal_file}"
        elif self._psutil() is not None:
            self.source = "psutil"
        else:
            self.zones = sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp"))
            self.source = "sysfs thermal zones" if self.zones else "none"

    def _psutil(self) -> float | None:
        try:
            import psutil

            sensors = psutil.sensors_temperatures()  # {} on VMs
        except (AttributeError, OSError, RuntimeError):
            return None
        if not sensors:
            return None
        names = [n for n in sensors if n in self.CPU_SENSORS] or list(sensors)
        values = [e.current for n in names for e in sensors[n] if e.current is not None and e.current > -50]
        return max(values) if values else None

    def read(self) -> float | None:
        if self.thermal_file:
            return read_millidegrees(self.thermal_file)
        if self.source == "psutil":
            return self._psutil()
        values = [v for v in (read_millidegrees(z) for z in self.zones) if v is not None]
        return max(values) if values else None


HAS_PROC = os.path.exists("/proc/self/stat")


def system_memory() -> tuple[int, int]:
    """(MemAvailable, swap in use) in bytes, from one read of /proc/meminfo."""
    try:
        fields = {}
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"MemAvailable", b"SwapTotal", b"SwapFree"):
                    fields[key] = int(rest.split()[0]) * 1024
        return fields[b"MemAvailable"], fields[b"SwapTotal"] - fields[b"SwapFree"]
    except (OSError, KeyError, ValueError, IndexError):
        return memory.system_available_bytes(), memory.swap_used_bytes()


@dataclass
class Sample:
    t: float
    anon_bytes: int
    """RssAnon summed over the watched tree (what the budget bounds), less LazyFree where that was
    read (lazy_bytes)."""
    file_bytes: int
    """RssFile + RssShmem summed over the tree (reclaimable)."""
    available_bytes: int
    """System MemAvailable."""
    swap_used_bytes: int
    cgroup_bytes: int | None = None
    """Usage of the tree's memory cgroup (anon + page cache), None when in the root group."""
    cgroup_limit_bytes: int | None = None
    temp_c: float | None = None
    lazy_bytes: int | None = None
    """LazyFree summed over the tree, left out of anon_bytes; None when not read."""
