"""The client's I/O against a real broker in a thread: refused sends leave nothing pending."""

from __future__ import annotations

import numpy as np
import pytest

import remoterl
from remoterl.broker.core import BrokerConfig
from remoterl.broker.loop import Broker


@pytest.fixture
def broker():
    instance = Broker("tcp://127.0.0.1:*", BrokerConfig(max_message_size=4096))
    url = instance.start()
    yield url
    instance.stop()


def test_a_refused_send_leaves_no_pending_request(broker):
    with remoterl.Client(broker).connect() as client:
        assert client.max_message_size == 4096  # learned from WELCOME
        with pytest.raises(remoterl.MessageTooLargeError):
            client.send_call(b"W" * 16, [], {"op": "step", "a": np.zeros(10_000, np.uint8)})
        assert client.core.pending == {}
        with pytest.raises(remoterl.CodecError):
            client.send_call(b"W" * 16, [], {"op": "step", "a": {1, 2}})
        assert client.core.pending == {}
