"""The shared binding store (shared/bindings.py) on a real nats-server: codes per pair, binding,
conflicts, unbinding, limits, races between writers, and the import of the old SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from shared import bindings
from shared.bindings import BOUND, OTHER, UNBOUND, BindingStore, BindResult, StoreUnavailable

pytestmark = pytest.mark.e2e


async def store_on(nc, **kwargs) -> BindingStore:
    await bindings.ensure_buckets(nc, "xz", kwargs.get("code_ttl_s", 600), kwargs.get("max_pending", 10000))
    return BindingStore(nc, "xz", **kwargs)


async def test_codes_bind_once_per_pair_and_conflicts_change_nothing(nc):
    store = await store_on(nc)
    pending = await store.pending_code("AA:BB", "client-1")
    assert pending is not None and len(pending.code) == 6 and len(pending.challenge) == 32
    assert await store.pending_code("aa:bb", "client-1") == pending  # the same code until used
    assert (await store.pending_code("cc:dd", "client-1")).code != pending.code
    # Another Client-Id with the same MAC is another pair: its own code and challenge.
    phantom = await store.pending_code("aa:bb", "attacker")
    assert phantom.code != pending.code and phantom.challenge != pending.challenge
    assert (await store.lookup("aa:bb", "client-1")).state == UNBOUND
    assert await store.bind("999999" if pending.code != "999999" else "000000", "x") is None
    assert await store.bind("12a456", "x") is None
    # Checking without committing writes nothing.
    assert await store.bind(pending.code, "alice", 1, commit=False) == BindResult("aa:bb", "client-1")
    assert (await store.lookup("aa:bb", "client-1")).state == UNBOUND
    assert await store.bind(pending.code, "alice", 1) == BindResult("aa:bb", "client-1", committed=True)
    assert await store.bind(pending.code, "mallory", 2) is None  # a code works once
    found = await store.lookup("AA:BB", "client-1")
    assert found.state == BOUND and found.owner == "alice"
    assert (await store.lookup("aa:bb", "attacker")).state == OTHER
    # The phantom's code, entered by another owner, changes nothing (also when only checked).
    assert await store.bind(phantom.code, "mallory", 2, commit=False) == BindResult("aa:bb", "attacker", conflict=True)
    assert await store.bind(phantom.code, "mallory", 2) == BindResult("aa:bb", "attacker", conflict=True)
    assert (await store.lookup("aa:bb", "client-1")).state == BOUND
    # Owners are told apart by id where both sides have one: a new account named alice is
    # someone else.
    assert (await store.bind(phantom.code, "alice", 99)).conflict
    # The owner's re-flashed device (new Client-Id) replaces the binding.
    again = await store.pending_code("aa:bb", "client-2")
    assert await store.bind(again.code, "alice", 1) == BindResult("aa:bb", "client-2", replaced=True, committed=True)
    assert (await store.lookup("aa:bb", "client-2")).state == BOUND and (await store.lookup("aa:bb", "client-1")).state == OTHER


async def test_an_unbind_revokes_and_voids_every_code_drawn_before_it(nc):
    store = await store_on(nc)
    code = (await store.pending_code("aa:cc", "c")).code
    await store.bind(code, "alice", 1)
    left = await store.pending_code("aa:cc", "attacker")  # a phantom waiting for the unbind
    at = time.time()
    assert await store.unbind("AA:CC", at=at) is True
    found = await store.lookup("aa:cc", "c")
    assert found.state == UNBOUND and found.not_before == at
    assert await store.bind(left.code, "mallory", 2) is None
    assert await store.pending("aa:cc", "attacker", not_before=found.not_before) is None
    # A fresh code after the unbind works, and the unbind time stays with the record.
    fresh = await store.pending_code("aa:cc", "c", not_before=found.not_before)
    assert fresh.code != code
    assert (await store.bind(fresh.code, "bob", 3)).committed
    assert (await store.lookup("aa:cc", "c")).not_before == at
    assert await store.unbind("aa:cc", at=at - 100) is True
    assert (await store.lookup("aa:cc", "c")).not_before == at  # never moves back
    assert await store.unbind("aa:cc") is False  # not bound any more


async def test_codes_of_keyed_chips_bind_only_after_the_proof(nc):
    store = await store_on(nc)
    pending = await store.pending_code("aa:bb", "c", serial="SN1", needs_proof=True)
    assert not pending.verified
    assert await store.bind(pending.code, "alice") is None
    assert await store.mark_verified("aa:bb", "c") and (await store.pending("aa:bb", "c")).verified
    assert (await store.bind(pending.code, "alice")).device_id == "aa:bb"
    assert await store.mark_verified("aa:bb", "nobody") is False


async def test_pending_codes_are_bounded_across_gateways(nc):
    # Two gateways' stores on one NATS: at most max_pending codes wait in all, then none (503),
    # at once, never a loop; a pair that has one keeps getting it.
    first = await store_on(nc, max_pending=3)
    second = BindingStore(nc, "xz", max_pending=3)
    codes = [await (first if i % 2 else second).pending_code(f"aa:00:00:00:00:0{i}", "c") for i in range(3)]
    assert all(codes)
    started = time.monotonic()
    assert await first.pending_code("aa:00:00:00:00:09", "c") is None
    assert await second.pending_code("aa:00:00:00:00:08", "c") is None
    assert time.monotonic() - started < 5
    assert await second.pending_code("aa:00:00:00:00:00", "c") == codes[0]
    # Codes age out with the bucket's TTL.
    js = nc.jetstream()
    assert (await js.stream_info("KV_xz_codes")).config.max_msgs == 6


async def test_codes_expire(nc):
    store = await store_on(nc, code_ttl_s=1)
    pending = await store.pending_code("aa:dd", "c")
    await asyncio.sleep(1.3)
    assert await store.pending("aa:dd", "c") is None
    assert await store.bind(pending.code, "alice") is None
    assert (await store.pending_code("aa:dd", "c")).code  # a new one


async def test_racing_binds_of_one_mac_never_both_win(nc):
    # The device's own code and a phantom's, entered by two owners at the same moment through
    # two gateways: exactly one owner ends up with the MAC.
    first = await store_on(nc)
    second = BindingStore(nc, "xz")
    for round_ in range(5):
        mac = f"bb:00:00:00:00:0{round_}"
        mine = (await first.pending_code(mac, "device")).code
        theirs = (await second.pending_code(mac, "phantom")).code
        results = await asyncio.gather(first.bind(mine, "alice", 1), second.bind(theirs, "mallory", 2))
        winners = [r for r in results if r is not None and r.committed]
        assert len(winners) == 1, results
        assert sum(1 for r in results if r is not None and r.conflict) == 1
        record = await first.record(mac)
        assert record["client_id"] == winners[0].client_id


async def test_no_bucket_or_no_nats_is_unavailable_never_unbound(nc, nats_only):
    store = BindingStore(nc, "other", timeout_s=1)
    with pytest.raises(StoreUnavailable):
        await store.lookup("aa:bb", "c")
    with pytest.raises(StoreUnavailable):
        await store.pending_code("aa:bb", "c")
    ready = await store_on(nc)
    await ready.lookup("aa:bb", "c")
    nats = next(p for p in nats_only.procs if p.name == "nats")
    nats.popen.kill()
    nats.popen.wait()
    with pytest.raises(StoreUnavailable):
        await ready.lookup("aa:bb", "c")


async def test_the_old_per_gateway_file_is_imported(nc, tmp_path):
    path = tmp_path / "bindings.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE bindings (device_id TEXT PRIMARY KEY, owner TEXT NOT NULL, bound_at REAL NOT NULL, client_id TEXT)")
    db.execute("CREATE TABLE revocations (device_id TEXT PRIMARY KEY, not_before REAL NOT NULL)")
    db.execute("INSERT INTO bindings VALUES ('aa:bb', 'alice', 1.0, 'c1'), ('aa:cc', 'bob', 2.0, NULL)")
    db.execute("INSERT INTO revocations VALUES ('aa:bb', 0.5), ('aa:dd', 7.0)")
    db.commit()
    db.close()
    store = await store_on(nc)
    # A record already in the store wins over the file.
    code = (await store.pending_code("aa:cc", "c9")).code
    await store.bind(code, "carol", 5)
    assert await store.import_legacy(str(path)) == 2
    found = await store.lookup("aa:bb", "c1")
    assert found.state == BOUND and found.owner == "alice" and found.not_before == 0.5
    assert (await store.lookup("aa:cc", "c9")).owner == "carol"
    assert (await store.lookup("aa:dd", "x")) == bindings.Lookup(UNBOUND, 7.0)
