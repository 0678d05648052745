"""Host addresses: where a client connects to a server bound to a host, and how a URL or a person names it."""

from __future__ import annotations

import ipaddress
import socket

# Bind addresses that mean "every interface" ("" is Python's spelling).
WILDCARDS = ("0.0.0.0", "::", "")


def connect_host(host: str) -> str:
    """Where to connect on this node to a server bound to HOST: a wildcard means loopback."""
    if host == "::":
        return "::1"
    return "127.0.0.1" if host in WILDCARDS else host


def is_loopback(host: str) -> bool:
    """Whether HOST is only reachable from this node: localhost, 127.0.0.0/8, ::1 (not a wildcard)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def display_host(host: str) -> str:
    """How other machines reach a server bound to HOST: a wildcard means this node's name."""
    return socket.gethostname() if host in WILDCARDS else host


def url_host(host: str) -> str:
    """HOST as the authority of a URL ([::1] for IPv6)."""
    return f"[{host}]" if ":" in host else host


def local_url(host: str, port: int) -> str:
    """http://HOST:PORT as a client on this node reaches it."""
    return f"http://{url_host(connect_host(host))}:{port}"
