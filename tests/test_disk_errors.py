"""A full disk and a read-only file system, for real (tmpfs mounts; needs root, as CI has): every
command that writes ends in one line naming the cause and the fix, exit 2, no traceback, no
temporary file left behind and nothing under a final name that is not complete."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT, assert_user_error, run_cli


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs directory mounted with those options; unmounted afterwards."""
    points = []

    def make(options: str):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if p.returncode != 0:
            pytest.skip(f"this machine refuses tmpfs mounts: {p.stderr.decode().strip()}")
        points.append(point)
        return point

    yield make
    for point in points:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def leftovers(root) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("inodes", [3, 5, 7])
def test_init_on_a_full_disk_is_one_line_and_reruns(mount, inodes):
    """The disk fills up mid-write (no inodes left after a few files): one line, the journal keeps
    the finished shards, no temporary file is left, no index (the store is not complete)."""
    disk = mount(f"size=128m,nr_inodes={inodes}")
    p = run_cli("init", "--config", ROOT / "configs/nano.yaml", "--out", disk / "m")
    assert_user_error(p, "disk is full", "--out")
    assert leftovers(disk) == []
    assert not (disk / "m" / "model.safetensors.index.json").exists()


def test_read_only_outputs_are_one_line(mount, tiny_store, tmp_path):
    ro = mount("ro,size=128m")
    p = run_cli("init", "--config", ROOT / "configs/nano.yaml", "--out", ro / "m")
    assert_user_error(p, "read-only", "--out")
    p = run_cli("export", tiny_store, "--out", ro / "e", "--formats", "safetensors")
    assert_user_error(p, "read-only", "--out")
    corpus = tmp_path / "c.txt"
    corpus.write_text("one story.\n\nanother story.\n" * 50)
    p = run_cli("prepare-data", corpus, "--out", ro / "d", "--vocab-size", "300")
    assert_user_error(p, "read-only", "--out")
