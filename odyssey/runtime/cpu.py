"""The CPU as /proc/cpuinfo describes it, and whether it multiplies bf16 natively. No torch, so
the doctor and the benchmark drivers can ask too."""

from __future__ import annotations

import platform


def cpu_flags() -> tuple[str, set[str]]:
    """(CPU model name, flags) from /proc/cpuinfo ("flags" on x86, "Features" on Arm)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def native_bf16(flags: set[str] | None = None) -> bool:
    """True where the CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16). Elsewhere
    bf16 matmuls are emulated and several times slower than fp32 (measured: 20 vs 158 GFLOP/s on
    an AVX2 EPYC), so compute runs in fp32 and bf16 is only the storage format."""
    flags = cpu_flags()[1] if flags is None else flags
    if platform.machine() in ("x86_64", "AMD64"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return "bf16" in flags
