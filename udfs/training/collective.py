"""An all-reduce among the tasks of one barrier stage, over TCP, for `sync`'s per-step exchange.

Why not Spark's own barrier primitives: `BarrierTaskContext.allGather` and `barrier()` go through
the driver's RPC endpoint and cost 0.6-1.0 s a call here, for a thousand floats or a hundred
thousand alike, where a step of the MLP computes in about a millisecond. Not even the one exchange
of addresses a stage needs goes through them: with an epoch a stage, that second was most of a
small model's epoch. Instead each task tells the driver's rendezvous (pipelines/training/
rendezvous.py, one listener for the driver's life) where it listens and gets every task's address
back as soon as the last one has arrived; then the tasks form a ring of direct TCP connections, as
the collectives that XGBoost and LightGBM run inside Spark's barrier stages do.

The ring (`Ring.allreduce`) is the bandwidth-optimal reduce-scatter then all-gather: each of T
tasks sends and receives 2 (T-1)/T of the vector per call. Every chunk is summed in one fixed order
(around the ring from the task after its owner), so all tasks end with bit-identical sums, and the
same stage run again adds in the same order: a retried or resumed run gives the same weights.

Who may join: each task listens on its executor's address (the one Spark's scheduler knows it by),
on a port from `trainer.sync_ports` (any free port by default), and a connection counts only after a
mutual HMAC-SHA256 challenge over the stage's secret, a fresh random value the driver sends with the
stage. Anything else that connects (a port scanner, a task of another stage) is closed and the task
keeps waiting for its real neighbour. The rendezvous admits a task's address only under a MAC with
the stage's secret and signs the list it sends back the same way, so nobody without the secret can
join a stage or point its tasks elsewhere. The gradients themselves travel unencrypted between the
executors of one application, like Spark's own shuffle data without spark.network.crypto.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pyspark import BarrierTaskContext

NONCE = 16
HANDSHAKE_TIMEOUT_S = 10.0


class CollectiveError(RuntimeError):
    """The ring could not be formed or a neighbour went away mid-exchange."""


@dataclass(frozen=True)
class PortRange:
    """Ports a task may listen on: [first, last]; (0, 0) lets the OS pick any free one."""

    first: int = 0
    last: int = 0

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """'0' (any), '47000' or '47000-47100'."""
        first, _, last = text.partition("-")
        return cls(int(first), int(last or first))


def listen(host: str, ports: PortRange) -> socket.socket:
    """A listening TCP socket on `host`, on the first free port of `ports`."""
    for port in range(ports.first, ports.last + 1):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        sock.listen(8)
        return sock
    raise CollectiveError(f"no free port in {ports.first}-{ports.last} on {host} for sync's "
                          "all-reduce: widen trainer.sync_ports")


def mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise CollectiveError("a peer closed the connection during the handshake")
        data += chunk
    return bytes(data)


def _accept_peer(listener: socket.socket, secret: bytes, expected_rank: int,
                 deadline: float) -> socket.socket:
    """The connection of task `expected_rank`, once it proved it holds the stage's secret; other
    connections are dropped."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CollectiveError(f"task {expected_rank} did not join the ring in time")
        listener.settimeout(remaining)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            ours = os.urandom(NONCE)
            conn.sendall(ours)
            hello = recv_exact(conn, 4 + NONCE + 32)
            rank, theirs, proof = struct.unpack("!I", hello[:4])[0], hello[4:4 + NONCE], hello[4 + NONCE:]
            if rank != expected_rank or not hmac.compare_digest(
                    proof, mac(secret, b"connect", hello[:4], ours, theirs)):
                raise CollectiveError("bad proof")
            conn.sendall(mac(secret, b"accept", theirs, ours))
        except (OSError, CollectiveError):
            conn.close()
            continue
        return conn


def _connect_peer(address: tuple[str, int], secret: bytes, rank: int, deadline: float) -> socket.socket:
    """A connection to the next task's listener, after the mutual proof of the stage's secret."""
    while True:
        try:
            conn = socket.create_connection(address, timeout=HANDSHAKE_TIMEOUT_S)
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise CollectiveError(f"cannot reach the next task at {address}: {exc}") from exc
            time.sleep(0.05)
    theirs = recv_exact(conn, NONCE)
    ours = os.urandom(NONCE)
    rank_bytes = struct.pack("!I", rank)
    conn.sendall(rank_bytes + ours + mac(secret, b"connect", rank_bytes, theirs, ours))
    if not hmac.compare_digest(recv_exact(conn, 32), mac(secret, b"accept", ours, theirs)):
        conn.close()
        raise CollectiveError(f"the task at {address} does not hold this stage's secret")
    return conn


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Ring:
    """Task `rank` of `size`, connected to the next task (sends) and the previous one (receives)."""

    def __init__(self, rank: int, size: int, to_next: socket.socket | None,
                 from_prev: socket.socket | None):
        self.rank, self.size = rank, size
        self.to_next, self.from_prev = to_next, from_prev
        for sock in (to_next, from_prev):
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)

    def close(self) -> None:
        for sock in (self.to_next, self.from_prev):
            if sock is not None:
                sock.close()

    def allreduce(self, buf: np.ndarray) -> None:
        """Replace `buf` (1-D, contiguous) by the sum of every task's `buf`, in place."""
        T = self.size
        if T == 1:
            return
        bounds = [len(buf) * i // T for i in range(T + 1)]
        chunk = [buf[bounds[i]:bounds[i + 1]] for i in range(T)]
        incoming = np.empty(bounds[1] - bounds[0] + 1, dtype=buf.dtype)
        for s in range(T - 1):   # reduce-scatter: chunk (rank + 1) % T ends up summed here
            send, recv = chunk[(self.rank - s) % T], chunk[(self.rank - s - 1) % T]
            got = incoming[:len(recv)]
            self._exchange(send, got)
            recv += got
        for s in range(T - 1):   # all-gather the summed chunks around the ring
            self._exchange(chunk[(self.rank + 1 - s) % T], chunk[(self.rank - s) % T])

    def _exchange(self, send: np.ndarray, recv: np.ndarray) -> None:
        """Send `send` to the next task while receiving `recv` from the previous one, without
        either side blocking the other (both may exceed the sockets' buffers)."""
        assert self.to_next is not None and self.from_prev is not None
        out, into = send.data.cast("B"), recv.data.cast("B")
        sent = got = 0
        while sent < len(out) or got < len(into):
            writers = [self.to_next] if sent < len(out) else []
            readers = [self.from_prev] if got < len(into) else []
            readable, writable, _ = select.select(readers, writers, [], 600.0)
            if not readable and not writable:
                raise CollectiveError("the ring stalled for 10 minutes")
            if writable:
                try:
                    sent += self.to_next.send(out[sent:])
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise CollectiveError(f"the next task went away: {exc}") from exc
            if readable:
                try:
                    n = self.from_prev.recv_into(into[got:])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise CollectiveError(f"the previous task went away: {exc}") from exc
                if n == 0:
                    raise CollectiveError("the previous task closed the ring")
                got += n


def meeting_key(secret: bytes) -> bytes:
    """The name a stage's tasks give the rendezvous: tells it which secret to check, reveals none."""
    return hashlib.sha256(b"fedspark-meeting" + secret).digest()[:16]


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("!I", len(payload)) + payload)


def recv_frame(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    (n,) = struct.unpack("!I", recv_exact(sock, 4))
    if n > limit:
        raise CollectiveError(f"a {n}-byte frame, more than the {limit} a rendezvous message may be")
    return recv_exact(sock, n)


def hello(secret: bytes, rank: int, size: int, address: str) -> bytes:
    """What task `rank` of `size` sends the rendezvous: the stage's key, where it listens, a MAC."""
    key, body = meeting_key(secret), struct.pack("!II", rank, size) + address.encode()
    return key + body + mac(secret, b"hello", key, body)


def peers_message(secret: bytes, addresses: list[str]) -> bytes:
    """What the rendezvous sends back: every task's address in rank order, under the stage's MAC."""
    payload = "\n".join(addresses).encode()
    return payload + mac(secret, b"peers", meeting_key(secret), payload)


def meet(rendezvous: tuple[str, int], secret: bytes, rank: int, size: int, address: str,
         timeout_s: float) -> list[tuple[str, int]]:
    """Every task's (host, port), from the driver's rendezvous, once all `size` have reported."""
    try:
        with socket.create_connection(rendezvous, timeout=HANDSHAKE_TIMEOUT_S) as conn:
            send_frame(conn, hello(secret, rank, size, address))
            conn.settimeout(timeout_s)
            reply = recv_frame(conn)
    except (OSError, CollectiveError) as exc:
        raise CollectiveError(f"the driver's rendezvous at {rendezvous[0]}:{rendezvous[1]} did not "
                              f"answer: {exc}") from exc
    payload, proof = reply[:-32], reply[-32:]
    if not hmac.compare_digest(proof, mac(secret, b"peers", meeting_key(secret), payload)):
        raise CollectiveError("the rendezvous's answer is not signed with this stage's secret")
    addresses = [_address(a) for a in payload.decode().split("\n")]
    if len(addresses) != size:
        raise CollectiveError(f"the rendezvous named {len(addresses)} tasks, this stage has {size}")
    return addresses


def join(context: BarrierTaskContext, secret: bytes, ports: PortRange,
         rendezvous: tuple[str, int], timeout_s: float = 120.0) -> Ring:
    """Form the ring of this barrier stage's tasks: listen on this executor's address, learn the
    others' from the driver's rendezvous, connect to the next task and accept the previous one."""
    rank = context.partitionId()
    infos = context.getTaskInfos()
    size = len(infos)
    if size == 1:
        return Ring(0, 1, None, None)
    host, _ = _address(infos[rank].address)
    listener = listen(host, ports)
    try:
        port = listener.getsockname()[1]
        deadline = time.monotonic() + timeout_s
        addresses = meet(rendezvous, secret, rank, size, f"{host}:{port}", timeout_s)
        # accept the previous task while connecting to the next: both handshakes wait on a peer
        with ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(_accept_peer, listener, secret, (rank - 1) % size, deadline)
            to_next = _connect_peer(addresses[(rank + 1) % size], secret, rank, deadline)
            from_prev = accepted.result()
    finally:
        listener.close()
    return Ring(rank, size, to_next, from_prev)
