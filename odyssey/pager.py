"""The pager: layer bytes from disk into a fixed pool of page-aligned buffers, one unit ahead.

A *unit* is what one read fills: a decoder layer's shard (its index), a small shard read whole
("head" of a tied model, or "embed"/"head" when the matrix fits one block), or a row block of the
embedding or of an untied head (`store.Block`, shown `head[3/5]`), a byte range of its shard
(`Store.page`). The consumer (the engine)
announces a schedule of units with `prefetch(units)` and then calls `get(unit)` in exactly that
order; a background thread reads ahead into free slots with large `preadv` calls (optionally
O_DIRECT), and after each read drops the file's pages from the page cache (the bytes now live in
our buffer; keeping a second copy in the cache would double RAM use).

A unit still sitting in a slot is not read again: the last layer of a forward pass is the first of
the backward pass, and layer 0 of one step's backward is layer 0 of the next step's forward.

Pinned units (`pinned`, chosen by the planner: residency.py) each get a buffer of their own, are
read once on first use, in schedule order like any unit, and are never evicted or read again; the
slots serve the rest. `get` of a pinned unit after its read is counted `reused`.

`get` returns a `Resident` whose tensors are zero-copy views (`torch.frombuffer`) of the slot, in
the store dtype. They are valid until `release`; after that the slot may be overwritten. A GGUF
file's store makes its own views (`tensor_view`): its quantized matrices are `QWeight`s holding the
slot's bytes (odyssey.gguf.qweight), dequantized by the engine one matrix at a time.
The pool never grows: `slots` buffers of the largest unit (`Store.max_page_bytes`: the largest
decoder layer, since the embedding and head are read in blocks no larger), allocated once.

Each unit's bytes are checked against the store's checksum the first time they are read (a whole
shard against the shard's digest, a row block against its own: one pass of XXH3-128, about 23 GB/s,
on the reader thread, which releases the GIL); later reads of a unit the store has verified are not
hashed again. A mismatch is raised in the consumer's `get` as `ChecksumMismatch`, naming the shard.
"""

from __future__ import annotations

import collections
import mmap
import os
import threading
import time
from dataclasses import dataclass, field

from odyssey.dtypes import PAGE_SIZE, ST_CODES
from odyssey.store import BLOCKED_TENSORS, Block, Page, PageUnit, Store, StoreError, unit_label

READ_CHUNK = 16 << 20  # bytes per preadv call: large enough to reach the disk's sequential rate


def _aligned(page: Page) -> tuple[int, int]:
    """(file offset, length) of the page-aligned range holding `page` (what a read covers)."""
    a0 = page.start // PAGE_SIZE * PAGE_SIZE
    return a0, -(-(page.end - a0) // PAGE_SIZE) * PAGE_SIZE


def unit_buffer_bytes(store: Store, unit: PageUnit) -> int:
    """Bytes of a buffer that holds `unit` (its page-aligned range): a slot's share, or a pinned
    unit's own buffer."""
    return _aligned(store.page(unit))[1]


def slot_bytes(store: Store) -> int:
    """Bytes of one pager slot for `store`: the largest unit's page-aligned range."""
    return max(_aligned(store.page(u))[1] for u in store.page_units())


@dataclass
class UnitStat:
    unit: PageUnit
    bytes: int
    read_s: float  # seconds the reader spent reading (0 when the unit was still resident)
    stall_s: float  # seconds the consumer waited in get()
    reused: bool = False

    @property
    def mb_s(self) -> float:
        return self.bytes / 1e6 / self.read_s if self.read_s > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "layer": str(self.unit) if isinstance(self.unit, Block) else self.unit,  # "head[3/5]"
            "bytes": self.bytes,
            "read_s": round(self.read_s, 5),
            "stall_s": round(self.stall_s, 5),
            "mb_s": round(self.mb_s, 1),
            "reused": self.reused,
        }


@dataclass
class PassStats:
    """Figures of one pass (forward, or a training step) for metrics and the monitor."""

    seconds: float = 0.0
    pagein_bytes: int = 0
    read_s: float = 0.0
    stall_s: float = 0.0
    layers: list = field(default_factory=list)  # UnitStat.to_json() per unit
    pinned_units: int = 0  # units the pager keeps resident across steps
    pinned_bytes: int = 0  # their buffers
    kept_layers: int = 0  # last layers that keep activations in training (no recompute)
    spilled_layers: int = 0  # layers before them that keep theirs on disk (spill.py)
    spill_bytes: int = 0  # bytes those wrote to the spill file (and read back) in the pass
    spill_wait_s: float = 0.0  # seconds the compute waited for the spill's disk
    units: int = 0  # units the pass used
    unit_bytes: int = 0  # their bytes (paged-in + already resident)

    @property
    def pagein_mb_s(self) -> float:
        return self.pagein_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, st: list[UnitStat], seconds: float, pager, **more) -> PassStats:
        """The figures of a pass from its units' stats and the pager's pins (`more`: the rest)."""
        return cls(
            seconds=seconds,
            pagein_bytes=sum(s.bytes for s in st if not s.reused),
            read_s=sum(s.read_s for s in st),
            stall_s=sum(s.stall_s for s in st),
            layers=[s.to_json() for s in st],
            pinned_units=len(getattr(pager, "pinned_units", ())),
            pinned_bytes=getattr(pager, "pinned_bytes", 0),
            units=len(st),
            unit_bytes=sum(s.bytes for s in st),
            **more,
        )


@dataclass
class _Slot:
    index: int
    buf: mmap.mmap  # anonymous, page-aligned, size = largest unit's aligned range
    unit: PageUnit | None = None  # what the buffer holds (also after release, until overwritten)
    delta: int = 0  # bytes from the buffer's start to the unit's first byte (reads start page-aligned)
    ready: bool = False
    refs: int = 0  # gets served and not yet released
    pending: int = 0  # scheduled gets that will be served from this slot
    released_at: float = 0.0
    read_s: float = 0.0
    reused_flags: collections.deque = field(default_factory=collections.deque)
    pinned: bool = False  # a pinned unit's own buffer: read once, never given to another unit


@dataclass
class Resident:
    unit: PageUnit
    tensors: dict  # HF name -> torch tensor view of the slot (store dtype)
    slot: int


class Pager:
    def __init__(
        self,
        store: Store,
        slots: int = 2,
        direct: bool = False,
        read_chunk: int = READ_CHUNK,
        drop_cache: bool = True,
        verify: bool = True,
        pinned=(),
    ):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.store = store
        self.direct = direct
        self.direct_fallback: str | None = None  # why O_DIRECT was refused, if it was
        self.read_chunk = read_chunk
        self.drop_cache = drop_cache
        self.verify = verify  # check each unit's bytes against the store's checksum on first read
        size = slot_bytes(store)
        self.slot_bytes = size
        self._slots = [_Slot(i, mmap.mmap(-1, size)) for i in range(slots)]
        # Pinned units: a buffer of its own each (anonymous: no RAM until the unit is read into it),
        # filled on first use and kept until close. The slots above are never touched when every
        # unit a schedule asks for is pinned.
        self._pinned: dict = {}
        for u in pinned:
            if u not in self._pinned:
                slot = _Slot(len(self._slots), mmap.mmap(-1, unit_buffer_bytes(store, u)), pinned=True)
                self._slots.append(slot)
                self._pinned[u] = slot
        self.nslots = slots
        self._queue: collections.deque = collections.deque()  # units the reader has yet to place
        self._order: collections.deque = collections.deque()  # (unit, slot) in get() order
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self.stats: list[UnitStat] = []
        self._thread = threading.Thread(target=self._reader, name="odyssey-pager", daemon=True)
        self._thread.start()

    # --- consumer side ---
    def prefetch(self, units) -> None:
        """Append units to the schedule; get() must then be called in the same order."""
        with self._cv:
            self._queue.extend(units)
            self._cv.notify_all()

    def get(self, unit: PageUnit) -> Resident:
        t0 = time.perf_counter()
        with self._cv:
            if not self._queue and not self._order:
                self._queue.append(unit)  # unscheduled: fetch now
                self._cv.notify_all()
            while True:
                self._raise_if_failed()
                if self._order:
                    u, slot = self._order[0]
                    if u != unit:
                        raise RuntimeError(f"pager: get({unit!r}) out of schedule order (next is {u!r})")
                    if slot.ready and slot.unit == unit:
                        break
                self._cv.wait()
            self._order.popleft()
            slot.pending -= 1
            slot.refs += 1
            reused = slot.reused_flags.popleft()
            stall = time.perf_counter() - t0
            nbytes = self.store.page(unit).nbytes
            self.stats.append(UnitStat(unit, nbytes, 0.0 if reused else slot.read_s, stall, reused))
        return Resident(unit, self._views(slot, unit), slot.index)

    def release(self, res: Resident) -> None:
        with self._cv:
            slot = self._slots[res.slot]
            slot.refs -= 1
            slot.released_at = time.perf_counter()
            self._cv.notify_all()

    def take_stats(self) -> list[UnitStat]:
        with self._cv:
            out, self.stats = self.stats, []
        return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)
        for s in self._slots:
            try:
                s.buf.close()
            except BufferError:  # views still alive somewhere: let the GC unmap it
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def pool_bytes(self) -> int:
        return self.slot_bytes * self.nslots

    @property
    def pinned_units(self) -> list:
        """The pinned units (read or not yet)."""
        return list(self._pinned)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the pinned units' buffers."""
        return sum(len(s.buf) for s in self._pinned.values())

    def is_pinned(self, unit: PageUnit) -> bool:
        return unit in self._pinned

    def drop_pinned(self, unit: PageUnit) -> None:
        """Give the pages of a pinned unit's buffer back to the OS once nothing uses them (the engine
        holds a converted copy); a later get of the unit reads it again into the same buffer."""
        with self._cv:
            slot = self._pinned[unit]
            if slot.refs or slot.pending:
                return
            slot.unit, slot.ready = None, False
            slot.buf.madvise(mmap.MADV_DONTNEED)

    # --- views ---
    def _views(self, slot: _Slot, unit: PageUnit) -> dict:
        import math

        import torch

        out = {}
        view = getattr(self.store, "tensor_view", None)  # a GGUF file: quantized matrices (odyssey.gguf.store)
        for name, (offset, st, shape) in self.store.page(unit).tensors.items():
            if view is not None:
                out[name] = view(name, slot.buf, slot.delta + offset, st, shape)
                continue
            dt = ST_CODES[st].torch()
            t = torch.frombuffer(slot.buf, dtype=dt, count=math.prod(shape), offset=slot.delta + offset)
            out[name] = t.view(shape)
        return out

    # --- reader side ---
    def _raise_if_failed(self):
        if self._error is not None:
            raise self._error

    def _reader(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._queue:
                        self._cv.wait()
                    if self._closed:
                        return
                    unit = self._queue[0]
                    # Still in a slot (in use or released but not overwritten)? Serve from there.
                    slot = next((s for s in self._slots if s.unit == unit and (s.ready or s.pending)), None)
                    if slot is not None:
                        self._queue.popleft()
                        slot.pending += 1
                        slot.reused_flags.append(True)
                        self._order.append((unit, slot))
                        self._cv.notify_all()
                        continue
                    # A pinned unit's first read goes to its own buffer. Otherwise wait for a free
                    # slot; take the one released longest ago, sparing slots that hold a unit
                    # scheduled again soon.
                    slot = self._pinned.get(unit)
                    while slot is None and not self._closed:
                        free = [s for s in self._slots if s.refs == 0 and s.pending == 0 and not s.pinned]
                        if free:
                            soon = set(list(self._queue)[1 : self.nslots + 1])
                            free.sort(key=lambda s: (s.unit in soon, s.released_at))
                            slot = free[0]
                            break
                        self._cv.wait()
                    if self._closed:
                        return
                    self._queue.popleft()
                    slot.unit, slot.ready = unit, False
                    slot.pending += 1
                    slot.reused_flags.append(False)
                    self._order.append((unit, slot))
                t0 = time.perf_counter()
                try:
                    self._read(unit, slot)  # outside the lock: the consumer keeps computing
                except OSError as e:  # the shard went missing or unreadable since the store was opened
                    name, root = self.store.page(unit).path.name, self.store.root
                    raise StoreError(
                        f"store {root}: cannot read shard {name} ({e.strerror or e}); run `odyssey verify {root}`"
                    ) from None
                with self._cv:
                    slot.read_s = time.perf_counter() - t0
                    slot.ready = True
                    self._cv.notify_all()
        except BaseException as e:  # surface in the consumer thread
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _open(self, path) -> int:
        if self.direct and self.direct_fallback is None:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError) as e:
                self.direct_fallback = f"O_DIRECT refused ({e}); using buffered reads"
        return os.open(path, os.O_RDONLY)

    def _read(self, unit: PageUnit, slot: _Slot) -> None:
        page = self.store.page(unit)
        a0, aligned = _aligned(page)  # the read starts on a page boundary (O_DIRECT needs it)
        if aligned > len(slot.buf):
            raise RuntimeError(
                f"pager: {unit_label(unit)} ({page.nbytes} bytes) does not fit a slot ({len(slot.buf)} bytes); "
                f"page it in row blocks (Store.blocks)"
            )
        slot.delta = page.start - a0
        size = page.end - a0  # bytes needed from a0
        fd = self._open(page.path)
        try:
            view = memoryview(slot.buf)
            direct = self.direct and self.direct_fallback is None
            want = aligned if direct else size  # O_DIRECT: whole pages
            off = 0
            while off < want:
                n = min(self.read_chunk, want - off)
                try:
                    got = os.preadv(fd, [view[off : off + n]], a0 + off)
                except OSError as e:
                    if direct and off == 0:  # filesystem accepted the flag but not the read
                        self.direct_fallback = f"O_DIRECT read failed ({e}); using buffered reads"
                        os.close(fd)
                        fd = os.open(page.path, os.O_RDONLY)
                        direct, want = False, size
                        continue
                    raise
                if got == 0:
                    break
                off += got
            if off < size:
                raise StoreError(
                    f"store {self.store.root}: shard {page.path.name} is shorter than its header says ({a0 + off} "
                    f"of {page.end} bytes: truncated on disk); run `odyssey verify {self.store.root}`"
                )
            if self.drop_cache and not direct:
                os.posix_fadvise(fd, a0, want, os.POSIX_FADV_DONTNEED)
            if self.verify:
                with view[slot.delta : slot.delta + page.nbytes] as data:
                    self.store.check_page(unit, data)  # no-op once the store has verified the unit
            view.release()
        finally:
            os.close(fd)


class ResidentPager:
    """Every shard loaded once and kept in RAM: the in-RAM baseline with the pager's interface (a
    row block is a view of its rows)."""

    def __init__(self, store: Store):
        self.store = store
        self._tensors = {u: store.load_tensors(u) for u in store.units}
        self.stats: list[UnitStat] = []
        self.pool_bytes = store.total_bytes()

    def prefetch(self, units) -> None:
        pass

    def get(self, unit: PageUnit) -> Resident:
        page = self.store.page(unit)
        self.stats.append(UnitStat(unit, page.nbytes, 0.0, 0.0, True))
        if not isinstance(unit, Block):  # the page's tensors (a GGUF's "head" is the norm alone)
            return Resident(unit, {n: t for n, t in self._tensors[unit].items() if n in page.tensors}, -1)
        whole = self._tensors[unit.unit]
        rows = BLOCKED_TENSORS[unit.unit]
        views = {n: whole[n][unit.row_start : unit.row_end] if n == rows else whole[n] for n in page.tensors}
        return Resident(unit, views, -1)

    def release(self, res: Resident) -> None:
        pass

    def take_stats(self) -> list[UnitStat]:
        out, self.stats = self.stats, []
        return out

    def close(self) -> None:
        self._tensors.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
