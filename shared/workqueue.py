"""Stage work queues on JetStream: bounded, at least once, pulled by whichever worker is free.

The inputs of the heavy stages — utterances for ASR, user turns for the LLM, sentences for
TTS — go through one JetStream work-queue stream per stage (memory storage by default):

- **Bounded.** A stream holds at most ``max_messages`` (waiting or being worked on). A publish
  beyond that is refused at once (:class:`StageBusy`); the producer tells the gateway, and the
  device hears a short "busy" phrase instead of a silent timeout.
- **Pulled.** A worker asks for one message only when it has a free slot, so work goes to idle
  replicas, never queues behind a busy one.
- **At least once.** While a worker handles a message it tells JetStream so every
  ``ack_wait / 3``; it acks when done. A worker that dies (``kill -9``) stops, and ``ack_wait``
  later the message goes to another worker, up to ``max_deliver`` tries. Handlers see the
  delivery count, and consumers downstream tolerate the duplicates this can produce.

Subjects stay the per-session ones of :mod:`shared.subjects` (``xz.asr.<S>`` ...).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError

from prometheus_client import Counter

from shared.metrics import ERRORS
from shared.settings import StageQueueSettings, WorkSettings
from shared.subjects import Subjects

log = logging.getLogger("shared.workqueue")

STAGES = ("asr", "llm", "tts")

REDELIVERED = Counter("xz_work_redelivered_total", "Work items taken again after the worker holding them died or stalled", ["service"])
REFUSED = Counter("xz_work_refused_total", "Work items a full stage queue refused (the stage is saturated), by stage", ["stage"])

# A message's delivery count, for handlers that must tell a retry from a first try.
Handler = Callable[[Msg, int], Awaitable[None]]


class StageBusy(Exception):
    """The stage's queue is full: the stage is saturated."""


class StageUnavailable(Exception):
    """The queue cannot be reached (no JetStream, NATS down, timeout)."""


def stream_name(prefix: str, stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}_{stage}").upper()


def stage_subject(subjects: Subjects, stage: str) -> str:
    return {"asr": subjects.asr_all, "llm": subjects.llm_all, "tts": subjects.tts_all}[stage]


def stage_settings(work: WorkSettings, stage: str) -> StageQueueSettings:
    return getattr(work, stage)


def stream_config(subjects: Subjects, stage: str, work: WorkSettings) -> StreamConfig:
    """The stage's work-queue stream as the settings want it."""
    limits = stage_settings(work, stage)
    return StreamConfig(
        name=stream_name(subjects.prefix, stage),
        subjects=[stage_subject(subjects, stage)],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.MEMORY if work.storage == "memory" else StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_msgs=limits.max_messages,
        max_bytes=limits.max_bytes,
        max_age=limits.max_age_s,
        num_replicas=work.replicas,
    )


def consumer_config(subjects: Subjects, stage: str, work: WorkSettings) -> ConsumerConfig:
    """The stage's one durable pull consumer, shared by all its workers."""
    return ConsumerConfig(
        durable_name=stage,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=work.ack_wait_s,
        max_deliver=work.max_deliver,
        filter_subject=stage_subject(subjects, stage),
        max_ack_pending=-1,
        max_waiting=4096,
    )


def _differs(have: StreamConfig, want: StreamConfig) -> list[str]:
    """The settings of ``want`` that ``have`` does not match."""
    out = []
    for name in ("subjects", "retention", "storage", "discard", "max_msgs", "max_bytes", "num_replicas"):
        if getattr(have, name) != getattr(want, name):
            out.append(name)
    if abs(float(have.max_age or 0) - float(want.max_age or 0)) > 0.001:
        out.append("max_age")
    return out


class NotAllowed(Exception):
    """NATS refused (or did not answer) a JetStream call this user may not make."""


# How long to wait for an answer to a create/update this user may not be allowed to make (a
# refused request gets no answer, only a permissions error on the connection).
ADMIN_CALL_TIMEOUT_S = 2.0


async def ensure_stream(nc: NATS, subjects: Subjects, stage: str, work: WorkSettings, *, update: bool = False) -> str:
    """Make sure the stage's work-queue stream and its durable pull consumer exist.

    They are made by ``xiaozhi nats-setup`` as the admin user (:mod:`shared.natssetup`, which
    calls this with ``update=True`` to bring an existing stream to the settings' limits). A
    service calls it at start and when its fetches fail: it only looks (stream and consumer
    info, which every service user may ask for), and creates what is missing only as a fallback
    for a NATS server without users (the embedded one of tests, a bare dev server). Where its
    user may not create, it raises :class:`NotAllowed` with a message that says what to run.
    """
    js = nc.jetstream()
    name = stream_name(subjects.prefix, stage)
    config = stream_config(subjects, stage, work)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        info = None
    if info is None:
        try:
            await asyncio.wait_for(js.add_stream(config), ADMIN_CALL_TIMEOUT_S)
        except BadRequestError:
            # Made meanwhile by someone else, with other limits.
            if update:
                await js.update_stream(config)
        except (NatsTimeoutError, asyncio.TimeoutError, NoRespondersError) as exc:
            raise NotAllowed(f"work queue {name} is missing and this NATS user may not create it: run `xiaozhi nats-setup` as the admin user") from exc
    else:
        stale = _differs(info.config, config)
        if stale and update:
            await js.update_stream(config)
        elif stale:
            log.warning("work queue has other limits than the settings (kept; `xiaozhi nats-setup` applies them)", extra={"fields": {"stream": name, "differs": stale}})
    consumer = consumer_config(subjects, stage, work)
    try:
        await js.consumer_info(name, stage)
        return name
    except NotFoundError:
        pass
    try:
        await asyncio.wait_for(js.add_consumer(name, consumer), ADMIN_CALL_TIMEOUT_S)
    except BadRequestError as exc:
        log.warning("work consumer exists with another configuration, keeping it: %s", exc, extra={"fields": {"stream": name}})
    except (NatsTimeoutError, asyncio.TimeoutError, NoRespondersError) as exc:
        raise NotAllowed(f"work consumer {name}/{stage} is missing and this NATS user may not create it: run `xiaozhi nats-setup` as the admin user") from exc
    return name


async def publish_work(nc: NATS, subject: str, payload: bytes, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    """Put one work item on its stage's queue; raises :class:`StageBusy` when it is full."""
    try:
        await nc.jetstream().publish(subject, payload, timeout=timeout_s, headers=headers)
    except APIError as exc:
        text = f"{exc.description or ''} {exc.err_code or ''}".lower()
        if "maximum" in text or "exceeded" in text or exc.err_code in (10077, 10047):
            REFUSED.labels(subject.split(".")[1] if subject.count(".") >= 2 else "unknown").inc()
            raise StageBusy(subject) from exc
        raise StageUnavailable(f"{subject}: {exc}") from exc
    except (NoStreamResponseError, NoRespondersError, NatsTimeoutError, asyncio.TimeoutError) as exc:
        raise StageUnavailable(f"{subject}: {type(exc).__name__}") from exc
    except Exception as exc:  # noqa: BLE001 - connection closed, reconnecting...
        raise StageUnavailable(f"{subject}: {type(exc).__name__}: {exc}") from exc


class WorkPuller:
    """Pulls one stage's work, ``concurrency`` items at a time, and acks what it finished."""

    def __init__(self, nc: NATS, subjects: Subjects, stage: str, work: WorkSettings, handler: Handler, concurrency: int, service: str) -> None:
        self.nc = nc
        self.subjects = subjects
        self.stage = stage
        self.work = work
        self.handler = handler
        self.concurrency = max(1, concurrency)
        self.service = service
        self.stream = stream_name(subjects.prefix, stage)
        self.active: set[asyncio.Task] = set()
        self.backlog = 0
        self._loop_task: asyncio.Task | None = None
        self._backlog_task: asyncio.Task | None = None
        self._sub = None
        self._stopping = False
        self._missing = 0  # tries to find the stage's queue that found it missing

    async def start(self) -> None:
        # The stream was made at service start (shared.service); if it is missing, the pull
        # loop makes it again when its fetch fails.
        self._loop_task = asyncio.create_task(self._loop())
        self._backlog_task = asyncio.create_task(self._watch_backlog())

    async def stop(self, timeout_s: float) -> None:
        """Take no more work; let what is in hand finish (up to ``timeout_s``)."""
        self._stopping = True
        if self._backlog_task is not None:
            self._backlog_task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.active:
            await asyncio.wait(self.active, timeout=timeout_s)
        if self._sub is not None:
            # Before the connection drains: a pull subscription with a pending fetch's status
            # message in its queue would otherwise hold the drain until it is cancelled.
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
            self._sub = None

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        sub = None
        while not self._stopping:
            try:
                if sub is None:
                    sub = await self.nc.jetstream().pull_subscribe_bind(durable=self.stage, stream=self.stream)
                    self._sub = sub
                await slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=5)
                except (NatsTimeoutError, asyncio.TimeoutError):
                    slots.release()
                    continue
                except BaseException:
                    slots.release()
                    raise
                for msg in msgs:
                    task = asyncio.create_task(self._handle(msg, slots))
                    self.active.add(task)
                    task.add_done_callback(self.active.discard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS reconnecting, stream being re-made
                ERRORS.labels(self.service, "work_fetch").inc()
                log.warning("work fetch failed, retrying: %s", exc, extra={"fields": {"stage": self.stage}})
                if not self.nc.is_connected or isinstance(exc, (APIError, NoRespondersError)):
                    sub = None
                    await asyncio.sleep(1.0)
                    try:
                        if self.nc.is_connected:
                            await ensure_stream(self.nc, self.subjects, self.stage, self.work)
                    except NotAllowed as missing:
                        self._missing += 1
                        if self._missing == 1 or self._missing % 20 == 0:
                            log.error("%s; retrying", missing, extra={"fields": {"stage": self.stage, "tries": self._missing}})
                    except Exception:  # noqa: BLE001
                        pass
                else:
                    await asyncio.sleep(0.2)

    async def _handle(self, msg: Msg, slots: asyncio.Semaphore) -> None:
        beat = asyncio.create_task(self._heartbeat(msg))
        try:
            try:
                delivered = msg.metadata.num_delivered
            except Exception:  # noqa: BLE001
                delivered = 1
            if delivered > 1:
                log.warning("work redelivered (a worker died or stalled)", extra={"fields": {"stage": self.stage, "delivery": delivered, "subject": msg.subject}})
                REDELIVERED.labels(self.service).inc()
            await self.handler(msg, delivered)
        except Exception:  # noqa: BLE001 - a failing handler must not kill the loop; no retry loop either
            ERRORS.labels(self.service, "work_handler").inc()
            log.exception("work handler failed", extra={"fields": {"stage": self.stage}})
        finally:
            beat.cancel()
            slots.release()
            try:
                await msg.ack()
            except Exception as exc:  # noqa: BLE001 - NATS down: it will be redelivered, harmlessly
                ERRORS.labels(self.service, "work_ack").inc()
                log.warning("work ack failed: %s", exc)

    async def _heartbeat(self, msg: Msg) -> None:
        every = max(0.2, self.work.ack_wait_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await msg.in_progress()
            except Exception:  # noqa: BLE001
                pass

    async def _watch_backlog(self) -> None:
        """Keep :attr:`backlog`: messages waiting in the stage's queue (all its workers')."""
        while True:
            try:
                info = await self.nc.jetstream().consumer_info(self.stream, self.stage, timeout=1)
                self.backlog = int(info.num_pending or 0)
            except Exception:  # noqa: BLE001 - NATS away: keep the last figure
                pass
            await asyncio.sleep(2.0)
