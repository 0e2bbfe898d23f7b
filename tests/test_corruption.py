"""Corruption is caught where it is used: a shard whose bytes differ from the index's checksum is
refused by every command that reads it (merge, export, generate, train: exit 2, one line naming the
shard, nothing under the output's final name, the inputs untouched); `verify` checks every index
field it relies on and adds the fast checksum to an older index; a seeded fuzz of mutated stores
never gets a traceback, a hang, or a store that `verify` rejects accepted by `generate`, `merge`
or `export`."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

from odyssey import cli
from odyssey.errors import OdysseyError
from odyssey.store import INDEX_NAME, ChecksumMismatch, Store, StoreError, init_store, shard_name, verify_store
from odyssey.store.checksum import FAST, SEAL, SHA256, file_digests, index_seal
from tests.conftest import assert_user_error, cli_in_process, run_cli, tiny_config

KINDS = {"embed": 0, "layer": 2, "head": 3}  # shard index in a 2-layer store: embed, layers 0-1, head


def digests(d: Path) -> dict:
    """sha256 of every file under d (relative path -> hex)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def flip_data_byte(store: Path, k: int, where: float = 0.5) -> Path:
    """Flips one bit inside the tensor data (not the header) of shard k: only a checksum sees it."""
    opened = Store.open(store)
    path = store / shard_name(k, len(opened.units))
    info = opened.shards[opened.units[k]]
    data = bytearray(path.read_bytes())
    pos = info.data_offset + int(info.data_bytes * where)
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def make_adapter(store_dir: Path, out: Path) -> Path:
    from odyssey.adapters import inject, save_adapter
    from odyssey.config import LoraSettings
    from odyssey.model import LlamaForCausalLM

    store = Store.open(store_dir)
    settings = LoraSettings(r=4, alpha=8.0)
    model = LlamaForCausalLM(store.config)
    inject(model, settings, seed=0)
    return save_adapter(model, settings, out, store)


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------
# the fast checksum and the seal


def test_index_records_fast_checksum_and_seal(tiny_store):
    index = json.loads((tiny_store / INDEX_NAME).read_text())
    meta = index["metadata"]["odyssey"]
    for fname, rec in meta["shards"].items():
        got = file_digests(tiny_store / fname)
        assert rec[SHA256] == got[SHA256] and rec[FAST] == got[FAST], fname
    assert meta[SEAL] == index_seal(index)
    store = Store.open(tiny_store)
    assert store.sealed and store.expected_digest(0)[0] == FAST


@pytest.mark.parametrize("kind", list(KINDS))
def test_pager_load_tensors_and_engine_refuse_a_flipped_byte(tiny_store, kind):
    from odyssey.engine import Engine
    from odyssey.pager import Pager

    flip_data_byte(tiny_store, KINDS[kind])
    unit = Store.open(tiny_store).units[KINDS[kind]]
    with pytest.raises(ChecksumMismatch, match=shard_name(KINDS[kind], 4)):
        Store.open(tiny_store).load_tensors(unit)
    with Pager(Store.open(tiny_store)) as pager, pytest.raises(ChecksumMismatch, match="odyssey verify"):
        pager.get(unit)
    store = Store.open(tiny_store)
    with pytest.raises(ChecksumMismatch, match=shard_name(KINDS[kind], 4)):
        with Engine(store, compute_dtype="fp32") as eng:  # embed: checked when the engine opens it
            eng.logits(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_shard_damaged_after_open_is_one_line(tiny_store, damage):
    """A shard truncated or removed while a command runs (after the store was opened)."""
    from odyssey.pager import Pager

    store = Store.open(tiny_store)
    victim = tiny_store / shard_name(2, 4)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:5000])
    else:
        victim.unlink()
    needle = "shorter than its header" if damage == "truncate" else "cannot read shard"
    with Pager(store) as pager, pytest.raises(StoreError, match=needle):
        pager.get(1)
    with pytest.raises(StoreError, match=needle):
        store.load_tensors(1)


def test_a_verified_unit_is_hashed_once_per_store(tiny_store):
    """Re-reads of a unit the store has checked are not hashed again (the pager re-reads every
    layer every step): the check costs one pass of the fast hash per shard per process."""
    from odyssey.pager import Pager

    store = Store.open(tiny_store)
    calls = []
    real = store.check_buffer
    store.check_buffer = lambda unit, data: (calls.append(unit), real(unit, data))
    with Pager(store, slots=1) as pager:
        for unit in [0, 1, "head", 0, 1, "head"]:
            pager.release(pager.get(unit))
    assert calls.count(0) == 2 and all(store.is_verified(u) for u in (0, 1, "head"))
    hashed = []
    real_digest = store._check_digest
    store._check_digest = lambda *a: (hashed.append(a[0]), real_digest(*a))
    with Pager(store, slots=1) as pager:
        pager.release(pager.get(0))
    assert hashed == []


# --------------------------------------------------------------------------------------------
# every consumer refuses a flipped byte in every kind of shard


@pytest.fixture
def consumer_setup(tmp_path, train_dir):
    """A copy of the training fixture's store (tokenizer included), an adapter made for it, and the
    token data; the copy is what gets damaged."""
    store = tmp_path / "base"
    shutil.copytree(train_dir / "store", store)
    adapter = make_adapter(store, tmp_path / "adapter")
    return store, adapter, train_dir / "tok"


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_export_generate_refuse_a_flipped_byte(tmp_path, consumer_setup, capsys, kind):
    store, adapter, _ = consumer_setup
    victim = flip_data_byte(store, KINDS[kind])
    before = digests(tmp_path)
    needles = (f"store {store}", victim.name, "does not match its checksum", f"odyssey verify {store}")

    code = cli.main(
        ["merge", "--model", str(store), "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--quiet"]
    )
    one_line_error(capsys, code, *needles)
    assert not (tmp_path / "m").exists()  # nothing made from the damaged base stays

    out = tmp_path / "ex"
    code = cli.main(["export", str(store), "--out", str(out), "--formats", "safetensors,pth,gguf", "--quiet"])
    one_line_error(capsys, code, *needles)
    assert not out.exists()
    code = cli.main(["export", str(store), "--adapter", str(adapter), "--out", str(out), "--formats", "pth", "--quiet"])
    one_line_error(capsys, code, *needles)
    assert not out.exists()

    code = cli.main(["generate", "--model", str(store), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--quiet"])
    one_line_error(capsys, code, *needles)
    code = cli.main(["generate", "--model", str(store), "--adapter", str(adapter), "--prompt-ids", "1,2", "--quiet"])
    one_line_error(capsys, code, *needles)
    assert digests(tmp_path) == before  # the store and the adapter are untouched, nothing else written


@pytest.mark.parametrize("kind", list(KINDS))
def test_train_refuses_a_flipped_byte_before_its_first_checkpoint(tmp_path, consumer_setup, kind):
    store, _, tok = consumer_setup
    victim = flip_data_byte(store, KINDS[kind])
    before = digests(store)
    run = tmp_path / "run"
    args = ["train", "--no-guard", "--model", store, "--data", tok, "--out", run, "--ram-budget", "1GiB", "--quiet"]
    p = cli_in_process(*args, "--steps", "2", "seq_len=32", "checkpoint_every=1", "eval_every=0")
    assert_user_error(p, victim.name, "does not match its checksum", "odyssey verify")
    assert not (run / "adapter").exists()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert digests(store) == before
    if kind == "layer":  # full training reads every unit through load_tensors
        p = cli_in_process(*args[:-1], "--steps", "1", "mode=full", "seq_len=32", "--out", tmp_path / "full")
        assert_user_error(p, victim.name, "does not match its checksum")
        assert not (tmp_path / "full" / "model").exists()


def test_generate_cli_refuses_end_to_end(tmp_path, tiny_store):
    victim = flip_data_byte(tiny_store, 1)
    p = run_cli("generate", "--model", tiny_store, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--quiet")
    assert_user_error(p, victim.name, "does not match its checksum", f"odyssey verify {tiny_store}")
    assert p.stdout.strip() == ""  # not one token


# --------------------------------------------------------------------------------------------
# older stores: SHA-256 until verify adds the fast checksum


def make_old_format(store: Path) -> dict:
    """Rewrite the index as written before the fast checksum: no xxh3_128, no seal."""
    index = json.loads((store / INDEX_NAME).read_text())
    meta = index["metadata"]["odyssey"]
    meta.pop(SEAL)
    for rec in meta["shards"].values():
        rec.pop(FAST)
    (store / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return index


def test_verify_adds_the_fast_checksum_to_an_old_index(tiny_store):
    old = make_old_format(tiny_store)
    store = Store.open(tiny_store)
    assert not store.sealed and store.expected_digest(1)[0] == SHA256
    fingerprint = store.fingerprint()
    p = run_cli("verify", tiny_store, "--quiet")
    assert p.returncode == 0, p.stderr
    assert "added fast checksums" in p.stdout and p.stdout.strip().splitlines()[-1].startswith("OK")
    new = json.loads((tiny_store / INDEX_NAME).read_text())
    # only fields were added: removing them gives the old index back
    stripped = json.loads(json.dumps(new))
    stripped["metadata"]["odyssey"].pop(SEAL)
    for fname, rec in stripped["metadata"]["odyssey"]["shards"].items():
        assert rec.pop(FAST) == file_digests(tiny_store / fname)[FAST]
    assert stripped == old
    store = Store.open(tiny_store)
    assert store.sealed and store.expected_digest(1)[0] == FAST and store.fingerprint() == fingerprint
    p = run_cli("verify", tiny_store, "--quiet")
    assert p.returncode == 0 and "added" not in p.stdout, p.stdout + p.stderr
    assert verify_store(tiny_store, progress=False)[1] == []


def test_an_old_index_is_checked_with_sha256(tiny_store, capsys):
    make_old_format(tiny_store)
    victim = flip_data_byte(tiny_store, 2)
    before = digests(tiny_store)
    code = cli.main(["generate", "--model", str(tiny_store), "--prompt-ids", "1,2", "--quiet"])
    one_line_error(capsys, code, victim.name, "does not match its checksum")
    p = run_cli("verify", tiny_store, "--quiet")  # refuses, and adds nothing to a damaged store
    assert p.returncode == 2 and victim.name in p.stderr and "Traceback" not in p.stderr
    assert digests(tiny_store) == before


def test_verify_on_a_read_only_store_still_verifies(tiny_store, monkeypatch, capsys):
    """Where the index cannot be rewritten (read-only, permission denied), verify still verifies
    and says the store stays on SHA-256 (root ignores a read-only mode: the write fails by hand)."""
    from odyssey import atomic

    old = make_old_format(tiny_store)

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(atomic, "write_json", refuse)
    code = cli.main(["verify", str(tiny_store), "--quiet"])
    out = capsys.readouterr()
    assert code == 0 and "could not add fast checksums" in out.out and "Permission denied" in out.out, out
    assert json.loads((tiny_store / INDEX_NAME).read_text()) == old


# --------------------------------------------------------------------------------------------
# verify checks every index field it relies on


def _edit_index(store: Path, fn, reseal: bool = True) -> None:
    index = json.loads((store / INDEX_NAME).read_text())
    fn(index)
    if reseal:  # a consistent edit: the field checks, not the seal, must catch it
        index["metadata"]["odyssey"][SEAL] = index_seal(index)
    (store / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _meta(i):
    return i["metadata"]["odyssey"]


def _shard(i, k):
    return _meta(i)["shards"][shard_name(k, 4)]


def _all_to_one(i):
    for name in i["weight_map"]:
        i["weight_map"][name] = shard_name(0, 4)


INDEX_MUTATIONS = {
    "total_size negative": (lambda i: i["metadata"].__setitem__("total_size", -1), "total_size"),
    "total_size off by one": (
        lambda i: i["metadata"].__setitem__("total_size", i["metadata"]["total_size"] + 1),
        "total_size",
    ),
    "total_size a string": (lambda i: i["metadata"].__setitem__("total_size", "12"), "total_size"),
    "total_size missing": (lambda i: i["metadata"].pop("total_size"), "total_size"),
    "dtype changed": (lambda i: _meta(i).__setitem__("dtype", "bf16"), "holds F32"),
    "dtype unknown": (lambda i: _meta(i).__setitem__("dtype", "int8"), "dtype"),
    "weight_map all to one shard": (_all_to_one, "weight_map"),
    "weight_map missing a tensor": (lambda i: i["weight_map"].pop("lm_head.weight"), "weight_map"),
    "weight_map extra tensor": (lambda i: i["weight_map"].__setitem__("lm_head.bias", shard_name(3, 4)), "weight_map"),
    "weight_map not an object": (lambda i: i.__setitem__("weight_map", []), "weight_map"),
    "format_version": (lambda i: _meta(i).__setitem__("format_version", 2), "format version"),
    "shard unlisted": (lambda i: _meta(i)["shards"].pop(shard_name(2, 4)), "lists 3 shards"),
    "shard bytes": (lambda i: _shard(i, 1).__setitem__("bytes", _shard(i, 1)["bytes"] + 4096), "the index says"),
    "shard bytes negative": (lambda i: _shard(i, 1).__setitem__("bytes", -5), "not a size"),
    "sha256 changed": (lambda i: _shard(i, 2).__setitem__(SHA256, "0" * 64), "checksum mismatch"),
    "sha256 not hex": (lambda i: _shard(i, 2).__setitem__(SHA256, "xyz"), "sha-256"),
    "fast checksum changed": (lambda i: _shard(i, 2).__setitem__(FAST, "f" * 32), "checksum mismatch"),
    "unit twice": (lambda i: _shard(i, 2).__setitem__("unit", "0"), "listed twice"),
    "unit unknown": (lambda i: _shard(i, 2).__setitem__("unit", "lm"), "unit"),
    "unit out of range": (lambda i: _shard(i, 2).__setitem__("unit", "7"), "unit"),
    "checksum kind": (lambda i: _meta(i).__setitem__("checksum", "md5"), "checksum"),
    "shards not a table": (lambda i: _meta(i).__setitem__("shards", ["x"]), "table of shards"),
}


@pytest.mark.parametrize("name", list(INDEX_MUTATIONS))
def test_verify_rejects_index_mutations(tiny_store, name):
    mutate, needle = INDEX_MUTATIONS[name]
    # Re-sealed: the field checks, not the seal, must catch each edit. Except a SHA-256 digest:
    # the commands check the fast hash, so a re-sealed SHA-256 edit (a forgery that leaves every
    # byte the commands use intact) is left to verify; damage to it breaks the seal (below).
    _edit_index(tiny_store, mutate, reseal=name != "sha256 changed")
    store, problems, _ = verify_store(tiny_store, progress=False)
    assert problems, name
    assert any(needle.lower() in p.lower() for p in problems), problems
    assert all("\n" not in p for p in problems)
    # and no command accepts it: opening the store (what every command does) refuses it, or the
    # pager's checksum does
    with pytest.raises(OdysseyError):
        _generate(tiny_store)


def test_verify_reports_each_problem_on_its_own_line(tiny_store):
    def two(i):
        i["metadata"]["total_size"] = -1
        _all_to_one(i)

    _edit_index(tiny_store, two)
    p = run_cli("verify", tiny_store, "--quiet")
    fails = [line for line in p.stderr.splitlines() if line.startswith("FAIL")]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert any("total_size" in f for f in fails) and any("weight_map" in f for f in fails), fails


def test_a_damaged_index_breaks_its_seal(tiny_store):
    """Damage to a field the other checks cannot see (a SHA-256 digest) is caught by the seal."""
    _edit_index(tiny_store, lambda i: _shard(i, 1).__setitem__(SHA256, "1" * 64), reseal=False)
    with pytest.raises(OdysseyError, match="does not match its own checksum"):
        Store.open(tiny_store)
    assert any("own checksum" in p for p in verify_store(tiny_store, progress=False)[1])


def test_stray_shard_file_is_reported(tiny_store):
    shutil.copy(tiny_store / shard_name(1, 4), tiny_store / shard_name(4, 5))
    problems = verify_store(tiny_store, progress=False)[1]
    assert any(shard_name(4, 5) in p and "does not list" in p for p in problems), problems


CONFIG_MUTATIONS = {
    "not JSON": ("{not json", "not valid JSON"),
    "a list": ("[]", "not a JSON object"),
    "hidden_size 0": ({"hidden_size": 0}, "hidden_size"),
    "vocab negative": ({"vocab_size": -3}, "vocab_size"),
    "layers a string": ({"num_hidden_layers": "two"}, "num_hidden_layers"),
    "layers huge": ({"num_hidden_layers": 10**9}, "needs"),
    "rope_theta NaN": ({"rope_theta": float("nan")}, "rope_theta"),
    "rms_norm_eps inf": ({"rms_norm_eps": float("inf")}, "rms_norm_eps"),
    "rope_scaling a number": ({"rope_scaling": 3}, "rope_scaling"),
    "intermediate_size other": ({"intermediate_size": 96}, "shape"),
    "untied -> tied": ({"tie_word_embeddings": True}, "lm_head.weight"),
}


@pytest.mark.parametrize("name", list(CONFIG_MUTATIONS))
def test_verify_rejects_config_mutations(tiny_store, name):
    change, needle = CONFIG_MUTATIONS[name]
    path = tiny_store / "config.json"
    if isinstance(change, str):
        path.write_text(change)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    store, problems, _ = verify_store(tiny_store, progress=False)
    assert problems and any(needle.lower() in p.lower() for p in problems), problems
    with pytest.raises(OdysseyError):
        Store.open(tiny_store)


# --------------------------------------------------------------------------------------------
# the fuzz: mutated stores, indexes and configs


def _generate(store_dir: Path, tokens: int = 2) -> list[int]:
    """What `odyssey generate` does with a store, in-process: open, engine, tokens."""
    from odyssey.engine import Engine
    from odyssey.generate import generate_ids

    store = Store.open(store_dir)
    with Engine(store, compute_dtype="fp32") as eng:
        return list(generate_ids(eng, [1, 2, 3], tokens))


def _merge_and_export(store_dir: Path, adapter: Path, out: Path) -> bool:
    """merge and export in-process; True when both accepted. Each refusal must leave nothing under
    the output's final name."""
    from odyssey.export import export_model
    from odyssey.merge import merge

    ok = True
    try:
        merge(store_dir, adapter, out / "merged", progress=False)
    except OdysseyError:
        ok = False
        assert not (out / "merged").exists(), "a refused merge left its output"
    try:
        export_model(store_dir, out / "ex", "safetensors,pth", progress=False)
    except OdysseyError:
        ok = False
        assert not (out / "ex").exists(), "a refused export left its output"
    return ok


def _json_value_mutation(rng: random.Random, value):
    choices = [None, -1, 0, 1, -(2**40), 2**62, 1.5, float("nan"), "x", "", [], {}, True]
    if isinstance(value, bool):
        choices.append(not value)
    elif isinstance(value, int):
        choices += [value + 1, value - 1, value * 2, -value]
    elif isinstance(value, str):
        choices += [value[:-1], value + "0", value.upper(), value[::-1]]
    return rng.choice(choices)


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    yield path


def _mutate_json(rng: random.Random, path: Path, reseal: bool) -> str:
    obj = json.loads(path.read_text())
    leaves = [p for p in _leaves(obj) if p]
    target = rng.choice(leaves)
    parent = obj
    for k in target[:-1]:
        parent = parent[k]
    key = target[-1]
    op = rng.random()
    if op < 0.2 and isinstance(parent, dict):
        del parent[key]
        what = f"delete {'/'.join(map(str, target))}"
    elif op < 0.3 and isinstance(parent, dict):
        other = rng.choice(list(parent))  # swap two values of one object
        parent[key], parent[other] = parent[other], parent[key]
        what = f"swap {key}/{other}"
    else:
        parent[key] = _json_value_mutation(rng, parent[key])
        what = f"set {'/'.join(map(str, target))}={parent[key]!r}"
    sealed_checksum = "sha256" in target  # a re-sealed edit of a SHA-256 is a forgery, not damage
    if reseal and path.name == INDEX_NAME and not sealed_checksum:
        try:
            obj["metadata"]["odyssey"][SEAL] = index_seal(obj)
            what += " (resealed)"
        except (KeyError, TypeError, ValueError):
            pass
    path.write_text(json.dumps(obj))
    return what


def _mutate(rng: random.Random, case: Path) -> str:
    shards = sorted(case.glob("model-*.safetensors"))
    victim = rng.choice(shards)
    data = bytearray(victim.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    json_end = len(bytes(data[:header_end]).rstrip(b" "))
    kind = rng.choice(
        ["flip_data", "flip_data", "flip_header", "flip_any", "truncate", "extend", "index", "index", "index_bytes",
         "config", "config", "swap", "remove", "stray", "multi_flip"]
    )  # fmt: skip
    if kind in ("flip_data", "flip_header", "flip_any", "multi_flip"):
        lo, hi = {"flip_data": (header_end, len(data)), "flip_header": (0, json_end)}.get(kind, (0, len(data)))
        for _ in range(rng.randint(2, 6) if kind == "multi_flip" else 1):
            pos = rng.randrange(lo, hi)
            data[pos] ^= rng.randint(1, 255)
        victim.write_bytes(bytes(data))
        return f"{kind} {victim.name}"
    if kind == "truncate":
        victim.write_bytes(bytes(data[: rng.randrange(0, len(data))]))
        return f"truncate {victim.name}"
    if kind == "extend":
        victim.write_bytes(bytes(data) + bytes(rng.randint(0, 255) for _ in range(rng.choice([1, 8, 4096]))))
        return f"extend {victim.name}"
    if kind == "index":
        return _mutate_json(rng, case / INDEX_NAME, reseal=rng.random() < 0.5)
    if kind == "index_bytes":
        raw = bytearray((case / INDEX_NAME).read_bytes())
        raw[rng.randrange(len(raw))] ^= rng.randint(1, 255)
        (case / INDEX_NAME).write_bytes(bytes(raw))
        return "index_bytes"
    if kind == "config":
        return "config " + _mutate_json(rng, case / "config.json", reseal=False)
    if kind == "swap":
        a, b = rng.sample(shards, 2)
        ta = a.with_suffix(".swap")
        a.rename(ta)
        b.rename(a)
        ta.rename(b)
        return f"swap {a.name} {b.name}"
    if kind == "remove":
        victim.unlink()
        return f"remove {victim.name}"
    shutil.copy(victim, case / "model-00009-of-00009.safetensors")
    return "stray"


class _Hang(Exception):
    pass


def _alarm(seconds: float):
    def handler(signum, frame):
        raise _Hang()

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def test_fuzz_mutated_stores_are_refused_where_verify_rejects_them(tmp_path):
    from odyssey.adapters import read_adapter  # noqa: F401  (warm imports before timing cases)
    from odyssey.engine import Engine  # noqa: F401

    rng = random.Random(20240607)
    bases = []
    for tied in (False, True):
        base = tmp_path / f"base-{int(tied)}"
        init_store(tiny_config(tie_word_embeddings=tied), base, dtype="bf16", seed=5, progress=False)
        bases.append((base, make_adapter(base, tmp_path / f"adapter-{int(tied)}")))
    counts = dict(cases=0, rejected_by_verify=0, refused_by_generate=0, tracebacks=0, hangs=0, accepted_but_bad=0)
    counts.update(merge_export_sampled=0, merge_export_refused=0)
    failures = []
    old_handler = signal.getsignal(signal.SIGALRM)
    try:
        for i in range(320):
            base, adapter = bases[i % 2]
            case = tmp_path / f"case-{i}"
            shutil.copytree(base, case)
            what = _mutate(rng, case)
            counts["cases"] += 1
            verdict = {}
            for name, fn in (("verify", lambda c=case: verify_store(c, progress=False)[1]), ("generate", None)):
                try:
                    _alarm(30)
                    if name == "verify":
                        verdict[name] = not fn()
                    else:
                        _generate(case)
                        verdict[name] = True
                except OdysseyError:
                    verdict[name] = False
                except _Hang:
                    counts["hangs"] += 1
                    failures.append(f"case {i} ({what}): {name} hung")
                    verdict[name] = None
                except Exception as e:  # a traceback a user would see
                    counts["tracebacks"] += 1
                    failures.append(f"case {i} ({what}): {name} raised {type(e).__name__}: {e}")
                    verdict[name] = None
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            counts["rejected_by_verify"] += verdict["verify"] is False
            counts["refused_by_generate"] += verdict["generate"] is False
            if verdict["verify"] is False and verdict["generate"] is True:
                counts["accepted_but_bad"] += 1
                failures.append(f"case {i} ({what}): verify rejects it, generate accepted it")
            if i % 8 == 0 and verdict["verify"] is False:  # a sample through merge and export
                counts["merge_export_sampled"] += 1
                try:
                    _alarm(60)
                    if _merge_and_export(case, adapter, tmp_path / f"out-{i}"):
                        counts["accepted_but_bad"] += 1
                        failures.append(f"case {i} ({what}): verify rejects it, merge and export accepted it")
                    else:
                        counts["merge_export_refused"] += 1
                except _Hang:
                    counts["hangs"] += 1
                    failures.append(f"case {i} ({what}): merge/export hung")
                except Exception as e:
                    counts["tracebacks"] += 1
                    failures.append(f"case {i} ({what}): merge/export raised {type(e).__name__}: {e}")
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            shutil.rmtree(case, ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
    print("fuzz:", json.dumps(counts))
    assert not failures, "\n".join(failures[:20])
    assert counts["rejected_by_verify"] >= 200, counts  # the mutations do damage
    assert counts["merge_export_sampled"] >= 20, counts


def test_fuzz_cli_sample_never_tracebacks_or_hangs(tmp_path):
    """The same mutations through the commands: exit 0 or 2, no traceback, within a timeout, and
    never a store that `odyssey verify` rejects accepted by `odyssey generate`. The first two cases
    as real processes, the rest through `odyssey.cli.main` here (an alarm for the timeout)."""
    rng = random.Random(7)
    base = tmp_path / "base"
    init_store(tiny_config(), base, dtype="f32", seed=2, progress=False)
    seen = []

    def in_process(*args, timeout):
        def hung(signum, frame):
            raise TimeoutError(f"odyssey {args[0]} hung on case {i} ({what})")

        old = signal.signal(signal.SIGALRM, hung)
        signal.alarm(timeout)
        try:
            return cli_in_process(*args)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

    for i in range(6):
        case = tmp_path / f"case-{i}"
        shutil.copytree(base, case)
        what = _mutate(rng, case)
        run = run_cli if i < 2 else in_process
        v = run("verify", case, "--quiet", timeout=120)
        g = run("generate", "--model", case, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--quiet", timeout=120)
        for p in (v, g):
            assert p.returncode in (0, 2) and "Traceback" not in p.stderr, (what, p.stderr)
            if p.returncode == 2:
                assert len([line for line in p.stderr.splitlines() if not line.startswith("FAIL")]) <= 1, p.stderr
        assert not (v.returncode == 2 and g.returncode == 0), (what, v.stderr)
        seen.append((what, v.returncode, g.returncode))
    print("cli fuzz:", seen)
    assert any(v == 2 for _, v, _ in seen), seen


# --------------------------------------------------------------------------------------------
# row blocks: each block checked against its own digest where it is used


def blocked(tmp_path: Path, tied: bool = False, rows: int | None = 7, vocab: int = 250) -> Path:
    """A store whose embedding (and untied head) is read in row blocks (vocab 250 in blocks of 7:
    36 blocks; rows None: the default size, no block larger than a layer)."""
    out = tmp_path / f"blocked-{int(tied)}-{rows}-{vocab}"
    init_store(tiny_config(vocab_size=vocab, tie_word_embeddings=tied), out, dtype="f32", seed=3, progress=False,
               block_rows=rows)  # fmt: skip
    return out


def flip_row(store_dir: Path, unit: str, row: int) -> Path:
    """Flips one bit of row `row` of the shard's blocked matrix."""
    store = Store.open(store_dir)
    info = store.shards[unit]
    span = info.tensors["model.embed_tokens.weight" if unit == "embed" else "lm_head.weight"]
    path = info.path
    data = bytearray(path.read_bytes())
    data[info.data_offset + span.start + row * (span.nbytes // span.shape[0]) + 5] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def test_index_records_a_digest_per_row_block(tmp_path):
    from odyssey.store.checksum import BLOCKS

    d = blocked(tmp_path)
    store = Store.open(d)
    for unit in ("embed", "head"):
        rec = store.meta["shards"][store.files[unit]][BLOCKS]
        assert rec["rows"] == 7 and len(rec[FAST]) == 36
        for b, digest in zip(store.blocks(unit), rec[FAST], strict=True):
            page = store.page(b)
            assert file_digests(page.path, (FAST,), start=page.start, stop=page.end)[FAST] == digest
    for unit in (0, 1):  # decoder layers are read whole: no block digests
        assert BLOCKS not in store.meta["shards"][store.files[unit]]
    # the default block size on a tiny model is one block: nothing recorded, the shard read whole
    assert all(BLOCKS not in r for r in Store.open(blocked(tmp_path, rows=None)).meta["shards"].values())


def test_a_flipped_byte_in_a_row_block_is_refused_where_that_block_is_used(tmp_path):
    from odyssey.engine import Engine
    from odyssey.pager import Pager

    d = blocked(tmp_path)
    victim = flip_row(d, "head", 72)  # block 10 (rows 70-76) of the head
    store = Store.open(d)
    blocks = store.blocks("head")
    with Pager(store) as pager:
        pager.release(pager.get(blocks[9]))  # the block before: intact, served
        with pytest.raises(ChecksumMismatch, match=rf"{victim.name} \(head\[11/36\], rows 70-76\).*odyssey verify"):
            pager.get(blocks[10])
    flip_row(d, "embed", 22)  # block 3 (rows 21-27) of the embedding
    store = Store.open(d)
    with Engine(store, compute_dtype="fp32") as eng:
        eng.embed(torch.tensor([[0, 20, 28]]))  # rows of other blocks: used, checked, fine
        with pytest.raises(ChecksumMismatch, match=r"embed\[4/36\], rows 21-27"):
            eng.embed(torch.tensor([[1, 22]]))
    problems = verify_store(d, progress=False)[1]
    assert len(problems) == 2 and all("checksum mismatch" in p for p in problems), problems


def test_tied_head_refuses_a_flipped_embedding_block_in_generate(tmp_path, capsys):
    d = blocked(tmp_path, tied=True)
    victim = flip_row(d, "embed", 249)  # the last row, in the last (short) block
    before = digests(d)
    code = cli.main(["generate", "--model", str(d), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--quiet"])
    one_line_error(capsys, code, victim.name, "embed[36/36]", "does not match its checksum", "odyssey verify")
    assert digests(d) == before


def strip_block_digests(store_dir: Path) -> dict:
    """The index as written before row blocks: no `blocks` records (resealed, as such an index was)."""
    from odyssey.store.checksum import BLOCKS

    index = json.loads((store_dir / INDEX_NAME).read_text())
    removed = {f: rec.pop(BLOCKS) for f, rec in index["metadata"]["odyssey"]["shards"].items() if BLOCKS in rec}
    index["metadata"]["odyssey"][SEAL] = index_seal(index)
    (store_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return removed


def test_a_store_without_block_digests_is_paged_in_blocks_checked_whole_and_verify_adds_them(tmp_path):
    """A store written before row blocks (vocab 3000: the default size makes 5 blocks): the same
    blocks, each shard checked once, whole, when its first block is read; a flipped byte is still
    refused; `verify` records the block digests (the same as a new store's)."""
    from odyssey.engine import Engine
    from odyssey.pager import Pager
    from odyssey.store.checksum import BLOCKS

    d = blocked(tmp_path, rows=None, vocab=3000)
    new = Store.open(d)
    assert len(new.blocks("embed")) == 5 and len(new.blocks("head")) == 5
    ids = torch.randint(0, 3000, (1, 12))
    with Engine(new, compute_dtype="fp32") as eng:
        want = eng.logits(ids)
    removed = strip_block_digests(d)
    assert set(removed) == {new.files["embed"], new.files["head"]}
    old = Store.open(d)
    assert old.blocks("head") == new.blocks("head")  # rows from the rule, as the writer chose them
    whole = []
    real = old.check_file
    old.check_file = lambda unit: (whole.append(unit), real(unit))
    with Engine(old, compute_dtype="fp32") as eng:
        assert torch.equal(eng.logits(ids), want)
        assert torch.equal(eng.logits(ids), want)
    assert sorted(whole, key=str) == ["embed", "head"]  # once each, whole
    flip_row(d, "head", 2999)
    with Pager(Store.open(d)) as pager, pytest.raises(ChecksumMismatch, match="does not match its checksum"):
        pager.get(old.blocks("head")[0])  # block 0 is intact, the shard is not: checked whole
    flip_row(d, "head", 2999)  # undo
    p = run_cli("verify", d, "--quiet")
    assert p.returncode == 0 and "added row-block checksums" in p.stdout, p.stdout + p.stderr
    index = json.loads((d / INDEX_NAME).read_text())
    assert {f: r[BLOCKS] for f, r in index["metadata"]["odyssey"]["shards"].items() if BLOCKS in r} == removed


def _blocks_rec(i):
    from odyssey.store.checksum import BLOCKS

    return _meta(i)["shards"][shard_name(0, 4)][BLOCKS]


BLOCK_MUTATIONS = {
    "rows changed": (lambda i: _blocks_rec(i).__setitem__("rows", 8), "blocks"),
    "rows a string": (lambda i: _blocks_rec(i).__setitem__("rows", "7"), "row count"),
    "rows one block": (lambda i: _blocks_rec(i).__setitem__("rows", 250), "one block"),
    "a digest missing": (lambda i: _blocks_rec(i)[FAST].pop(), "36 digests"),
    "a digest not hex": (lambda i: _blocks_rec(i)[FAST].__setitem__(3, "xyz"), "not an xxh3_128"),
    "an extra key": (lambda i: _blocks_rec(i).__setitem__("sha256", []), "not an object"),
    "digests missing": (lambda i: _blocks_rec(i).pop(FAST), "not an object"),
    "not an object": (lambda i: _meta(i)["shards"][shard_name(0, 4)].__setitem__("blocks", [7]), "not an object"),
    "on a layer": (lambda i: _shard(i, 1).__setitem__("blocks", _blocks_rec(i)), "not read in row blocks"),
    "a digest changed": (lambda i: _blocks_rec(i)[FAST].__setitem__(3, "0" * 32), "embed[4/36]"),
}


@pytest.mark.parametrize("name", list(BLOCK_MUTATIONS))
def test_verify_and_commands_refuse_block_record_mutations(tmp_path, name):
    """Each edit of a `blocks` record (resealed: the field checks must catch it) is refused by
    verify with one line, and by what the commands do (open the store, page the blocks)."""
    from odyssey.engine import Engine

    d = blocked(tmp_path)
    mutate, needle = BLOCK_MUTATIONS[name]
    _edit_index(d, mutate)
    store, problems, _ = verify_store(d, progress=False)
    assert any(needle.lower() in p.lower() for p in problems), problems
    assert all("\n" not in p for p in problems)
    with pytest.raises(OdysseyError):
        with Engine(Store.open(d), compute_dtype="fp32") as eng:
            eng.logits(torch.tensor([[1, 2, 25]]))  # row 25 is in block 4
