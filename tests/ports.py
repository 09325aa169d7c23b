"""Free TCP ports for the servers tests start (Serve proxies, Ray heads, MLflow, gloo stores).

A port the kernel hands out for `bind(("127.0.0.1", 0))` comes from its ephemeral range, the same
range every outgoing connection on the machine draws its local port from. Between the test
choosing such a port and the server binding it, another process's connection may take it: with
two pytest workers and their Ray clusters opening hundreds of connections, a Serve proxy then
failed with "Failed to bind to address". So ports are drawn at random below the ephemeral range
(and above Ray's default worker ports, 10002-19999) and checked free by binding them.
"""

from __future__ import annotations

import random
import socket

RAY_WORKER_PORTS_END = 19999


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except OSError:  # not Linux: the IANA range
        return 49152, 65535


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, outside the ephemeral range and Ray's worker ports."""
    ephemeral_low, ephemeral_high = ephemeral_range()
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral_low - 1
    if high - low < 1000:  # an unusual ephemeral range: use the space above it instead
        low, high = ephemeral_high + 1, 65535
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}..{high} on 127.0.0.1")
