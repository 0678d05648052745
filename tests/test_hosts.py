"""hosts: the one mapping from a bind address to where a client connects, and how URLs write it."""

from __future__ import annotations

import socket

import pytest

from qwen3_vl_service.core.hosts import connect_host, display_host, local_url, url_host


@pytest.mark.unit
def test_wildcards_mean_loopback_for_a_client_and_the_node_name_for_others() -> None:
    assert connect_host("0.0.0.0") == connect_host("") == "127.0.0.1"
    assert connect_host("::") == "::1"
    assert connect_host("10.0.0.5") == "10.0.0.5" == display_host("10.0.0.5")
    assert display_host("0.0.0.0") == display_host("::") == socket.gethostname()


@pytest.mark.unit
def test_urls() -> None:
    assert url_host("::1") == "[::1]" and url_host("node7") == "node7"
    assert local_url("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert local_url("::", 8010) == "http://[::1]:8010"
    assert local_url("127.0.0.2", 80) == "http://127.0.0.2:80"
