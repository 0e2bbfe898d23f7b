"""Outputs apart from inputs, what --force may remove, and re-runs of the same command: temporary
names that say who made them, stale ones removed, a finished result found complete (no --force),
an unfinished one completed (no --force). The kill -9 battery is in test_kill_rerun.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from odyssey import atomic
from odyssey.data import prepare_data
from odyssey.errors import OdysseyError
from odyssey.export import RECORD_NAME, export_model
from odyssey.merge import merge
from odyssey.outputs import check_apart, relation
from odyssey.store import INDEX_NAME, JOURNAL_NAME, Store, StoreError, import_hf, init_store, shard_name
from tests.conftest import ROOT, assert_user_error, cli_in_process, run_cli, tiny_config
from tests.test_merge import make_adapter

NANO = ROOT / "configs" / "nano.yaml"


def tree_sums(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (and the names of directories): what "unchanged" means."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir/link"
    return out


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def temp_name(target: str, pid: int, command: str = "init", rand: str = "k2j4x_9q") -> str:
    return f".{target}.odyssey-{command}-{pid}.{rand}.tmp"


# --------------------------------------------------------------------------------------------
# temporary names


def test_temp_names_say_what_and_who(tmp_path):
    atomic.set_command("prepare-data")
    try:
        with atomic.atomic_path(tmp_path / "train.bin") as tmp:
            assert atomic.parse_temp_name(tmp.name) == ("train.bin", "prepare-data", os.getpid())
        with atomic.atomic_dir(tmp_path / "safetensors") as tmp:
            assert atomic.parse_temp_name(tmp.name) == ("safetensors", "prepare-data", os.getpid())
    finally:
        atomic.set_command("")
    with atomic.atomic_path(tmp_path / "a.b.json") as tmp:
        assert atomic.parse_temp_name(tmp.name) == ("a.b.json", None, os.getpid())
    assert atomic.parse_temp_name(".safetensors.old.odyssey-export-12.ab_c9.tmp") == ("safetensors", "export", 12)
    for foreign in (".notes.tmp", "notes.tmp", ".x.odyssey-init-12.tmp", ".x.odyssey-init-abc.k2j4.tmp", "x"):
        assert atomic.parse_temp_name(foreign) is None, foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.b.json", "safetensors", "train.bin"]


def test_only_stale_temps_of_own_targets_are_removed(tmp_path):
    gone = dead_pid()
    stale_file = temp_name("model.pth", gone, "export")
    stale_dir = temp_name("safetensors.old", gone, "export")
    keep = [
        temp_name("model.pth", os.getpid(), "export"),  # this process: still writing
        temp_name("model.pth", os.getppid(), "export"),  # a live process
        temp_name("notes.txt", gone, "export"),  # not a name the caller writes
        ".model.pth.k2j4x_9q.tmp",  # not an Odyssey temporary name
        "model.pth",
    ]
    for name in [stale_file, *keep]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / stale_dir).mkdir()
    (tmp_path / stale_dir / "model.safetensors").write_bytes(b"x")
    removed = atomic.remove_stale_temps(tmp_path, {"model.pth", "safetensors"})
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert atomic.remove_stale_temps(tmp_path / "absent", None) == []


def test_pid_alive():
    assert atomic.pid_alive(os.getpid()) and atomic.pid_alive(os.getppid())
    assert not atomic.pid_alive(dead_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
        assert not atomic.pid_alive(zombie.pid)
    finally:
        zombie.wait()


# --------------------------------------------------------------------------------------------
# the shared check


def test_relation(tmp_path):
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(model)
    (tmp_path / "parent-link").symlink_to(tmp_path / "models")
    assert relation(model, model) == "is"
    assert relation(tmp_path / "models" / "x" / ".." / "base", model) == "is"
    assert relation(tmp_path / "link", model) == "is"
    assert relation(model / "sub" / "new", model) == "inside"  # not created yet
    assert relation(tmp_path / "link" / "new", model) == "inside"
    assert relation(tmp_path / "models", model) == "contains"
    assert relation(tmp_path / "parent-link", model) == "contains"
    assert relation(tmp_path, tmp_path / "parent-link" / "base") == "contains"
    assert relation(tmp_path / "elsewhere", model) is None
    assert relation(tmp_path / "models" / "base2", model) is None  # a shared name prefix is not containment
    assert relation(tmp_path / "new", tmp_path / "missing-input") is None
    check_apart(tmp_path / "elsewhere", [("model", "--model", model), ("adapter", "--adapter", None)])
    with pytest.raises(OdysseyError, match=r"--out .*link/new lies inside the input model \(--model .*base\)"):
        check_apart(tmp_path / "link" / "new", [("model", "--model", model)])


def test_symlinked_ancestor(tmp_path):
    model = tmp_path / "a" / "model"
    model.mkdir(parents=True)
    alias = tmp_path / "b"
    alias.symlink_to(tmp_path / "a")
    assert relation(alias / "model", model) == "is"
    assert relation(alias, model) == "contains"


def test_bind_mount_is_the_same_directory(tmp_path):
    """A bind mount shows one directory under two real paths: the (device, inode) walk sees it."""
    model, alias = tmp_path / "model", tmp_path / "alias"
    model.mkdir()
    (model / "sub").mkdir()
    alias.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root (CI runs as root)")
    p = subprocess.run(["mount", "--bind", str(model), str(alias)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"this machine refuses bind mounts: {p.stderr.decode().strip()}")
    try:
        assert os.path.realpath(alias) != os.path.realpath(model)
        assert relation(alias, model) == "is"
        assert relation(alias / "new" / "deeper", model) == "inside"
        assert relation(alias / "sub" / "new", model) == "inside"
        assert relation(alias, model / "sub") == "contains"
        with pytest.raises(OdysseyError, match="is the input model"):
            check_apart(alias, [("model", "--model", model)])
    finally:
        subprocess.run(["umount", "-l", str(alias)], capture_output=True)


# --------------------------------------------------------------------------------------------
# every command refuses an output that is, lies inside or contains an input (--force included)


def workspace(d: Path) -> Path:
    """A tiny store with a tokenizer, an HF checkpoint of it, an adapter for it, a corpus."""
    from tests.conftest import load_tool

    load_tool("make_sample_corpus").write_corpus(d / "corpus", "stories", 40, seed=3)
    init_store(tiny_config(vocab_size=512), d / "store", dtype="f32", seed=1, progress=False)
    prepare_data([d / "corpus"], d / "tok", vocab_size=512, model_store=d / "store", progress=False)
    export_model(d / "store", d / "hf", "safetensors", progress=False)
    make_adapter(d / "store", d / "adapter")
    return d


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="module")
def ws_apart(tmp_path_factory) -> Path:
    """The refusal cases' own workspace: a command that wrongly went ahead damages only it."""
    d = workspace(tmp_path_factory.mktemp("ws-apart"))
    (d / "link-to-hf").symlink_to(d / "hf" / "safetensors")
    return d


CASES = [
    # (command line with {ws} placeholders, needle)
    ("import {ws}/hf/safetensors --out {ws}/hf/safetensors --force --quiet", "is the input source model"),
    ("import {ws}/hf/safetensors --out {ws}/hf/safetensors/sub --force --quiet", "lies inside the input source model"),
    ("import {ws}/hf/safetensors --out {ws}/hf --force --quiet", "contains the input source model"),
    ("import {ws}/hf/safetensors --out {ws}/link-to-hf --force --quiet", "is the input source model"),
    ("merge --model {ws}/store --adapter {ws}/adapter --out {ws}/store --force --quiet", "is the input base model"),
    ("merge --model {ws}/store --adapter {ws}/adapter --out {ws}/store/m --quiet", "lies inside the input base model"),
    ("merge --model {ws}/store --adapter {ws}/adapter --out {ws}/adapter --force", "is the input adapter"),
    ("merge --model {ws}/store --adapter {ws}/adapter --out {ws} --force --quiet", "contains the input base model"),
    ("export {ws}/store --out {ws}/store --formats pth --force --quiet", "is the input model"),
    ("export {ws}/store --out {ws}/store/exports --formats pth --quiet", "lies inside the input model"),
    ("export {ws}/store --out {ws} --formats pth --force --quiet", "contains the input model"),
    ("export {ws}/store --adapter {ws}/adapter --out {ws}/adapter/x --formats pth", "lies inside the input adapter"),
    ("prepare-data {ws}/corpus --out {ws}/corpus --force --quiet", "is the input corpus"),
    ("prepare-data {ws}/corpus --out {ws}/corpus/tok --quiet", "lies inside the input corpus"),
    ("prepare-data {ws}/corpus/stories_en.txt --out {ws} --force --quiet", "contains the input corpus"),
    ("prepare-data {ws}/corpus --out {ws}/store --model {ws}/store --force --quiet", "is the input model"),
    (
        "prepare-data {ws}/corpus --out {ws}/store --tokenizer {ws}/store --force --quiet",
        "contains the input tokenizer",
    ),
]


@pytest.mark.parametrize("line,needle", CASES, ids=[f"{c[0].split()[0]}-{i}" for i, c in enumerate(CASES)])
def test_output_apart_from_inputs(ws_apart, line, needle):
    """In this process (the message and the status); the first case as a real process."""
    before = tree_sums(ws_apart)
    run = run_cli if line == CASES[0][0] else cli_in_process
    p = run(*line.format(ws=ws_apart).split())
    assert_user_error(p, needle, "--force does not change this")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert tree_sums(ws_apart) == before  # inputs' bytes unchanged, and no output begun


@pytest.mark.parametrize("where", ["model", "data"])
def test_train_run_dir_apart_from_inputs(train_dir, where):
    out = train_dir / ("store" if where == "model" else "tok") / "run"
    before = tree_sums(train_dir)
    p = cli_in_process(
        "train", "--model", train_dir / "store", "--data", train_dir / "tok", "--out", out,
        "--ram-budget", "1GiB", "--steps", "1", "--no-guard", "--quiet", "--mode", "full",
    )  # fmt: skip
    assert_user_error(p, f"lies inside the input {where}")
    assert tree_sums(train_dir) == before


# --------------------------------------------------------------------------------------------
# --force removes only what the command itself writes


def test_init_force_keeps_foreign_files(tmp_path):
    out = tmp_path / "s"
    init_store(tiny_config(num_hidden_layers=4), out, dtype="f32", seed=1, progress=False)  # 6 shards
    odyssey_temp = temp_name("notes.txt", dead_pid())
    foreign = {
        "notes.txt": b"mine",
        "model-final.safetensors": b"my own checkpoint",
        "tokenizer.json": b"{}",  # init never writes a tokenizer, so --force leaves it
        ".notes.tmp": b"not odyssey's",
        odyssey_temp: b"odyssey's, but not for a store file",
    }
    for name, data in foreign.items():
        (out / name).write_bytes(data)
    (out / "sub").mkdir()
    (out / "sub" / "model-00001-of-00006.safetensors").write_bytes(b"deeper: not this store's")
    (out / temp_name("model-00002-of-00006.safetensors", dead_pid())).write_bytes(b"stale")
    p = cli_in_process("init", "--config", NANO, "--out", out, "--quiet", "num_hidden_layers=2")
    assert_user_error(p, "not empty", "finished store made by another command", "--force")
    p = cli_in_process("init", "--config", NANO, "--out", out, "--quiet", "--force", "num_hidden_layers=2")
    assert p.returncode == 0, p.stderr
    for name, data in foreign.items():
        assert (out / name).read_bytes() == data, name
    assert (out / "sub" / "model-00001-of-00006.safetensors").read_bytes() == b"deeper: not this store's"
    store = Store.open(out)
    assert store.config.num_hidden_layers == 2 and store.verify(progress=False) == []
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("model-0"))
    assert shards == [shard_name(k, 4) for k in range(4)]  # the old six are gone
    assert [p.name for p in out.iterdir() if atomic.parse_temp_name(p.name)] == [odyssey_temp]  # the stale shard's gone


def test_import_force_removes_its_own_tokenizer_files(ws, tmp_path):
    """import writes tokenizer files, so --force removes stale ones a new source does not have."""
    src = tmp_path / "src"
    export_model(ws / "store", tmp_path / "e", "safetensors", progress=False)
    (tmp_path / "e" / "safetensors").rename(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink()
    out = tmp_path / "out"
    import_hf(ws / "hf" / "safetensors", out, progress=False)
    (out / "odyssey_merge.json").write_text("{}")  # merge's, not import's: left alone
    assert (out / "tokenizer.json").is_file()
    import_hf(src, out, dtype="bf16", force=True, progress=False)
    assert not (out / "tokenizer.json").exists() and (out / "odyssey_merge.json").read_text() == "{}"
    assert Store.open(out).dtype == "bf16"


def test_export_force_replaces_only_requested_outputs(ws, tmp_path):
    out = tmp_path / "x"
    export_model(ws / "store", out, "pth,safetensors", progress=False)
    (out / "notes.txt").write_text("mine")
    pth = (out / "model.pth").read_bytes()
    (out / "safetensors" / "notes.txt").write_text("inside an output: replaced with it")
    export_model(ws / "store", out, "safetensors", adapter=ws / "adapter", force=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.pth").read_bytes() == pth
    assert not (out / "safetensors" / "notes.txt").exists()


# --------------------------------------------------------------------------------------------
# re-running the same command


def test_rerun_of_a_finished_store_command_writes_nothing(ws, tmp_path):
    cases = {
        "init": lambda out, **kw: init_store(tiny_config(), out, dtype="bf16", seed=4, progress=False, **kw),
        "import": lambda out, **kw: import_hf(ws / "hf" / "safetensors", out, progress=False, **kw),
        "merge": lambda out, **kw: merge(ws / "store", ws / "adapter", out, progress=False, **kw),
    }
    for name, run in cases.items():
        out = tmp_path / name
        run(out)
        before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir() if "model-" in p.name}
        index = (out / INDEX_NAME).read_bytes()
        s = run(out)  # no force: the same command finds its finished store
        assert s["written_bytes"] == 0, name
        after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir() if "model-" in p.name}
        assert after == before and (out / INDEX_NAME).read_bytes() == index, name
        assert json.loads(index)["metadata"]["odyssey"]["written_by"]["kind"] == name
        assert Store.open(out).verify(progress=False) == []
        with pytest.raises(OdysseyError, match="finished store made by another command or other arguments"):
            init_store(tiny_config(), out, dtype="bf16", seed=5, progress=False)
        s = run(out, force=True)  # --force replaces it
        assert s["written_bytes"] > 0


def test_import_of_a_changed_source_is_not_the_same_command(ws, tmp_path):
    src = tmp_path / "src"
    export_model(ws / "store", tmp_path / "e", "safetensors", progress=False)
    (tmp_path / "e" / "safetensors").rename(src)
    out = tmp_path / "out"
    import_hf(src, out, progress=False)
    os.utime(src / "model.safetensors", ns=(1, 1))  # a new download of the same name
    with pytest.raises(OdysseyError, match="not empty"):
        import_hf(src, out, progress=False)


def test_unfinished_store_is_completed_without_force(ws, tmp_path):
    out = tmp_path / "m"
    merge(ws / "store", ws / "adapter", out, progress=False)
    reference = json.loads((out / INDEX_NAME).read_text())["metadata"]["odyssey"]["shards"]
    # as a kill would leave it: the journal, some shards, stale temporaries, no index
    journal = {"key": None, "done": {}}
    index = json.loads((out / INDEX_NAME).read_text())
    (out / INDEX_NAME).unlink()
    (out / shard_name(3, 4)).unlink()
    (out / temp_name(shard_name(3, 4), dead_pid(), "merge")).write_bytes(b"half")
    (out / temp_name(INDEX_NAME, dead_pid(), "merge")).write_bytes(b"{")
    store = Store.open(ws / "store")
    from odyssey.adapters import WEIGHTS_NAME, read_adapter
    from odyssey.dtypes import DTYPES
    from odyssey.store import file_sha256

    adapter = read_adapter(ws / "adapter")
    journal["key"] = {
        "kind": "merge",
        "config": store.config.to_hf_dict(DTYPES["f32"].hf_name),
        "dtype": "f32",
        "base": store.fingerprint(),
        "adapter": file_sha256(adapter.path / WEIGHTS_NAME),
        "scale": adapter.scale,
    }
    journal["done"] = {f: rec for f, rec in index["metadata"]["odyssey"]["shards"].items() if f != shard_name(3, 4)}
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    with pytest.raises(StoreError, match=r"interrupted `odyssey merge`: re-run it"):
        Store.open(out)
    s = merge(ws / "store", ws / "adapter", out, progress=False)  # no --force
    assert s["kept_shards"] == 3
    assert json.loads((out / INDEX_NAME).read_text())["metadata"]["odyssey"]["shards"] == reference
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name == JOURNAL_NAME]


def test_export_rerun_keeps_finished_and_rewrites_unfinished(ws, tmp_path):
    out = tmp_path / "x"
    export_model(ws / "store", out, "pth,safetensors", progress=False)
    record = json.loads((out / RECORD_NAME).read_text())["outputs"]
    assert {k: v["state"] for k, v in record.items()} == {"model.pth": "done", "safetensors": "done"}
    pth_ino = (out / "model.pth").stat().st_ino
    s = export_model(ws / "store", out, "pth,safetensors", progress=False)  # the same export: all kept
    assert [r["kept"] for r in s["formats"]] == [True, True] and (out / "model.pth").stat().st_ino == pth_ino
    # killed while writing model.pth (the old file still under its name) + its stale temporary
    record["model.pth"] = {"key": record["model.pth"]["key"], "state": "writing"}
    (out / RECORD_NAME).write_text(json.dumps({"outputs": record}))
    (out / temp_name("model.pth", dead_pid(), "export")).write_bytes(b"half")
    (out / temp_name("safetensors", dead_pid(), "export")).mkdir()
    s = export_model(ws / "store", out, "pth,safetensors", progress=False)
    assert [r["kept"] for r in s["formats"]] == [True, False]  # safetensors first, then pth (FORMATS order)
    assert (out / "model.pth").stat().st_ino != pth_ino
    assert sorted(p.name for p in out.iterdir()) == [RECORD_NAME, "model.pth", "safetensors"]
    # the same output made by another export (another adapter) is a finished result: --force needed
    with pytest.raises(OdysseyError, match="already exists; pass --force"):
        export_model(ws / "store", out, "pth", adapter=ws / "adapter", progress=False)
    # an output without a record (made by hand, or by an older Odyssey) likewise
    (out / RECORD_NAME).unlink()
    with pytest.raises(OdysseyError, match="already exists"):
        export_model(ws / "store", out, "pth", progress=False)


def test_failed_first_export_leaves_no_record(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(Store, "load_tensors", lambda self, unit, dtype=None: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        export_model(ws / "store", tmp_path / "x", "pth", progress=False)
    assert not (tmp_path / "x").exists()  # the record gone, so the --out it created could go too
    (tmp_path / "y").mkdir()
    with pytest.raises(OSError):
        export_model(ws / "store", tmp_path / "y", "pth", progress=False)
    assert list((tmp_path / "y").iterdir()) == []


def test_prepare_data_rerun_removes_stale_temps(ws, tmp_path):
    store = tmp_path / "store"
    init_store(tiny_config(vocab_size=512), store, dtype="f32", seed=1, progress=False)
    out = tmp_path / "tok"
    out.mkdir()
    gone = dead_pid()
    stale = [temp_name("train.bin", gone, "prepare-data"), temp_name("manifest.json", gone, "prepare-data")]
    live = temp_name("val.bin", os.getppid(), "prepare-data")  # someone alive: not removed, not "foreign"
    for name in [*stale, live]:
        (out / name).write_bytes(b"half")
    (store / temp_name("tokenizer.json", gone, "prepare-data")).write_bytes(b"half")
    p = cli_in_process("prepare-data", ws / "corpus", "--out", out, "--model", store, "--vocab-size", "512", "--quiet")
    assert p.returncode == 0, p.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [live]
    assert not [p.name for p in store.iterdir() if p.name.endswith(".tmp")]
    assert (out / "manifest.json").is_file() and (store / "tokenizer.json").is_file()
