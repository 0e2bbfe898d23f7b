"""Activation spill: what a layer's backward needs, written to disk in its forward and read back
for its backward, instead of recomputing the layer (engine.Engine, `spill` layers).

A budget that holds two layers' activations recomputes the other layers in backward: 6N instead
of 4N FLOP a token (N the parameters), 1.5x the in-RAM step's matmuls. Moving a layer's saved
tensors through the disk costs no FLOP: on a disk that writes and reads them faster than the
layer computes, a spilled layer costs what a kept one does, and RAM holds about one layer's
activations in flight instead of all of them.

How: a spilled layer's forward runs with grad under the same `saved_tensors_hooks` as a kept
layer (saved.SavedWeights); the tensors that are not base weights reach `LayerSpill.pack`, which
returns a handle and keeps the tensor's storage until `seal` hands the layer to a worker thread.
The worker copies each storage (once, however many saved views share it) through a page-aligned
staging buffer into one O_DIRECT file (page cache untouched: the bytes do not count against a
memory cgroup) and drops it. In backward the worker reads the layer back, one layer ahead of the
backward that needs it, into one buffer; `unpack` returns views of it with the saved tensors'
geometry. Small tensors (under MIN_BYTES), leaves that need a gradient (LoRA parameters, the
layer's input) and the tensors shared by every layer (RoPE tables) stay in RAM as they are.

The file is created unlinked (O_TMPFILE) in the spill directory: a crash leaves nothing behind.
Its space is reserved up front for a step (posix_fallocate), so a full disk is an error at the
start, not in the middle of a step. A tensor saved and then changed in place before its layer was
sealed is a RuntimeError, never stale bytes.

The bytes are exact: backward sees bit for bit what the forward saved, so a spilled layer's
gradients equal a kept layer's (tests/test_spill.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch

from odyssey.errors import OdysseyError
from odyssey.planner import SPILL_STAGING

ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in whole pages
STAGING = SPILL_STAGING  # bytes copied and written per pwrite (the planner counts the buffer)
MIN_BYTES = 64 << 10  # smaller saved tensors stay in RAM
PROBE_BYTES = 64 << 20


def round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes whose first byte is page-aligned (a view into a slightly larger one)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip : skip + nbytes]


def _bytes_of(st: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,))


@dataclass(frozen=True)
class SpillHandle:
    """What autograd holds in place of a spilled tensor: its storage's index in the layer, and its
    geometry in its dtype."""

    index: int
    dtype: torch.dtype
    size: tuple
    stride: tuple
    offset: int


@dataclass
class LayerSpill:
    """One spilled layer of one step: the storages its forward saved, where they lie in the file."""

    spill: Spill
    layer: int
    storages: list = field(default_factory=list)  # UntypedStorage until written, then None
    nbytes: list = field(default_factory=list)
    offsets: list = field(default_factory=list)  # file offset of each storage (page-aligned)
    index: dict = field(default_factory=dict)  # storage data_ptr -> index
    pending: list = field(default_factory=list)  # (tensor, its version when saved): checked at seal
    size: int = 0  # the layer's bytes in the file (each storage rounded up to a page)
    start: int = 0  # the layer's first byte in the file
    written: threading.Event = field(default_factory=threading.Event)
    read: threading.Event = field(default_factory=threading.Event)
    blob: torch.Tensor | None = None  # the layer read back (backward)

    def pack(self, t: torch.Tensor):
        if (
            t.layout != torch.strided
            or t.device.type != "cpu"
            or (t.requires_grad and t.is_leaf)
            or t.numel() * t.element_size() < self.spill.min_bytes
        ):
            return t
        st = t.untyped_storage()
        if st.data_ptr() in self.spill.shared:
            return t
        i = self.index.get(st.data_ptr())
        if i is None:
            i = self.index[st.data_ptr()] = len(self.storages)
            self.storages.append(st)
            self.nbytes.append(st.nbytes())
        self.pending.append((t, t._version))
        return SpillHandle(i, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def unpack(self, h):
        if not isinstance(h, SpillHandle):
            return h
        if self.blob is None:
            raise RuntimeError(f"spill: layer {self.layer}'s activations unpacked before they were read back")
        off = self.offsets[h.index] - self.start
        base = self.blob[off : off + self.nbytes[h.index]].view(h.dtype)
        return base.as_strided(h.size, h.stride, base.storage_offset() + h.offset)


class Spill:
    """The spill file of a training run and the worker thread that writes and reads it."""

    def __init__(self, directory, reserve: int = 0, min_bytes: int | None = None):
        self.directory = str(directory)
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise OdysseyError(
                f"spill: cannot create {self.directory} ({e.strerror}); choose --spill-dir elsewhere, or --spill off"
            ) from None
        self.fd, self.direct = open_unlinked(self.directory)
        self.reserved = 0
        self.shared: set[int] = set()  # storages every layer saves (RoPE tables): never spilled
        self.layers: dict[int, LayerSpill] = {}
        self.end = 0  # next free byte of the file this step
        self.bytes_written = 0
        self.bytes_read = 0
        self.wait_s = 0.0  # time the compute waited for the disk
        self._staging = aligned_buffer(STAGING)
        self._staging_np = self._staging.numpy()
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="odyssey-spill", daemon=True)
        self._thread.start()
        if reserve:
            self.reserve(reserve)

    # --- per step ---
    def reserve(self, nbytes: int) -> None:
        """Reserve nbytes of the file (a step's worth) so a full disk fails here, not mid-step."""
        nbytes = round_up(nbytes)
        if nbytes <= self.reserved:
            return
        try:
            os.posix_fallocate(self.fd, 0, nbytes)
        except OSError as e:
            free = shutil.disk_usage(self.directory).free
            raise OdysseyError(
                f"spill: cannot reserve {nbytes / 1e9:.2f} GB for activations in {self.directory} "
                f"({e.strerror}; {free / 1e9:.2f} GB free); free space, choose --spill-dir elsewhere, "
                "or --spill off"
            ) from None
        self.reserved = nbytes

    def begin_step(self, shared=()) -> None:
        self._raise_if_failed()
        self.layers.clear()
        self.end = 0
        self.shared = {t.untyped_storage().data_ptr() for t in shared if isinstance(t, torch.Tensor)}

    def layer(self, i: int) -> LayerSpill:
        ls = self.layers[i] = LayerSpill(self, i)
        return ls

    def seal(self, i: int) -> None:
        """Layer i's forward is done: check its saved tensors were not changed, lay them out in the
        file and hand them to the worker; wait for the layer before it (two layers in flight)."""
        ls = self.layers[i]
        for t, v in ls.pending:
            if t._version != v:
                raise RuntimeError(f"spill: a tensor layer {i} saved for backward was changed in place afterwards")
        ls.pending.clear()
        ls.start = self.end
        for n in ls.nbytes:
            ls.offsets.append(self.end)
            self.end += round_up(n)
        ls.size = self.end - ls.start
        if self.end > self.reserved:
            self.reserve(self.end)
        self._jobs.put(("write", ls))
        prev = self.layers.get(i - 1)
        if prev is not None:
            self._wait(prev.written)

    def prefetch(self, i: int) -> None:
        """Start reading layer i back (backward comes to it next)."""
        ls = self.layers.get(i)
        if ls is not None and ls.blob is None and not ls.read.is_set():
            self._jobs.put(("read", ls))

    def fetch(self, i: int) -> LayerSpill:
        """Layer i read back (waits for the worker)."""
        ls = self.layers[i]
        self.prefetch(i)
        self._wait(ls.read)
        return ls

    def release(self, i: int) -> None:
        ls = self.layers.pop(i, None)
        if ls is not None:
            ls.blob = None

    def take_stats(self) -> dict:
        """Bytes written and seconds waited since the last call (PassStats fields), then zero."""
        out = dict(spill_bytes=self.bytes_written, spill_wait_s=self.wait_s)
        self.bytes_written = self.bytes_read = 0
        self.wait_s = 0.0
        return out

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the worker ---
    def _wait(self, event: threading.Event) -> None:
        if not event.is_set():
            t0 = time.perf_counter()
            while not event.wait(0.05):
                self._raise_if_failed()
            self.wait_s += time.perf_counter() - t0
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            if isinstance(e, OSError):
                raise OdysseyError(
                    f"spill: {'writing' if e.errno != 5 else 'reading'} activations in {self.directory} failed "
                    f"({e.strerror}); free space or choose --spill-dir elsewhere, or --spill off"
                ) from None
            raise RuntimeError(f"spill: the worker failed: {e!r}") from e

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, ls = job
            try:
                if self._error is None:
                    self._write(ls) if kind == "write" else self._read(ls)
            except BaseException as e:  # noqa: BLE001 - reported on the compute thread
                self._error = e
            finally:
                (ls.written if kind == "write" else ls.read).set()

    def _write(self, ls: LayerSpill) -> None:
        stage, addr = self._staging_np, self._staging.data_ptr()
        for k, st in enumerate(ls.storages):
            src, n, off = st.data_ptr(), ls.nbytes[k], ls.offsets[k]
            done = 0
            while done < n:
                m = min(STAGING, n - done)
                ctypes.memmove(addr, src + done, m)  # single-threaded, the GIL released
                w = round_up(m)
                got = os.pwrite(self.fd, memoryview(stage)[:w], off + done)
                if got != w:
                    raise OSError(28, f"short write ({got} of {w} bytes)")
                done += m
            ls.storages[k] = None  # the RAM copy goes: autograd holds the handle
            self.bytes_written += n
        ls.storages.clear()

    def _read(self, ls: LayerSpill) -> None:
        blob = aligned_buffer(max(ls.size, ALIGN))
        view = memoryview(blob.numpy())
        done = 0
        while done < ls.size:
            m = min(16 << 20, ls.size - done)
            got = os.preadv(self.fd, [view[done : done + m]], ls.start + done)
            if got <= 0:
                raise OSError(5, f"short read at {ls.start + done}")
            done += got
        ls.blob = blob
        self.bytes_read += sum(ls.nbytes)


def open_unlinked(directory: str) -> tuple[int, bool]:
    """(fd, direct): a new file in `directory` that has no name (O_TMPFILE, else created and
    unlinked at once), opened O_DIRECT where the file system allows it (not tmpfs: there the
    spill would be RAM anyway, and `auto` never spills: see probe_disk)."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    for direct in (True, False):
        flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
        try:
            if tmpfile:
                try:
                    return os.open(directory, flags | tmpfile, 0o600), direct
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                        raise
            fd, path = tempfile.mkstemp(dir=directory, prefix=".odyssey-spill-")
            os.unlink(path)
            if direct:
                try:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
                except OSError:
                    os.close(fd)
                    continue
            return fd, direct
        except OSError as e:
            if direct and e.errno == errno.EINVAL:  # O_DIRECT refused: try buffered
                continue
            raise OdysseyError(
                f"spill: cannot create a file in {directory} ({e.strerror}); "
                "choose a writable directory on a disk with --spill-dir, or --spill off"
            ) from None
    raise OdysseyError(f"spill: cannot create a file in {directory}; choose another --spill-dir, or --spill off")


def existing(directory: str) -> str:
    """`directory`, or the nearest directory above it that exists (where a run directory not yet
    made will be)."""
    where = directory
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(os.path.abspath(where))
    return where


def probe_disk(directory, nbytes: int = PROBE_BYTES) -> tuple[float, float, bool]:
    """(write, read) bytes/s of I/O in `directory` as the spill does it (STAGING-sized requests),
    and whether it is O_DIRECT; about 0.1 s on an NVMe or virtio disk."""
    fd, direct = open_unlinked(str(directory))
    try:
        buf = aligned_buffer(STAGING)
        buf.random_(0, 256)
        view = memoryview(buf.numpy())
        t0 = time.perf_counter()
        for off in range(0, nbytes, STAGING):
            os.pwrite(fd, view, off)
        os.fsync(fd)
        t1 = time.perf_counter()
        for off in range(0, nbytes, STAGING):
            os.preadv(fd, [view], off)
        t2 = time.perf_counter()
        return nbytes / max(t1 - t0, 1e-9), nbytes / max(t2 - t1, 1e-9), direct
    finally:
        os.close(fd)


# --- whether a run spills (train's `spill: auto | on | off`) ---

STEP_EFFICIENCY = 0.6  # a step's FLOP rate / the probe's matmul rate (1.2B bf16: 0.63, benchmarks/results/peers.md)


def layer_compute_s(cfg, tokens: int, compute: str) -> float:
    """Seconds one decoder layer's forward and backward of `tokens` tokens take, estimated: 4N FLOP
    a token (N the layer's parameters) at STEP_EFFICIENCY of the matmul probe's rate in `compute`
    ("bf16" | "fp32"). What the disk has to keep up with (spill.choose, readmode.choose)."""
    from odyssey.dtypes import numel, probe_for

    layer_params = sum(numel(s) for s in cfg.layer_shapes(0).values())
    return 4 * layer_params * tokens / (probe_for(cfg).gflops[compute] * 1e9 * STEP_EFFICIENCY)


@dataclass(frozen=True)
class SpillChoice:
    on: bool
    why: str  # one line for the start of a run ("" when spill is off by option)
    directory: str = ""


def choose(setting: str, directory, store, *, tokens: int, compute: str, lora, recompute: str = "auto") -> SpillChoice:
    """Whether layers the budget cannot keep in RAM spill their activations to `directory` instead
    of recomputing them. `on` / `off` as said (`--recompute all` turns it off). `auto` measures
    the disk where the spill would go (probe_disk) and spills when a spilled layer's traffic, its
    activations written and read back and its weights read in forward and backward, takes less
    time than computing the layer (4N FLOP a token at STEP_EFFICIENCY of the probe's matmul rate):
    then the disk keeps up with the compute and recomputing (2N more) is what would cost. Never on
    a file system without O_DIRECT (tmpfs: the spill would be RAM), nor with less free space than
    a step spills with every layer spilled and 1 GiB to spare."""
    from odyssey.dtypes import DTYPES, numel
    from odyssey.stepmemory import kept_layer_bytes

    directory = str(directory)
    if setting == "off" or recompute == "all":
        return SpillChoice(False, "")
    if setting == "on":
        return SpillChoice(True, f"spill: on (--spill on), in {directory}", directory)
    cfg = store.config
    ci = DTYPES["bf16" if compute == "bf16" else "f32"].itemsize
    act = kept_layer_bytes(cfg, tokens, tokens, ci, lora) - tokens * cfg.hidden_size * ci
    weights = sum(numel(s) for s in cfg.layer_shapes(0).values()) * DTYPES[store.dtype].itemsize
    step_bytes = act * cfg.num_hidden_layers
    where = existing(directory)  # the run directory may not exist yet: measure where it will be
    try:
        free = shutil.disk_usage(where).free
        if free < step_bytes + (1 << 30):
            return SpillChoice(
                False,
                f"spill: off (auto: {free / 1e9:.1f} GB free in {directory}, "
                f"a step would spill {step_bytes / 1e9:.1f} GB)",
            )
        write, read, direct = probe_disk(where)
    except (OSError, OdysseyError) as e:
        return SpillChoice(
            False, f"spill: off (auto: cannot write in {directory}: {getattr(e, 'strerror', None) or e})"
        )
    if not direct:
        return SpillChoice(
            False, f"spill: off (auto: {directory} takes no O_DIRECT files (tmpfs?): the spill would be RAM)"
        )
    compute_s = layer_compute_s(cfg, tokens, "bf16" if ci == 2 else "fp32")
    io_s = (2 * act + 2 * weights) / min(write, read)
    disk = f"disk {write / 1e6:,.0f} MB/s write, {read / 1e6:,.0f} read in {directory}"
    if io_s > compute_s:
        return SpillChoice(
            False,
            f"spill: off (auto: {disk}; a layer's activations and weights would take {io_s:.2f} s to move, "
            f"longer than its {compute_s:.2f} s of compute)",
        )
    return SpillChoice(
        True,
        f"spill: on (auto: {disk}; a layer's activations and weights move in {io_s:.2f} s, its compute takes "
        f"~{compute_s:.2f} s; --spill off to recompute instead)",
        directory,
    )
