"""The light side of Odyssey: what runs beside training and must never import torch.

The guard and the monitor are separate processes that watch a trainer; `import torch` alone costs
about 220 MB of RSS, which they would take from the very budget they watch. Every module here
imports only the standard library, psutil, `odyssey.config`, `odyssey.errors`, `odyssey.atomic`,
`odyssey.dtypes` and each other at import time (tests/test_runtime.py imports each one with torch
made unimportable):

  runlog     the run directory (metrics.jsonl, control.json, status.json, guard.json)
  control    the trainer's side of the control channel, and the guard's launcher
  guard      the guard process (`python -m odyssey.runtime.guard`): policies; sensors (temperature,
             MemAvailable); guard_cli (its options, parser and main)
  memory     memory readings of a process tree, its cgroup and the system; /proc/PID/stat
  cgroup     memory cgroups: a hard RAM cap around a process
  allocator  jemalloc when present, else glibc with fewer arenas
  cpu        the CPU as /proc/cpuinfo describes it
  fact       one line of `odyssey doctor`: a reading, its verdict, what to do
  doctor     `odyssey doctor` (its torch fact imports torch inside the function, when it runs)
  doctor_compute  doctor's cpu fact and compute fact (the compute probe, odyssey.probe, imports
             torch inside the function, when it runs)
"""
