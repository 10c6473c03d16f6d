"""``remoterl-worker --procs N``: the pool's exit status says what happened to its children."""

from __future__ import annotations

from conftest import cli, start_broker


def test_pool_refused_by_the_broker_exits_non_zero(procs, broker_url, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("key-alpha alpha\n")
    start_broker(procs, broker_url, "--api-keys", str(keys))
    pool = procs([*cli("remoterl-worker"), "--broker", broker_url, "--env", "CartPole-v1", "-n", "2",
                  "--procs", "2", "--api-key", "k-9d3f1e77"])
    assert pool.wait() != 0
    output = pool.output()
    assert "refused" in output and "API key" in output
    assert "k-9d3f1e77" not in output  # the key itself is never printed
