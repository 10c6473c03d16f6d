"""Hostile input to a worker: what a peer on the broker's public address may send.

The broker forwards a client's CALL and OPEN to a worker that also hosts other clients'
slots, so nothing one client sends may make the worker run unbounded work (it holds the
GIL: heartbeats stop and every other client loses its slots) or import a module its
operator did not allow. Two findings of a hostile-input audit, each with its tests:

- Actions are checked whole (structure, shape, dtype) against the slot count and the
  action space before anything is iterated; the codec refuses zero-size arrays whose
  shape spans more than it allows. A bad action gets an ``action`` error reply (the wire
  code of ``InvalidActionError``).
- An env id written ``module:Env-v0`` imports ``module`` in ``gymnasium.make``: a worker
  imports only what ``--import``/``--allow-import`` permit, whatever the id's syntax, and
  registrations from the wire name only env classes or callables of allowed modules.

Most tests drive ``SlotHost`` directly, with calls encoded as a client (or an attacker)
would; the last one sends the attack through a real broker to a real worker process.
"""

from __future__ import annotations

import itertools
import os
import resource
import sys
import time

import gymnasium
import msgpack
import numpy as np
import psutil
import pytest
from gymnasium import spaces

import remoterl
from conftest import T, closed_after, start_broker, start_worker, status
from remoterl.wire import codec
from remoterl.errors import InvalidActionError, ProtocolError
from remoterl.workers.runtime import SlotHost

CLIENT = b"client-A"
SLOTS = [1, 2, 3]


# ----------------------------------------------------------------------------
# Helpers


def raw_array(dtype: str, shape: list[int]) -> msgpack.ExtType:
    """An inline array as a peer may write it: the header says ``shape``, no data follows
    (the codec's own encoder refuses to write the big ones)."""
    meta = msgpack.packb([dtype, shape])
    return msgpack.ExtType(1, len(meta).to_bytes(2, "little") + meta)


def send(host: SlotHost, request: dict, client: bytes = CLIENT) -> dict:
    """Encode ``request`` (msgpack ExtTypes pass through raw), run it, decode the reply."""
    header, frames = codec.encode(request)
    reply_header, reply_frames = host.call(client, header, frames, 0)
    return codec.decode(reply_header, reply_frames)


def error_of(reply: dict, code: str) -> str:
    assert set(reply) == {"r", "error"}, reply
    assert reply["error"]["code"] == code, reply["error"]
    return reply["error"]["msg"]


class RecordingEnv(gymnasium.Env):
    """Any action space; records the actions it is stepped with."""

    metadata = {"render_modes": []}

    def __init__(self, action_space: spaces.Space) -> None:
        self.action_space = action_space
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.actions: list = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.actions.append(action)
        return np.zeros(2, np.float32), 0.0, False, False, {}


NESTED = spaces.Dict({
    "arm": spaces.Box(-1.0, 1.0, (2,), np.float32),
    "grip": spaces.Discrete(2),
    "mode": spaces.Tuple((spaces.Discrete(3), spaces.MultiBinary(2))),
    "word": spaces.Text(5),
})
ACTION_SPACES = {
    "Nested-v0": NESTED,
    "Empty-v0": spaces.Box(-1.0, 1.0, (0,), np.float32),  # a zero-size action, legitimately
    "Pair-v0": spaces.Tuple((spaces.Discrete(2), spaces.Discrete(2))),
    "Multi-v0": spaces.MultiDiscrete([3, 3]),
}


def host_with(env_id: str, slots=SLOTS) -> SlotHost:
    host = SlotHost(None, 8, make=lambda env_id, **kw: RecordingEnv(ACTION_SPACES[env_id]))
    assert "error" not in host.open(CLIENT, {"r": 1, "env": env_id, "kwargs": {}, "slots": list(slots)})
    return host


def stepped(host: SlotHost) -> int:
    return sum(len(slot.env.actions) for slot in host.slots.values())


# ----------------------------------------------------------------------------
# Zero-size and misshapen actions: refused whole, before anything is iterated


@pytest.mark.parametrize("shape", [[2**25, 0], [2**62, 0], [2**64 - 1, 0], [0, 2**40], [3, 0, 2**60],
                                   [2] * 60 + [0], [1] * 64 + [0]])
def test_zero_size_arrays_spanning_more_than_the_codec_allows_are_refused_at_once(shape):
    host = SlotHost(None, 8)
    assert "error" not in host.open(CLIENT, {"r": 1, "env": "CartPole-v1", "kwargs": {}, "slots": SLOTS})
    send(host, {"r": 2, "op": "reset", "slots": SLOTS})
    header = msgpack.packb({"r": 7, "op": "step", "slots": SLOTS, "m": 0, "a": raw_array("<i8", shape)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    reply = codec.decode(host.call(CLIENT, header, [], 0)[0])
    took = time.monotonic() - started
    assert len(header) < 64 + 10 * len(shape)  # the attack: a few dozen bytes
    assert reply["r"] == 7
    assert "spans" in error_of(reply, "protocol") or "malformed" in reply["error"]["msg"]
    # Before the fix, (2**25, 0) took seconds and 2.4 GB; here nothing was iterated at all.
    assert took < 0.5, took
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50 * 1024  # KiB
    assert host.stats["steps"] == 0
    # The host serves on.
    assert "error" not in send(host, {"r": 8, "op": "step", "slots": SLOTS, "a": np.zeros(3, np.int64), "m": 0})
    host.close_all()


@pytest.mark.parametrize("dtype", ["<U0", "|S0", "|V0"])
def test_arrays_of_a_size_zero_dtype_are_bounded_like_zero_size_ones(dtype):
    with pytest.raises(ProtocolError, match="spans"):
        codec.decode(msgpack.packb(raw_array(dtype, [2**28])))
    assert codec.decode(msgpack.packb(raw_array(dtype, [64]))).shape == (64,)


def test_the_encoder_refuses_what_the_decoder_would():
    with pytest.raises(remoterl.CodecError, match=r"info\['x'\].*spans"):
        codec.encode({"x": np.empty((2**17, 0))}, name="info")
    assert codec.decode(*codec.encode(np.empty((2**16, 0)))).shape == (2**16, 0)
    assert codec.decode(*codec.encode(np.empty((64, 0, 3)))).shape == (64, 0, 3)


@pytest.mark.parametrize("action", [
    np.zeros((60_000, 0), np.int64),   # within the codec's bound, still not 3 actions
    np.zeros((3, 0), np.int64),        # 3 rows, but zero-size
    np.zeros((0,), np.int64),          # no actions
    np.zeros((3, 1), np.int64),        # one dimension too many
    np.zeros(3, np.float32),           # not integers
    np.zeros(3, np.bool_),             # bools are not actions of a Discrete space
    np.array(["0", "1", "0"]),         # strings
    np.zeros(3, np.complex64),
    {"a": np.zeros(3, np.int64)},
    None,
], ids=["60000x0", "3x0", "0", "3x1", "float", "bool", "str", "complex", "dict", "none"])
def test_step_actions_that_do_not_fit_are_an_action_error(action):
    host = SlotHost(None, 8)
    assert "error" not in host.open(CLIENT, {"r": 1, "env": "CartPole-v1", "kwargs": {}, "slots": SLOTS})
    send(host, {"r": 2, "op": "reset", "slots": SLOTS})
    message = error_of(send(host, {"r": 3, "op": "step", "slots": SLOTS, "a": action, "m": 0}), "action")
    assert "Discrete(2)" in message
    assert host.stats["steps"] == 0
    host.close_all()


def test_a_zero_size_action_space_takes_zero_size_actions():
    host = host_with("Empty-v0")
    reply = send(host, {"r": 1, "op": "step", "slots": SLOTS, "a": np.zeros((3, 0), np.float32), "m": 0})
    assert "error" not in reply, reply
    assert stepped(host) == 3
    assert all(a.shape == (0,) for slot in host.slots.values() for a in slot.env.actions)
    for bad in (np.zeros((60_000, 0), np.float32), np.zeros((3, 0, 0), np.float32), np.zeros((3, 1), np.float32)):
        error_of(send(host, {"r": 2, "op": "step", "slots": SLOTS, "a": bad, "m": 0}), "action")
    assert stepped(host) == 3
    host.close_all()


def nested_batch(n: int = 3) -> dict:
    return {"arm": np.zeros((n, 2), np.float32), "grip": np.ones(n, np.int64),
            "mode": (np.full(n, 2, np.int64), np.ones((n, 2), np.int8)), "word": ("ab",) * n}


def test_nested_actions_are_checked_leaf_by_leaf():
    host = host_with("Nested-v0")
    reply = send(host, {"r": 1, "op": "step", "slots": SLOTS, "a": nested_batch(), "m": 0})
    assert "error" not in reply, reply
    action = host.slots[2].env.actions[0]
    assert set(action) == set(NESTED.spaces) and action["word"] == "ab" and action["mode"][0] == 2

    def broken(**change):
        batch = nested_batch()
        for key, value in change.items():
            if value is KeyError:
                del batch[key]
            else:
                batch[key] = value
        return batch

    cases = {
        "a key missing": (broken(word=KeyError), "keys"),
        "an extra key": ({**nested_batch(), "extra": np.zeros(3)}, "keys"),
        "a leaf zero-size": (broken(arm=np.zeros((60_000, 0), np.float32)), "actions['arm']"),
        "a leaf of strings": (broken(grip=np.array(["1", "1", "1"])), "actions['grip']"),
        "a tuple too short": (broken(mode=(np.zeros(3, np.int64),)), "actions['mode']"),
        "a tuple as a list": (broken(mode=[np.zeros(3, np.int64), np.ones((3, 2), np.int8)]), "actions['mode']"),
        "a tuple as an array": (broken(mode=np.zeros((2, 3), np.int64)), "actions['mode']"),
        "a tuple leaf zero-size": (broken(mode=(np.zeros((60_000, 0), np.int64), np.ones((3, 2)))),
                                   "actions['mode'][0]"),
        "too few words": (broken(word=("ab",) * 2), "actions['word']"),
        "a word not a str": (broken(word=("ab", 3, "c")), "actions['word']"),
        "not a dict": ((np.zeros(3),), "keys"),
    }
    for name, (batch, where) in cases.items():
        message = error_of(send(host, {"r": 2, "op": "step", "slots": SLOTS, "a": batch, "m": 0}), "action")
        assert where in message, (name, message)
    assert stepped(host) == 3  # only the first, valid, call stepped
    host.close_all()


@pytest.mark.parametrize("env_id, action", [
    ("CartPole-v1", 1),
    ("CartPole-v1", np.int64(1)),
    ("CartPole-v1", np.array(1)),
    ("Pair-v0", (0, 1)),
    ("Pair-v0", [0, 1]),
    ("Pair-v0", np.array([0, 1])),
    ("Multi-v0", np.array([2, 0])),
    ("Multi-v0", [2, 0]),
    ("Empty-v0", np.zeros(0, np.float32)),
    ("Nested-v0", {"arm": [0.5, -0.5], "grip": 1, "mode": (2, np.array([0, 1], np.int8)), "word": "hi"}),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_single_step_takes_what_remote_env_sends(env_id, action):
    host = SlotHost(None, 8, make=lambda env_id, **kw: RecordingEnv(ACTION_SPACES[env_id]) if env_id in
                    ACTION_SPACES else gymnasium.make(env_id))
    assert "error" not in host.open(CLIENT, {"r": 1, "env": env_id, "kwargs": {}, "slots": [1]})
    send(host, {"r": 2, "op": "reset", "slots": [1], "single": True})
    reply = send(host, {"r": 3, "op": "step", "slots": [1], "a": action, "single": True})
    assert "error" not in reply, reply
    assert host.stats["steps"] == 1
    host.close_all()


@pytest.mark.parametrize("env_id, action", [
    ("CartPole-v1", np.zeros((60_000, 0), np.int64)),
    ("CartPole-v1", 1.0),
    ("CartPole-v1", True),
    ("CartPole-v1", "1"),
    ("Pair-v0", np.zeros((60_000, 0), np.int64)),  # gymnasium's Tuple.contains would iterate it
    ("Pair-v0", (0, 1, 1)),
    ("Pair-v0", (0, np.zeros((60_000, 0), np.int64))),
    ("Multi-v0", np.zeros((2, 0), np.int64)),
    ("Multi-v0", np.array([0.5, 1.0])),
    ("Empty-v0", np.zeros((60_000, 0), np.float32)),
    ("Nested-v0", {"arm": [0.5, -0.5], "grip": 1}),
    ("Nested-v0", {"arm": [0.5, -0.5], "grip": 1, "mode": (2, [0, 1]), "word": 5}),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_single_step_actions_that_do_not_fit_are_an_action_error(env_id, action):
    host = SlotHost(None, 8, make=lambda env_id, **kw: RecordingEnv(ACTION_SPACES[env_id]) if env_id in
                    ACTION_SPACES else gymnasium.make(env_id))
    assert "error" not in host.open(CLIENT, {"r": 1, "env": env_id, "kwargs": {}, "slots": [1]})
    send(host, {"r": 2, "op": "reset", "slots": [1], "single": True})
    started = time.monotonic()
    error_of(send(host, {"r": 3, "op": "step", "slots": [1], "a": action, "single": True}), "action")
    assert time.monotonic() - started < 0.5
    assert host.stats["steps"] == 0
    host.close_all()


def test_client_side_checks_are_the_worker_side_checks():
    # What RemoteEnv / RemoteEnvVec refuse before sending is what the worker refuses on arrival.
    from remoterl.wire.actions import check_action, check_actions

    with pytest.raises(InvalidActionError):
        check_actions(spaces.Discrete(2), np.zeros((2**25, 0), np.int64), 4)
    with pytest.raises(InvalidActionError, match=r"actions\['mode'\]\[1\]"):
        check_actions(NESTED, {**nested_batch(4), "mode": (np.zeros(4, np.int64), np.zeros((4, 0)))}, 4)
    with pytest.raises(InvalidActionError):
        check_action(spaces.Tuple((spaces.Discrete(2),)), np.zeros((2**25, 0)))
    # Lists are what numpy reads them as: fine from a trainer, and returned as arrays.
    out = check_actions(spaces.Box(-1, 1, (2,)), [[0.0, 1.0]] * 4, 4)
    assert type(out) is np.ndarray and out.shape == (4, 2)
    with pytest.raises(InvalidActionError, match="not an array"):
        check_actions(spaces.Box(-1, 1, (2,)), [[0.0, 1.0], [0.0]], 2)


def test_reset_seeds_must_match_the_slots():
    host = SlotHost(None, 8)
    assert "error" not in host.open(CLIENT, {"r": 1, "env": "CartPole-v1", "kwargs": {}, "slots": SLOTS})
    for seeds in (list(range(10**6)), [], [0, 1], 3):
        error_of(send(host, {"r": 2, "op": "reset", "slots": SLOTS, "seeds": seeds}), "protocol")
    assert host.stats["resets"] == 0
    host.close_all()


def test_a_slot_named_twice_is_refused_before_any_step():
    host = host_with("Empty-v0")
    for slots in ([1] * 1000, [1, 2, 1]):
        reply = send(host, {"r": 2, "op": "step", "slots": slots,
                            "a": np.zeros((len(slots), 0), np.float32), "m": 0})
        assert "once" in error_of(reply, "protocol")
    assert stepped(host) == 0
    host.close_all()


# ----------------------------------------------------------------------------
# Import bypass: "module:Env-v0" ids and registrations from the wire


CANARY = '''
import gymnasium
from importlib import import_module  # an allowed module's import is no entry point
from functools import partial

IMPORTED = True

class CanaryEnv(gymnasium.Env):
    metadata = {"render_modes": []}
    def __init__(self, **kwargs):
        self.observation_space = gymnasium.spaces.Discrete(2)
        self.action_space = gymnasium.spaces.Discrete(2)
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return 0, {}
    def step(self, action):
        return 0, 0.0, False, False, {}

def make_canary(**kwargs):
    return CanaryEnv(**kwargs)

made_by_partial = partial(CanaryEnv, flavour="partial")

gymnasium.register(id="{env_id}", entry_point=__name__ + ":CanaryEnv")
'''


_canaries = itertools.count()


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """A module on sys.path, not yet imported, that registers an env id when imported.
    Yields ``(module name, env id)``; both are gone again afterwards."""
    n = next(_canaries)
    name, env_id = f"remoterl_canary_{os.getpid()}_{n}", f"Canary{n}-v0"
    (tmp_path / f"{name}.py").write_text(CANARY.replace("{env_id}", env_id))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name not in sys.modules
    yield name, env_id
    sys.modules.pop(name, None)
    for key in [k for k in gymnasium.registry if k.startswith("Canary")]:
        gymnasium.registry.pop(key)


@pytest.mark.parametrize("allow", [(), ["some_other_module"], ["remoterl_canary"]],
                         ids=["nothing", "another-module", "a-prefix-not-a-package"])
def test_an_env_id_naming_a_module_imports_nothing_unless_allowed(canary, allow):
    name, env_id = canary
    host = SlotHost(None, 8, allow_import=allow)  # a worker started without --env: serves "*"
    assert host.served() == ["*"]
    reply = host.open(CLIENT, {"r": 1, "env": f"{name}:{env_id}", "kwargs": {}, "slots": [1]})
    assert "env" not in reply and reply["error"]["code"] == "no_worker"
    assert f"--import {name}" in reply["error"]["msg"]
    assert name not in sys.modules, "the module was imported"
    assert env_id not in gymnasium.registry
    assert host.slots == {}
    # Registered ids are still served.
    assert "error" not in host.open(CLIENT, {"r": 2, "env": "CartPole-v1", "kwargs": {}, "slots": [2]})
    host.close_all()


@pytest.mark.parametrize("allow", ["alone", "among-others", "any"])
def test_an_env_id_naming_an_allowed_module_is_served(canary, allow):
    name, env_id = canary
    allow_import = {"alone": [name], "among-others": ["x", name], "any": None}[allow]
    host = SlotHost(None, 8, allow_import=allow_import)  # "any": the embedded default
    reply = host.open(CLIENT, {"r": 1, "env": f"{name}:{env_id}", "kwargs": {}, "slots": [1]})
    assert "error" not in reply, reply
    assert sys.modules[name].IMPORTED and type(host.slots[1].env.unwrapped).__name__ == "CanaryEnv"
    host.close_all()


@pytest.mark.parametrize("env_id", ["os:Foo-v0", "remoterl_no_such_module:Foo-v0", ":Foo-v0",
                                    ".relative:Foo-v0", "a:b:Foo-v0"])
def test_module_ids_are_refused_before_gymnasium_sees_them(env_id):
    made = []
    host = SlotHost(None, 8, make=lambda *args, **kw: made.append(args), allow_import=())
    reply = host.open(CLIENT, {"r": 1, "env": env_id, "kwargs": {}, "slots": [1]})
    assert reply["error"]["code"] == "no_worker" and made == []


def test_registration_names_an_env_class_or_a_callable_of_an_allowed_module(canary):
    name, _ = canary
    host = SlotHost(None, 8, allow_import=[name])
    spec = {"kwargs": {}, "max_episode_steps": 5}
    try:
        assert host.register({**spec, "id": "CanaryClass-v0", "entry_point": f"{name}:CanaryEnv"}) == (True, "")
        assert host.register({**spec, "id": "CanaryFn-v0", "entry_point": f"{name}:make_canary"}) == (True, "")
        assert host.register({**spec, "id": "CanaryPartial-v0", "entry_point": f"{name}:made_by_partial"}) \
            == (True, "")
        # The module's own imports are not entry points: make() would call them with an OPEN's kwargs.
        ok, why = host.register({**spec, "id": "CanaryImport-v0", "entry_point": f"{name}:import_module"})
        assert not ok and "not an env class" in why
        assert "CanaryImport-v0" not in gymnasium.registry
        ok, why = host.register({**spec, "id": "CanaryMissing-v0", "entry_point": f"{name}:NoSuchThing"})
        assert not ok and "no attribute" in why
        # Served: the registered ids open.
        reply = host.open(CLIENT, {"r": 1, "env": "CanaryFn-v0", "kwargs": {}, "slots": [1]})
        assert "error" not in reply, reply
    finally:
        host.close_all()


@pytest.mark.parametrize("spec, why", [
    ({"id": "X-v0", "entry_point": "os:system"}, "not allowed"),
    ({"id": "X-v0", "entry_point": "a:b:c"}, "not 'module:Attribute'"),
    ({"id": "X-v0", "entry_point": ":CanaryEnv"}, "not 'module:Attribute'"),
    ({"id": "X-v0", "entry_point": ".rel:CanaryEnv"}, "not 'module:Attribute'"),
    ({"id": "X-v0", "entry_point": "{name}:CanaryEnv.__init__"}, "not 'module:Attribute'"),
    ({"id": "X-v0", "entry_point": "{name}: CanaryEnv"}, "not 'module:Attribute'"),
    ({"id": "os:X-v0", "entry_point": "{name}:CanaryEnv"}, "module part"),
    ({"id": "X-v0", "entry_point": "{name}:CanaryEnv", "kwargs": [1]}, "kwargs"),
    ({"id": "X-v0", "entry_point": 5}, "entry point"),
], ids=["not-allowed", "two-colons", "no-module", "relative", "dotted-attr", "space", "id-module",
        "kwargs-list", "not-a-str"])
def test_malformed_registrations_are_refused_without_importing(canary, spec, why):
    name, _ = canary
    spec = {k: v.replace("{name}", name) if isinstance(v, str) else v for k, v in spec.items()}
    host = SlotHost(None, 8, allow_import=[name])
    ok, reason = host.register(spec)
    assert not ok and why in reason, reason
    assert name not in sys.modules
    assert "X-v0" not in gymnasium.registry and "os:X-v0" not in gymnasium.registry


# ----------------------------------------------------------------------------
# Through a real broker: the attack no longer costs the other clients their slots


def test_a_hostile_call_leaves_the_worker_and_the_other_clients_alone(procs, broker_url):
    start_broker(procs, broker_url)
    worker = start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "8", "--procs", "1", expect=1)
    worker_rss = psutil.Process(worker.pid).memory_info().rss  # --procs 1: the worker is this process
    [registered] = status(broker_url)["workers"]
    victim_client = remoterl.Client(broker_url).connect()
    attacker_client = remoterl.Client(broker_url).connect()
    try:
        with closed_after(broker_url) as track:
            victim = track(remoterl.RemoteEnvVec("CartPole-v1", 4, client=victim_client))
            attacker = track(remoterl.RemoteEnvVec("CartPole-v1", 2, client=attacker_client))
            victim.reset(seed=0)
            attacker.reset(seed=0)
            [address] = attacker.workers
            slots = attacker._all_slots
            started = time.monotonic()
            # The audit's 42-byte CALL: 2**25 zero-size actions. The codec refuses it.
            with pytest.raises(ProtocolError, match="spans"):
                attacker_client.call(address, slots, {"op": "step", "m": 0, "a": raw_array("<i8", [2**25, 0])}, T)
            # Within the codec's bound, still no fit: refused whole, as an action error.
            with pytest.raises(InvalidActionError, match="do not fit 2 envs"):
                attacker_client.call(address, slots, {"op": "step", "m": 0, "a": np.zeros((60_000, 0), np.int64)}, T)
            assert time.monotonic() - started < T / 2
            # Heartbeats kept flowing: every client's slots are alive, and step on.
            for _ in range(3):
                assert victim.step(np.zeros(4, np.int64))[0].shape == (4, 4)
            assert attacker.step(np.ones(2, np.int64))[0].shape == (2, 4)
            assert [w["id"] for w in status(broker_url)["workers"]] == [registered["id"]]  # never lost
            assert psutil.Process(worker.pid).memory_info().rss - worker_rss < 200 * 2**20
    finally:
        victim_client.close()
        attacker_client.close()
