"""hub.py: the network probe is cached but resettable and HF_HUB_OFFLINE is read at every call (no test
depends on another's order); hub_offline restores every flag it flips."""

import socket
import sys

import pytest

from captioner import hub


@pytest.fixture
def network(monkeypatch):
    """Scripted network: state["up"] says whether the hub answers; state["probes"] counts connections."""
    state = {"up": False, "probes": 0}

    class Conn:
        def close(self):
            pass

    def connect(*a, **k):
        state["probes"] += 1
        if not state["up"]:
            raise OSError("unreachable")
        return Conn()
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.reset_hub_probe()
    yield state
    hub.reset_hub_probe()


def test_probe_is_cached_until_reset(network):
    assert hub.hub_reachable() is False
    network["up"] = True
    assert hub.hub_reachable() is False and network["probes"] == 1  # one probe per process...
    hub.reset_hub_probe()
    assert hub.hub_reachable() is True and network["probes"] == 2  # ...until reset


def test_offline_env_is_read_at_every_call(network, monkeypatch):
    network["up"] = True
    assert hub.hub_reachable() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_reachable() is False  # not the cached answer
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub.hub_reachable() is True and network["probes"] == 1


def test_hub_offline_restores_every_flag_it_flips(monkeypatch):
    import huggingface_hub.constants as hub_constants

    datasets_config = sys.modules.get("datasets.config")
    before = (hub_constants.HF_HUB_OFFLINE, getattr(datasets_config, "HF_HUB_OFFLINE", None))
    with pytest.raises(RuntimeError):
        with hub.hub_offline():
            assert hub_constants.HF_HUB_OFFLINE is True
            if datasets_config is not None:
                assert datasets_config.HF_HUB_OFFLINE is True
            raise RuntimeError("a failing load")
    assert (hub_constants.HF_HUB_OFFLINE, getattr(datasets_config, "HF_HUB_OFFLINE", None)) == before


def test_open_clip_loads_refuse_shipped_code_without_asking(monkeypatch):
    """open_clip builds Hugging Face text towers itself (no trust_remote_code argument): a model asking to
    run shipped code is refused, never asked about on stdin."""
    import open_clip
    from transformers import dynamic_module_utils

    from captioner.model.encoders import ModelLoadError, create_open_clip

    asked = []
    monkeypatch.setattr("builtins.input", lambda *a, **k: asked.append(a) or "y")
    before = dynamic_module_utils.TIME_OUT_REMOTE_CODE

    def create(*a, **k):  # what transformers does inside open_clip for a text tower with auto_map
        dynamic_module_utils.resolve_trust_remote_code(None, "evil/tower", has_local_code=False, has_remote_code=True)
        raise AssertionError("custom code would have run")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    with pytest.raises(ModelLoadError, match="evil-clip.*custom code"):
        create_open_clip("evil-clip", None)
    assert asked == [] and dynamic_module_utils.TIME_OUT_REMOTE_CODE == before
