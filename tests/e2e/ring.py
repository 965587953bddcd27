"""`mlx.launch --backend ring` command lines for the distributed tests, each on its own ports.

mlx.launch's ranks listen from port 32323 up by default: two test runs at once on one machine
(CI beside a developer's run) would join each other's groups. Each launch here takes a run of
ports found free just before."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, tries: int = 200) -> int:
    """The first of n consecutive TCP ports free on 127.0.0.1 right now."""
    for _ in range(tries):
        first = random.randint(20000, 60000 - n)
        if all(_free(first + i) for i in range(n)):
            return first
    raise RuntimeError(f"no {n} consecutive free ports found")


def ring_launch(n: int, argv: list[str]) -> list[str]:
    """mlx.launch running `python argv...` as n ring ranks on this host, on free ports."""
    launch = Path(sys.executable).with_name("mlx.launch")
    port = str(free_ports(n))
    return [str(launch), "--backend", "ring", "-n", str(n), "--starting-port", port, "--",
            sys.executable, *argv]  # fmt: skip
