"""When a backbone loader may download: the user's word, then whether the host resolves."""

from __future__ import annotations

import socket

import pytest
from peftlab.shared import causal_lm, hub
from peftlab.shared.errors import UserError

NETWORK = ("PEFTLAB_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", *hub.PROXY_VARIABLES)


@pytest.fixture
def online(monkeypatch):
    """No offline setting and no proxy (the suite runs with PEFTLAB_OFFLINE=1); lookups recorded."""
    for variable in NETWORK:
        monkeypatch.delenv(variable, raising=False)
    looked_up = []

    def resolve(host, port, *args, **kwargs):
        looked_up.append(host)
        if host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return looked_up


def test_the_users_word_comes_first(online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline() == "HF_HUB_OFFLINE is set"
    monkeypatch.setenv("PEFTLAB_OFFLINE", "1")
    assert hub.offline() == "PEFTLAB_OFFLINE is set"
    monkeypatch.setenv("PEFTLAB_OFFLINE", "0")  # "0" means online, as for HF_HUB_OFFLINE
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub.offline() is None
    assert online == ["huggingface.co"]


def test_a_host_that_does_not_resolve_is_offline(online, monkeypatch):
    assert hub.offline("downloads.invalid") == "downloads.invalid cannot be resolved: Name or service not known"
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.invalid/hf")  # a mirror is the host the hub client asks
    assert hub.offline().startswith("mirror.invalid cannot be resolved")
    assert online == ["downloads.invalid", "mirror.invalid"]


def test_behind_a_proxy_nothing_is_looked_up(online, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.offline("downloads.invalid") is None
    assert online == []


def test_a_hub_name_without_network_fails_at_once_with_the_reason(online, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    # Before the lookup, this went to the hub client, which retried for about 45 s.
    with pytest.raises(UserError, match=r"'nobody/no-such-model' is not available offline \(hub\.invalid cannot be "
                                        r"resolved: .*\).*pass --backbone /path/to/model"):
        causal_lm.load_causal_lm("nobody/no-such-model")
