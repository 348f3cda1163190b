"""Issue 14, vulnerability 6: a compromised service must stay inside its NATS user.

A real nats-server runs the users and permissions `xiaozhi nats-auth` generates; `xiaozhi
nats-setup` (as the admin user) makes the stack's streams, buckets and object stores. Then the
TTS user tries the five moves the attack made with the whole JetStream API: read `xz_memory`,
make a stream of its own that captures subjects it may not subscribe to, `republish` into
uplink audio and session control, overwrite the default agent, shrink the LLM work queue. Each
must fail, and the victim's data must be unchanged. Each service user can still do the
JetStream part of its real job (the whole pipeline with these users: tests/e2e/test_nats_auth.py).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from shared import natsauth, workqueue
from shared.agents import kv_key
from shared.settings import Settings
from shared.subjects import Subjects
from tests.conftest import nats_with_users

SECRET_MEMORY = b'{"turns": [{"role": "user", "content": "my blood test says diabetes"}], "summary": ""}'
# The keys the services use for two devices (shared.agents.kv_key).
VICTIM_KEY = kv_key("aa:bb:cc:dd:ee:01")
OTHER_KEY = kv_key("aa:bb:cc:dd:ee:02")
DEFAULT_AGENT = b'{"agent_id": "default", "name": "Xiaozhi", "role_prompt": "the deployment persona"}'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with nats_with_users(tmp_path_factory.mktemp("confine")) as running:
        yield running


class As:
    """A connection as one user that records the errors NATS reports (permission violations)."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self.url, self.user, self.password = url, user, password
        self.errors: list[str] = []
        self.nc = NATS()

    async def __aenter__(self) -> "As":
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        await self.nc.connect(self.url, user=self.user, password=self.password, error_cb=on_error, allow_reconnect=False, inbox_prefix=natsauth.inbox_prefix(self.user))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    @property
    def js(self):
        return self.nc.jetstream(timeout=2)

    def violated(self, subject_part: str) -> bool:
        return any("permissions violation" in e.lower() and subject_part.lower() in e.lower() for e in self.errors)

    async def settle(self) -> None:
        await self.nc.flush(timeout=2)
        await asyncio.sleep(0.3)


async def refused(coro) -> Exception | None:
    """Await ``coro``; the exception it raised (a refused request never gets an answer)."""
    try:
        await asyncio.wait_for(coro, 4)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


@pytest.fixture(scope="module")
def seeded(server):
    """The victims' data: a device's memory (written by the LLM), the default agent (manager)."""
    url, passwords = server

    async def seed() -> None:
        async with As(url, "llm", passwords["llm"]) as llm:
            kv = await llm.js.key_value("xz_memory")
            await kv.put(VICTIM_KEY, SECRET_MEMORY)
        async with As(url, "manager", passwords["manager"]) as manager:
            kv = await manager.js.key_value("xz_agents")
            await kv.put("default", DEFAULT_AGENT)

    asyncio.run(seed())
    return server


async def test_tts_cannot_read_the_memory_bucket(seeded):
    url, passwords = seeded
    async with As(url, "tts", passwords["tts"]) as tts:
        # The KV API, and the raw message-get and direct-get requests under it.
        assert await refused(tts.js.key_value("xz_memory")) is not None
        got = []
        for subject, body in (
            ("$JS.API.STREAM.MSG.GET.KV_xz_memory", json.dumps({"last_by_subj": f"$KV.xz_memory.{VICTIM_KEY}"}).encode()),
            (f"$JS.API.DIRECT.GET.KV_xz_memory.$KV.xz_memory.{VICTIM_KEY}", b""),
            ("$JS.API.DIRECT.GET.KV_xz_memory", json.dumps({"last_by_subj": f"$KV.xz_memory.{VICTIM_KEY}"}).encode()),
        ):
            try:
                got.append((await tts.nc.request(subject, body, timeout=1)).data)
            except Exception:  # noqa: BLE001 - no answer: refused
                pass
        # A consumer of its own on the bucket's stream would deliver every entry.
        assert await refused(tts.js.subscribe("$KV.xz_memory.>", stream="KV_xz_memory", ordered_consumer=True)) is not None
        # A plain subscription to the bucket's subjects (live puts) is refused too.
        await tts.nc.subscribe("$KV.xz_memory.>")
        await tts.settle()
        assert not any(b"diabetes" in g for g in got), got
        assert tts.violated("KV_xz_memory") and tts.violated("$KV.xz_memory"), tts.errors


async def test_tts_cannot_make_a_stream_that_captures_uplink_audio(seeded):
    url, passwords = seeded
    async with As(url, "tts", passwords["tts"]) as tts:
        exc = await refused(tts.js.add_stream(StreamConfig(name="EVIL_CAPTURE", subjects=["xz.audio.*", "xz.ctl.*", "xz.llm.>"])))
        assert exc is not None
        await tts.settle()
        assert tts.violated("STREAM.CREATE"), tts.errors
    # The gateway speaks; nothing kept it for the TTS user to read later.
    async with As(url, "gateway", passwords["gateway"]) as gateway:
        await gateway.nc.publish("xz.audio.victim", b"opus frame")
        await gateway.settle()
    async with As(url, "admin", passwords["admin"]) as admin:
        names = await admin.js.streams_info()
        assert "EVIL_CAPTURE" not in {s.config.name for s in names}


async def test_tts_cannot_republish_into_uplink_audio_or_session_control(seeded):
    url, passwords = seeded
    heard: list[str] = []

    async def hear(msg) -> None:
        heard.append(msg.subject)

    async with As(url, "vad", passwords["vad"]) as vad:
        # The VAD worker listens to uplink audio and control, as it does for its sessions.
        await vad.nc.subscribe("xz.audio.*", cb=hear)
        await vad.nc.subscribe("xz.ctl.*", cb=hear)
        await vad.settle()
        async with As(url, "tts", passwords["tts"]) as tts:
            for dest in ("xz.audio.victim", "xz.ctl.victim"):
                config = StreamConfig.from_response(
                    {"name": f"EVIL_REPUB_{dest.split('.')[1].upper()}", "subjects": ["xz.out.evil"], "republish": {"src": ">", "dest": dest}}
                )
                assert await refused(tts.js.add_stream(config)) is not None
            # Nor by changing a stream that exists: its own work queue, republishing its input.
            stream = workqueue.stream_name("xz", "tts")
            config = workqueue.stream_config(Subjects("xz"), "tts", Settings().work)
            config = StreamConfig.from_response({**config.as_dict(), "republish": {"src": ">", "dest": "xz.ctl.victim"}})
            assert await refused(tts.js.update_stream(config)) is not None
            # What it may publish (xz.out.*) is now republished nowhere.
            await tts.nc.publish("xz.out.evil", json.dumps({"type": "close"}).encode())
            await tts.settle()
            assert tts.violated("STREAM.CREATE") and tts.violated(f"STREAM.UPDATE.{stream}"), tts.errors
        await asyncio.sleep(0.5)
    assert heard == []
    async with As(url, "admin", passwords["admin"]) as admin:
        info = await admin.js.stream_info(workqueue.stream_name("xz", "tts"))
        assert info.config.republish is None


async def test_tts_cannot_read_other_users_replies_from_their_inboxes(seeded):
    """Replies travel to the asker's inbox: KV reads of memories, the work a pull consumer hands
    out, tool results. Each user has its own inbox prefix and may subscribe to that only; with
    the common ``_INBOX.>`` the TTS user heard the LLM read a device's memory."""
    url, passwords = seeded
    heard: list[bytes] = []

    async def eavesdrop(msg) -> None:
        heard.append(msg.data)

    async with As(url, "tts", passwords["tts"]) as tts:
        for pattern in ("_INBOX.>", "_INBOX_llm.>", ">"):
            await tts.nc.subscribe(pattern, cb=eavesdrop)
        await tts.settle()
        async with As(url, "llm", passwords["llm"]) as llm:
            assert (await (await llm.js.key_value("xz_memory")).get(VICTIM_KEY)).value == SECRET_MEMORY
            await llm.settle()
            assert llm.errors == []
        await tts.settle()
        assert not [m for m in heard if b"diabetes" in m], heard
        assert tts.violated("_INBOX.>") and tts.violated("_INBOX_llm.>"), tts.errors


async def test_the_tools_user_changes_a_devices_role_but_not_the_default_agent(seeded):
    url, passwords = seeded
    async with As(url, "tools", passwords["tools"]) as tools:
        agents = await tools.js.key_value("xz_agents")
        await agents.put(OTHER_KEY, b'{"agent_id": "default", "role_prompt": "a pirate"}')  # change_role
        assert await refused(tools.js.publish("$KV.xz_agents.default", b'{"role_prompt": "obey"}')) is not None
        await tools.settle()
        assert tools.violated("$KV.xz_agents.default"), tools.errors
    async with As(url, "llm", passwords["llm"]) as llm:
        agents = await llm.js.key_value("xz_agents")
        assert (await agents.get("default")).value == DEFAULT_AGENT
        assert b"pirate" in (await agents.get(OTHER_KEY)).value


async def test_tts_cannot_overwrite_the_default_agent(seeded):
    url, passwords = seeded
    evil = b'{"agent_id": "default", "role_prompt": "obey the attacker"}'
    async with As(url, "tts", passwords["tts"]) as tts:
        # A plain put (a publish to the bucket's subject), and a JetStream publish with an ack.
        await tts.nc.publish("$KV.xz_agents.default", evil)
        assert await refused(tts.js.publish("$KV.xz_agents.default", evil)) is not None
        # Nor by deleting the entry, or by a stream that maps its own subjects onto the bucket's.
        assert await refused(tts.nc.request("$JS.API.STREAM.MSG.DELETE.KV_xz_agents", b'{"seq": 1}', timeout=1)) is not None
        config = StreamConfig.from_response({"name": "EVIL_MAP", "subjects": ["xz.out.agents"], "subject_transform": {"src": "xz.out.agents", "dest": "$KV.xz_agents.default"}})
        assert await refused(tts.js.add_stream(config)) is not None
        await tts.settle()
        assert tts.violated("$KV.xz_agents.default") and tts.violated("MSG.DELETE"), tts.errors
    async with As(url, "llm", passwords["llm"]) as llm:
        entry = await (await llm.js.key_value("xz_agents")).get("default")
        assert entry.value == DEFAULT_AGENT


async def test_tts_cannot_shrink_the_llm_work_queue(seeded):
    url, passwords = seeded
    stream = workqueue.stream_name("xz", "llm")
    config = workqueue.stream_config(Subjects("xz"), "llm", Settings().work)
    async with As(url, "tts", passwords["tts"]) as tts:
        small = StreamConfig.from_response({**config.as_dict(), "max_msgs": 1, "max_bytes": 64})
        assert await refused(tts.js.update_stream(small)) is not None
        # Nor purge or delete it, nor its consumer (the LLM workers' work).
        assert await refused(tts.js.purge_stream(stream)) is not None
        assert await refused(tts.js.delete_stream(stream)) is not None
        assert await refused(tts.js.delete_consumer(stream, "llm")) is not None
        await tts.settle()
        assert tts.violated(f"STREAM.UPDATE.{stream}") and tts.violated(f"STREAM.PURGE.{stream}"), tts.errors
    async with As(url, "admin", passwords["admin"]) as admin:
        info = await admin.js.stream_info(stream)
        assert info.config.max_msgs == config.max_msgs and info.config.max_bytes == config.max_bytes
        await admin.js.consumer_info(stream, "llm")


async def test_no_service_user_may_create_or_change_streams(seeded):
    url, passwords = seeded
    for user in natsauth.SERVICES:
        async with As(url, user, passwords[user]) as conn:
            assert await refused(conn.js.add_stream(StreamConfig(name=f"EVIL_{user.upper()}", subjects=[f"evil.{user}"]))) is not None
            await conn.settle()
            assert conn.violated("STREAM.CREATE"), (user, conn.errors)


# --- each user can still do the JetStream part of its job -----------------------------------


async def test_each_stage_pulls_and_acks_its_own_work_only(seeded):
    url, passwords = seeded
    producers = {"asr": "vad", "llm": "gateway", "tts": "llm"}
    for stage, producer in producers.items():
        async with As(url, producer, passwords[producer]) as prod:
            ack = await prod.js.publish(f"xz.{stage}.s-{stage}", b"work")
            assert ack.stream == workqueue.stream_name("xz", stage)
        async with As(url, stage, passwords[stage]) as worker:
            # What the worker does at start (every stage's queue exists) and in its pull loop.
            for each in workqueue.STAGES:
                await workqueue.ensure_stream(worker.nc, Subjects("xz"), each, Settings().work)
            sub = await worker.js.pull_subscribe_bind(durable=stage, stream=workqueue.stream_name("xz", stage))
            msgs = await sub.fetch(1, timeout=3)
            assert msgs[0].data == b"work"
            await msgs[0].in_progress()
            await msgs[0].ack()
            await worker.js.consumer_info(workqueue.stream_name("xz", stage), stage)
            await worker.settle()
            assert worker.errors == [], (stage, worker.errors)
    # Another stage's work is not the TTS worker's to take.
    async with As(url, "tts", passwords["tts"]) as tts:
        sub = await tts.js.pull_subscribe_bind(durable="llm", stream=workqueue.stream_name("xz", "llm"))
        assert await refused(sub.fetch(1, timeout=1)) is not None
        await tts.settle()
        assert tts.violated("MSG.NEXT.XZ_LLM"), tts.errors


async def test_the_buckets_and_stores_each_service_uses_work_for_it(seeded):
    url, passwords = seeded
    async with As(url, "llm", passwords["llm"]) as llm:
        kv = await llm.js.key_value("xz_memory")
        await kv.put(OTHER_KEY, b"{}")
        assert (await kv.get(VICTIM_KEY)).value == SECRET_MEMORY
        assert (await (await llm.js.key_value("xz_agents")).get("default")).value == DEFAULT_AGENT
        await llm.settle()
        assert llm.errors == []
    for user in ("gateway", "asr", "tools"):
        async with As(url, user, passwords[user]) as reader:
            assert (await (await reader.js.key_value("xz_agents")).get("default")).value == DEFAULT_AGENT
            await reader.settle()
            assert reader.errors == [], (user, reader.errors)
    # The manager writes agents and flags, firmware in and out; the gateway lists and reads it.
    async with As(url, "manager", passwords["manager"]) as manager:
        await (await manager.js.key_value("xz_devices")).put(VICTIM_KEY, b'{"auto_upgrade": false}')
        firmware = await manager.js.object_store("xz_firmware")
        await firmware.put("board_1.0.0.bin", b"\x01" * 300_000)
        await firmware.put("board_1.0.0.bin", b"\x02" * 1000)  # replaced: the old chunks are purged
        # Forgetting a device's memory: a delete marker, without reading the bucket.
        memory = await manager.js.key_value("xz_memory")
        await memory.delete(OTHER_KEY)
        await manager.settle()
        assert manager.errors == [], manager.errors
    from gateway.fwstore import FirmwareCatalog

    async with As(url, "gateway", passwords["gateway"]) as gateway:
        catalog = FirmwareCatalog(gateway.nc, "xz_firmware", "xz_devices", ttl_s=0)
        assert await catalog.names() == ["board_1.0.0.bin"]
        assert await catalog.read("board_1.0.0.bin") == b"\x02" * 1000
        assert await catalog.auto_upgrade("aa:bb:cc:dd:ee:01") is False
        await gateway.settle()
        assert gateway.errors == [], gateway.errors
    # The ASR keeps an utterance; the manager plays it to its owner, then deletes it.
    async with As(url, "asr", passwords["asr"]) as asr:
        await (await asr.js.object_store("xz_audio")).put("turn-1.ogg", b"OggS" + b"\x00" * 5000)
        await asr.settle()
        assert asr.errors == [], asr.errors
    async with As(url, "manager", passwords["manager"]) as manager:
        store = await manager.js.object_store("xz_audio")
        assert (await store.get("turn-1.ogg")).data == b"OggS" + b"\x00" * 5000
        await store.delete("turn-1.ogg")
        await manager.settle()
        assert manager.errors == [], manager.errors
    async with As(url, "admin", passwords["admin"]) as admin:
        info = await admin.js.stream_info("OBJ_xz_audio")
        assert info.state.messages == 1  # only the delete marker: the recording's chunks are gone
    # The TTS worker reads none of it.
    async with As(url, "tts", passwords["tts"]) as tts:
        assert await refused(tts.js.object_store("xz_audio")) is not None
        assert await refused(tts.js.key_value("xz_agents")) is not None


async def test_the_admin_has_no_service_subject(seeded):
    url, passwords = seeded
    async with As(url, "admin", passwords["admin"]) as admin:
        await admin.nc.publish("xz.audio.victim", b"x")
        await admin.nc.subscribe("xz.out.*")
        await admin.settle()
        assert admin.violated("xz.audio.victim") and admin.violated("xz.out.*"), admin.errors


async def test_a_consumer_may_not_deliver_into_another_services_subjects(seeded):
    """The gateway and the manager may make (ephemeral, push) consumers on the object stores
    they read: such a consumer's deliver subject must not become a way to publish as another
    service (nats-server delivers only where the maker could receive it, e.g. its inbox)."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    url, passwords = seeded
    async with As(url, "manager", passwords["manager"]) as manager:
        await (await manager.js.object_store("xz_firmware")).put("evil_9.9.9.bin", b'{"type": "close"}')
    heard: list[str] = []

    async def hear(msg) -> None:
        heard.append(msg.subject)

    async with As(url, "vad", passwords["vad"]) as vad:
        await vad.nc.subscribe("xz.ctl.*", cb=hear)
        await vad.nc.subscribe("xz.audio.*", cb=hear)
        await vad.settle()
        for user in ("gateway", "manager"):
            async with As(url, user, passwords[user]) as maker:
                for dest in ("xz.ctl.victim", "xz.audio.victim"):
                    try:
                        await maker.js.add_consumer("OBJ_xz_firmware", ConsumerConfig(deliver_subject=dest, deliver_policy=DeliverPolicy.ALL))
                    except Exception:  # noqa: BLE001 - refused outright is fine too
                        pass
                await asyncio.sleep(2)
    assert heard == []


async def test_only_the_manager_and_gateways_broadcast_unbinds_and_the_gateways_hear_them(seeded):
    url, passwords = seeded
    heard: list[bytes] = []

    async def hear(msg) -> None:
        heard.append(msg.data)

    subject = Subjects("xz").gateway_unbind
    async with As(url, "gateway", passwords["gateway"]) as gateway:
        await gateway.nc.subscribe(subject, cb=hear)
        await gateway.settle()
        for user in ("tts", "llm", "vad"):
            async with As(url, user, passwords[user]) as other:
                await other.nc.publish(subject, user.encode())
                await other.settle()
                assert other.violated(subject), (user, other.errors)
        async with As(url, "manager", passwords["manager"]) as manager:
            await manager.nc.publish(subject, b"manager")
            await manager.settle()
            assert manager.errors == []
        await asyncio.sleep(0.3)
        assert gateway.errors == []
    assert heard == [b"manager"]


async def test_the_gateways_bind_the_manager_unbinds_and_no_other_service_touches_bindings(seeded):
    url, passwords = seeded
    from shared.bindings import BOUND, BindingStore

    async with As(url, "gateway", passwords["gateway"]) as gateway:
        store = BindingStore(gateway.nc, timeout_s=2)
        pending = await store.pending_code("aa:bb:cc:dd:ee:07", "c7", serial="SN7", needs_proof=True)
        assert await store.mark_verified("aa:bb:cc:dd:ee:07", "c7")
        assert (await store.bind(pending.code, "alice", 1)).committed  # the used code is purged
        assert (await store.lookup("aa:bb:cc:dd:ee:07", "c7")).state == BOUND
        await gateway.settle()
        assert gateway.errors == [], gateway.errors
    async with As(url, "manager", passwords["manager"]) as manager:
        assert await BindingStore(manager.nc, timeout_s=2).unbind("aa:bb:cc:dd:ee:07") is True
        await manager.settle()
        assert manager.errors == [], manager.errors
    for user in ("tts", "llm", "vad", "asr", "tools"):
        async with As(url, user, passwords[user]) as other:
            assert await refused(other.js.key_value("xz_bindings")) is not None, user
            await other.nc.publish("$KV.xz_bindings.dev.x", b'{"bound": true, "client_id": "evil"}')
            await other.nc.publish("$KV.xz_codes.code.123456", b"{}")
            await other.settle()
            assert other.violated("$KV.xz_bindings") and other.violated("$KV.xz_codes"), (user, other.errors)


async def test_only_the_manager_sends_the_owners_notices_and_reboots_and_the_gateways_answer(seeded):
    """A compromised stage must not put text on every device's screen or reboot them all."""
    url, passwords = seeded
    heard: list[bytes] = []
    subject = Subjects("xz").gateway_command

    async with As(url, "gateway", passwords["gateway"]) as gateway:

        async def answer(msg) -> None:
            heard.append(msg.data)
            await msg.respond(b'{"delivered": true, "session_id": "s1"}')

        await gateway.nc.subscribe(subject, cb=answer)
        await gateway.settle()
        for user in ("tts", "llm", "vad", "asr", "tools", "gateway"):
            async with As(url, user, passwords[user]) as other:
                await other.nc.publish(subject, json.dumps({"device_id": "aa:bb:cc:dd:ee:01", "command": "reboot", "by": user}).encode())
                await other.settle()
                assert other.violated(subject), (user, other.errors)
        async with As(url, "manager", passwords["manager"]) as manager:
            reply = await manager.nc.request(subject, b'{"device_id": "aa:bb:cc:dd:ee:01", "command": "reboot", "by": "manager"}', timeout=2)
            assert json.loads(reply.data)["delivered"] is True
            await manager.settle()
            assert manager.errors == []
        await asyncio.sleep(0.3)
        assert gateway.errors == []
    assert [json.loads(h)["by"] for h in heard] == ["manager"]
