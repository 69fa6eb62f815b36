"""nbd.is_loopback, what decides whether ``dedupimg serve`` needs --allow-remote: 127.0.0.0/8, ::1 and names that
resolve only to those are loopback; the all-interfaces addresses, any other address, a name with any other
address and a name that does not resolve are not."""

from __future__ import annotations

import socket

import pytest

from dedupimg.serve import nbd
from dedupimg.serve.nbd import is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.5.5.5", "127.255.255.254", "::1", "localhost", "::ffff:127.0.0.1"])
def test_loopback(host):
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "8.8.8.8", "fd00::2", "fe80::1%lo", "::ffff:10.1.2.3"]
)
def test_not_loopback(host):
    assert not is_loopback(host)


def test_name_that_does_not_resolve_is_not_loopback():
    assert not is_loopback("no-such-host.invalid")  # RFC 6761: .invalid never resolves


def _resolving_to(*addresses: str):
    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in addresses]

    return getaddrinfo


def test_name_with_any_address_beyond_loopback_is_not_loopback(monkeypatch):
    monkeypatch.setattr(nbd.socket, "getaddrinfo", _resolving_to("127.0.1.1", "192.168.0.7"))
    assert not is_loopback("backuphost")
    monkeypatch.setattr(nbd.socket, "getaddrinfo", _resolving_to("127.0.1.1", "::1"))
    assert is_loopback("backuphost")
