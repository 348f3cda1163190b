"""Attack: agent-store keys that collide (issue 14, vulnerability 5).

The manager publishes each bound device's agent to the ``xz_agents`` KV bucket, and the LLM
worker reads it (persona) and ``xz_memory`` (what the device said before) on every turn, both
under ``shared.agents.kv_key(device_id)``. The old key lower-cased the id and mapped every other
character to ``_``: an attacker who binds ``aa_aa_aa_aa_aa_01`` wrote the agent and read the
memory of the victim ``aa:aa:aa:aa:aa:01``, and a device called ``DEFAULT`` replaced the
deployment's default agent (every unbound device then spoke the attacker's persona). These tests
publish the agents with the manager's own publisher and drive a real LLM worker over NATS.
"""

from __future__ import annotations

import asyncio

import pytest

from manager.live import Publisher
from shared.agents import DEFAULT_KEY, AgentConfig, kv_key, reserved_device_id, save_agent
from shared.messages import UserTurn, new_turn_id
from tests.conftest import collect_llm_turn, log_records, start

VICTIM = "aa:aa:aa:aa:aa:01"
ATTACKER = "aa_aa_aa_aa_aa_01"  # the same key as VICTIM under the old scheme


def prompt_of(stack, session: str) -> dict:
    records = log_records((stack.log_dir / "llm.log").read_text(), "prompt", session)
    assert records, f"no prompt logged for {session}"
    return records[-1]


async def turn(nc, device_id: str, session: str, text: str) -> None:
    events, _jobs = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=new_turn_id(), text=text, device_id=device_id))
    assert events[-1].kind == "turn_end"


@pytest.fixture
async def publisher(nats_only, nc):
    """The manager's live-config publisher (its KV writes, without a database)."""
    pub = Publisher(asyncio.get_running_loop(), nc, "xz_agents", sessions=None)  # type: ignore[arg-type]
    await pub.open()
    return pub


async def test_colliding_device_ids_get_their_own_agent_and_memory(nats_only, nc, publisher):
    start(nats_only, "llm", {"XZ_LLM__TOOLS": "false"})
    # The victim's agent, then the attacker binds the look-alike id with an agent of their own.
    await publisher._put_many([(VICTIM, AgentConfig(agent_id="1", name="Vera", memory="short"))])
    await publisher._put_many([(ATTACKER, AgentConfig(agent_id="2", name="Mallory", memory="short"))])
    await turn(nc, VICTIM, "s-victim-1", "My bank PIN is 4711.")
    # The attacker's device speaks with the attacker's agent and remembers nothing of the victim.
    await turn(nc, ATTACKER, "s-attacker", "What did I tell you before?")
    attacker = prompt_of(nats_only, "s-attacker")
    assert attacker["agent"] == "Mallory" and attacker["remembered_messages"] == 0, attacker
    # The victim still has their own persona and their own memory (their one turn).
    await turn(nc, VICTIM, "s-victim-2", "Hello again.")
    victim = prompt_of(nats_only, "s-victim-2")
    assert victim["agent"] == "Vera" and victim["remembered_messages"] == 2, victim
    memory = await nc.jetstream().key_value("xz_memory")
    assert "4711" not in (await memory.get(kv_key(ATTACKER))).value.decode()
    assert kv_key(VICTIM) != kv_key(ATTACKER)


async def test_a_device_called_default_cannot_replace_the_default_agent(nats_only, nc, publisher):
    start(nats_only, "llm", {"XZ_LLM__TOOLS": "false"})
    kv = await nc.jetstream().key_value("xz_agents")
    await save_agent(kv, None, AgentConfig(name="House Default"))  # the deployment's default agent
    # The attacker binds a device whose id is "DEFAULT" (the manager publishes it like any other)
    # (the shared helper refuses it, below).
    await publisher._put_many([("DEFAULT", AgentConfig(agent_id="2", name="Mallory"))])
    # An unbound device's turn is answered by the default agent, not the attacker's.
    await turn(nc, "aa:bb:cc:dd:ee:99", "s-unbound", "Who are you?")
    assert prompt_of(nats_only, "s-unbound")["agent"] == "House Default"
    # Writing an agent for a reserved id is refused outright.
    assert reserved_device_id("DEFAULT") and reserved_device_id("") and not reserved_device_id(VICTIM)
    for reserved in ("DEFAULT", "default", ""):
        with pytest.raises(ValueError):
            await save_agent(kv, reserved, AgentConfig(name="Mallory"))
    assert AgentConfig.model_validate_json((await kv.get(DEFAULT_KEY)).value).name == "House Default"
