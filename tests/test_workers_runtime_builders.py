"""Tests for remoterl.wire.calls, the call builders the trainer side uses: they build exactly the
maps docs/PROTOCOL.md §5.2 describes, and remoterl.workers.runtime's host answers what they
build. The host is driven by decoded calls (no sockets): a call is a codec header plus frames,
exactly as the worker loop hands it over; the reply is decoded with the codec, exactly as the
client would (helpers in workers_runtime_helpers.py)."""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode

from remoterl.wire import codec
from remoterl.wire import calls
from remoterl.wire.calls import AUTORESET_MODES
import workers_runtime_helpers
from workers_runtime_helpers import SLOTS, SEEDS, WIRE_MODE, call, opened_host


class InfoWrapper(workers_runtime_helpers.InfoWrapper):
    """The helpers' rich-info wrapper, as a class of this module: ``calls.is_wrapped`` sends a
    wrapper by module and name, and the builder test expects ``f"{__name__}:InfoWrapper"``."""

# ----------------------------------------------------------------------------
# The call builders the trainer side uses: exactly the maps docs/PROTOCOL.md §5.2 describes


def test_call_builders_build_the_documented_maps():
    action = np.array([0, 1, 0])
    built_and_written = [
        (calls.step(action, 1), {"op": "step", "a": action, "m": 1}),
        (calls.step_single(0), {"op": "step", "a": 0, "single": True}),
        (calls.reset([0, None], None), {"op": "reset", "seeds": [0, None], "options": None}),
        (calls.reset_single(3, {"x": 1}), {"op": "reset", "seeds": [3], "options": {"x": 1}, "single": True}),
        (calls.get_attr("gravity"), {"op": "get_attr", "name": "gravity"}),
        (calls.get_attr("gravity", probe=True), {"op": "get_attr", "name": "gravity", "probe": True}),
        (calls.set_attr("g", [1.0], force=False), {"op": "set_attr", "name": "g", "values": [1.0], "force": False}),
        (calls.set_attr("g", force=True), {"op": "set_attr", "name": "g", "force": True}),
        (calls.set_attr("g", outer=True), {"op": "set_attr", "name": "g", "outer": True}),
        (calls.call("f", (1,), {"k": 2}), {"op": "call", "name": "f", "args": [1], "kwargs": {"k": 2}}),
        (calls.call("f", strict=True), {"op": "call", "name": "f", "args": [], "kwargs": {}, "strict": True}),
        (calls.is_wrapped(InfoWrapper),
         {"op": "is_wrapped", "wrapper": f"{__name__}:InfoWrapper"}),
    ]
    for built, written in built_and_written:
        # Byte for byte, key order included.
        assert codec.encode(built) == codec.encode(written), written
    assert {calls.mode_code(mode) for mode in AutoresetMode} == set(AUTORESET_MODES)
    assert all(calls.mode_code(mode) == WIRE_MODE[mode] for mode in AutoresetMode)


def test_the_host_answers_what_the_builders_build():
    host = opened_host()
    reply = call(host, {"r": 1, "slots": SLOTS, **calls.reset(list(SEEDS))})
    assert reply[calls.OBS].shape == (3, 4) and len(reply[calls.INFOS]) == 3
    reply = call(host, {"r": 2, "slots": SLOTS, **calls.step(np.array([0, 1, 0]), calls.SAME_STEP)})
    assert set(reply) >= {"r", calls.OBS, calls.REWARDS, calls.TERMINATED, calls.TRUNCATED, calls.INFOS}
    reply = call(host, {"r": 3, "slots": SLOTS, **calls.call("np_random_seed")})
    assert calls.values_from_wire(reply, 3) == SEEDS
    reply = call(host, {"r": 4, "slots": SLOTS, **calls.get_attr("render_mode", probe=True)})
    assert calls.values_from_wire(reply, 3) == [True] * 3
    reply = call(host, {"r": 5, "slots": SLOTS, **calls.is_wrapped(gymnasium.Wrapper)})
    assert "error" not in reply and len(reply[calls.VALUES]) == 3
