"""Over-the-wire fuzzing: mutated PDUs sent to a real pacsd daemon after the TLS
handshake (and after a valid A-ASSOCIATE-RQ, for the PDUs that follow one).

Per input the node must answer, abort or close within network_timeout + slack, and keep
serving: every few inputs a DCMTK echoscu must succeed and the worker must be the same
process (no crash). Random mutations (random.Random(seed): reproducible).
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fuzz import pdu
from fuzz.targets import Stats

SLACK = 6.0


def seeds() -> list[tuple[str, bytes]]:
    """(kind, bytes): 'rq' is sent instead of the A-ASSOCIATE-RQ; 'post' after one."""
    from fuzz.strategies import seed_associate_rq

    ident = (b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x10\x00\x10\x00\x04\x00\x00\x00DOE*"
             b"\x20\x00\x0d\x00\x00\x00\x00\x00")
    return [
        ("rq", seed_associate_rq()),
        ("post", pdu.p_data(pdu.pdv(1, 0x03, pdu.c_echo_rq(1)))),
        ("post", pdu.p_data(pdu.pdv(3, 0x03, pdu.c_store_rq(1, "1.2.3.4")),
                            pdu.pdv(3, 0x02, b"\x08\x00\x16\x00\x02\x00\x00\x001\0"))),
        ("post", pdu.p_data(pdu.pdv(5, 0x03, pdu.c_find_rq(1)), pdu.pdv(5, 0x02, ident))),
        ("post", pdu.release_rq()),
        ("post", pdu.abort()),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not b:
            break
        i = rng.randrange(len(b))
        op = rng.randrange(7)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, 1])
        elif op == 2 and i + 4 <= len(b):
            b[i:i + 4] = struct.pack(">L", rng.choice([0, 1, 0xFFFFFFFF, len(b), 0x10000]))
        elif op == 3:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4:
            del b[i:i + rng.randint(1, 16)]
        elif op == 5:
            del b[i:]
        else:
            j = min(len(b), i + rng.randint(1, 32))
            b[j:j] = b[i:j] * rng.randint(1, 4)
    if rng.random() < 0.7 and len(b) >= 6:  # mostly keep the PDU length consistent
        b[2:6] = struct.pack(">L", len(b) - 6)
    return bytes(b)


def inputs(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    base = seeds()
    while True:
        kind, data = rng.choice(base)
        yield kind, mutate(rng, data)


def send_one(port: int, ctx: ssl.SSLContext, calling: str, called: str, kind: str,
             data: bytes, timeout: float) -> str:
    """One connection, one hostile input; the node's reaction: 'answered' (a PDU came
    back), 'closed', or 'hung' (nothing within `timeout`)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s = ctx.wrap_socket(raw)
    except (OSError, ssl.SSLError):
        raw.close()
        return "handshake-failed"
    try:
        if kind == "post":
            s.sendall(pdu.associate_rq(calling, called, [
                (1, pdu.VERIFICATION, [pdu.IMPLICIT_LE]),
                (3, pdu.CT_IMAGE, [pdu.EXPLICIT_LE]),
                (5, pdu.STUDY_ROOT_FIND, [pdu.IMPLICIT_LE])]))
            got = pdu.read_pdu(s, timeout=10)
            if got is None or got[0] != 0x02:
                return "not-associated"
        try:
            s.sendall(data)
        except OSError:
            return "closed"
        deadline = time.monotonic() + timeout
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                return "closed"
            if not chunk:
                return "closed"
            return "answered"
        return "hung"
    finally:
        s.close()


class WireFuzzer:
    """A daemon started for fuzzing (tests.conftest.Node) and a loop of hostile inputs."""

    def __init__(self, base: Path, stats: Stats, *, seed: int = 1, parallel: int = 6,
                 network_timeout: int = 3) -> None:
        from tests.conftest import Node

        self.stats = stats
        self.rng = random.Random(seed)  # noqa: S311 - reproducible fuzzing, not crypto
        self.parallel = parallel
        self.timeout = network_timeout + SLACK
        self.node = Node(base, **{"node.network_timeout": network_timeout,
                                  "node.acse_timeout": network_timeout,
                                  "node.dimse_timeout": network_timeout})
        self.node.start()
        self.client = self.node.add_client("FUZZ", permits="echo,store,find")
        self.ctx = self.node.ssl_context(self.client)
        self.pids = sorted(self.node.pids())
        self.outcomes: dict[str, int] = {}
        self._gen = inputs(self.rng)
        self._lock = threading.Lock()

    def check_alive(self) -> str | None:
        if sorted(self.node.pids()) != self.pids:
            return f"worker processes changed: {self.pids} -> {sorted(self.node.pids())}"
        r = self.node.dcmtk("echoscu", self.client, timeout=30)
        if r.returncode != 0:
            return f"echo failed after fuzzing: {r.stderr.strip()[-300:]}"
        return None

    def _one(self, item: tuple[str, bytes]) -> None:
        kind, data = item
        out = send_one(self.node.port, self.ctx, self.client.title, self.node.ae_title,
                       kind, data, self.timeout)
        with self._lock:
            self.stats.executions += 1
            self.outcomes[out] = self.outcomes.get(out, 0) + 1
            if out == "hung":
                self.stats.findings.append(f"no answer within {self.timeout} s to "
                                           f"{kind} {data[:64].hex()}...")
            elif out in ("answered", "closed"):
                self.stats.rejected += 1

    def run(self, seconds: float = 30.0, count: int | None = None) -> None:
        """Send inputs for `seconds` (or `count` of them), `parallel` at a time, then
        check the node still serves."""
        end = time.monotonic() + seconds
        with ThreadPoolExecutor(self.parallel) as pool:
            n = 0
            while time.monotonic() < end and (count is None or n < count):
                batch = [next(self._gen) for _ in range(self.parallel)]
                list(pool.map(self._one, batch))
                n += len(batch)
        problem = self.check_alive()
        if problem:
            self.stats.findings.append(problem)

    def close(self) -> None:
        self.node.close()


def describe(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items()))


__all__ = ["WireFuzzer", "describe", "send_one"]
