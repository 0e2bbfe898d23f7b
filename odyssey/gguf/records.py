"""Checksums of a GGUF file's pager units, recorded at first use and checked later (the file
carries none and is never written to): the `ChecksumRecords` mixin of `odyssey.gguf.store.GGUFStore`.

On first use the XXH3-128 of each pager unit's bytes is recorded in the cache directory
(odyssey.probe's rules: `ODYSSEY_CACHE_DIR`, else XDG, else ~/.cache/odyssey; `gguf-<key>.json`,
key = real path, size and the header's digest), under an exclusive lock and written atomically;
later reads (the pager thread, the embedding rows, `load_tensors`) are checked against it, so later
corruption is one line (`ChecksumMismatch`, naming the file, the unit and the fix).

The mixin uses the store's `path`, `gf` (the parsed file), `page`, `blocks`, `page_units`,
`_blocks`, `block_rows`, and its `_record_file`, `_record`, `_verified` attributes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from odyssey import atomic
from odyssey.errors import OdysseyError
from odyssey.store.checksum import FAST, buffer_digest, file_digests
from odyssey.store.format import Block, PageUnit, StoreError, Unit, unit_label
from odyssey.store.reader import ChecksumMismatch

RECORD_VERSION = 1


def record_dir() -> Path:
    from odyssey.probe import cache_dir

    return cache_dir()


class ChecksumRecords:
    """Checksum records of a GGUF store's pager units (see the module's docstring)."""

    def _key(self, unit: PageUnit) -> str:
        if isinstance(unit, Block):
            return f"{unit.unit}:{unit.row_start}-{unit.row_end}"
        return str(unit)

    def _label(self, unit: PageUnit) -> str:
        what = unit_label(unit)
        if isinstance(unit, Block):
            what += f", rows {unit.row_start}-{unit.row_end - 1}"
        elif unit == "head":
            what = "final norm"
        return what

    def record_path(self) -> Path:
        """The checksum record of this file in the cache directory: keyed by the real path, the size
        and the digest of the header (metadata and tensor table) as read at first call."""
        if self._record_file is None:
            real = os.path.realpath(self.path)
            with open(self.path, "rb") as f:
                head = f.read(self.gf.data_offset)
            key = f"{real}|{self.gf.size}|{buffer_digest(FAST, head)}"
            self._record_file = record_dir() / f"gguf-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
        return self._record_file

    def _load_record(self) -> dict:
        if self._record is None:
            self._record = self._read_record(self.record_path())
        return self._record

    @staticmethod
    def _read_record(path: Path) -> dict:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            units = d["units"] if d.get("version") == RECORD_VERSION else {}
            return {k: v for k, v in units.items() if isinstance(k, str) and isinstance(v, str)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _save(self, new: dict) -> None:
        """Add digests to the record file: under an exclusive lock (another process may record
        other units), merged with what is there, written atomically. A cache that cannot be
        written costs a re-record next time, nothing else."""
        path = self.record_path()
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic.flocked(path.parent):
                units = self._read_record(path)
                units.update(new)
                atomic.write_json(
                    path,
                    {
                        "version": RECORD_VERSION,
                        "path": os.path.realpath(self.path),
                        "size": self.gf.size,
                        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "units": units,
                    },
                    durable=False,
                )
            self._record = units

    def _mismatch(self, unit: PageUnit) -> ChecksumMismatch:
        return ChecksumMismatch(
            f"{self.path}: {self._label(unit)} does not match the checksum recorded at its first use "
            f"(damaged or changed on disk since); run `odyssey verify {self.path}` and download or convert "
            f"the model again (changed on purpose: delete {self.record_path()})"
        )

    def _check_digest(self, unit: PageUnit, digest: str) -> None:
        key = self._key(unit)
        want = self._load_record().get(key)
        if want is None:
            self._save({key: digest})
        elif want != digest:
            raise self._mismatch(unit)
        self._verified.add(unit)

    def is_verified(self, unit) -> bool:
        return unit in self._verified

    def check_page(self, unit: PageUnit, data) -> None:
        """Check a pager unit's bytes, just read into `data`, against the record (recording them
        the first time); once per unit in this process."""
        if unit in self._verified:
            return
        self._check_digest(unit, buffer_digest(FAST, data))

    def _check_on_disk(self, unit: PageUnit) -> None:
        if unit in self._verified:
            return
        page = self.page(unit)
        try:
            got = file_digests(page.path, (FAST,), start=page.start, stop=page.end)[FAST]
        except OSError as e:
            raise StoreError(
                f"{self.path}: cannot read ({e.strerror or e}); run `odyssey verify {self.path}`"
            ) from None
        self._check_digest(unit, got)

    def check_unit(self, unit: Unit) -> None:
        """Check every pager unit of store unit `unit` on disk (one streaming read each, once)."""
        units = self.blocks(unit) + (["head"] if unit == "head" and "head" in self._blocks else [])
        for u in units:
            self._check_on_disk(u)

    def check_rows(self, unit: Unit, rows) -> None:
        """Check the row blocks of `unit` ("embed") holding `rows` on disk (each once)."""
        blocks = self._blocks[unit]
        for k in sorted({int(r) // self.block_rows[unit] for r in rows}):
            if 0 <= k < len(blocks):
                self._check_on_disk(blocks[k])

    def check_file(self, unit: Unit) -> None:
        self.check_unit(unit)

    def verify(self, progress: bool = True) -> list[str]:
        """Every pager unit's bytes against the record (missing digests recorded now): one problem
        line per bad unit. The structure, every tensor's type, size and range, and the tensors the
        config implies were checked by `open`."""
        from tqdm import tqdm

        problems = []
        units = self.page_units()
        bar = tqdm(total=len(units), desc="verify", disable=not progress, leave=False)
        for u in units:
            try:
                self._check_on_disk(u)
            except OdysseyError as e:
                problems.append(str(e))
            bar.update(1)
        bar.close()
        return problems
