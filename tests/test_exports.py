"""The public surface: ``remoterl.__all__`` is complete and ``import remoterl`` stays cheap."""

from __future__ import annotations

import subprocess
import sys

import remoterl


def test_all_names_resolve():
    for name in remoterl.__all__:
        assert getattr(remoterl, name) is not None, name


def test_errors_are_exported():
    import remoterl.errors as errors

    for name in errors.__all__:
        if name[0].isupper():
            assert name in remoterl.__all__, name
            assert issubclass(getattr(remoterl, name), remoterl.RemoteRLError)


def test_import_is_cheap():
    code = (
        "import sys, remoterl\n"
        "heavy = [m for m in ('torch', 'ray', 'stable_baselines3', 'remoterl.broker', 'remoterl.workers',"
        " 'zmq', 'gymnasium') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        remoterl.no_such_name  # noqa: B018


def test_subpackages_install_under_remoterl():
    import remoterl.broker.core
    import remoterl.workers.runtime

    assert remoterl.broker.core.__name__ == "remoterl.broker.core"
    assert "broker" not in sys.modules and "workers" not in sys.modules
