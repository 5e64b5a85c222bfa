"""The all-reduce ring of `sync`'s barrier stages (udfs/training/collective.py), over real sockets
on 127.0.0.1, one thread per task: sums, bit-identical results on every task, and who may join."""
from __future__ import annotations

import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipelines.training.rendezvous import Rendezvous
from udfs.training import collective

SECRET = b"s" * 32


def ring_of(size: int, secret_of=lambda rank: SECRET) -> list[collective.Ring]:
    """`size` tasks joined as join() joins them, each with its own listener on 127.0.0.1."""
    listeners = [collective.listen("127.0.0.1", collective.PortRange()) for _ in range(size)]
    addresses = [s.getsockname()[:2] for s in listeners]
    deadline = time.monotonic() + 10

    def task(rank: int) -> collective.Ring:
        with ThreadPoolExecutor(1) as pool:
            prev = pool.submit(collective._accept_peer, listeners[rank], SECRET, (rank - 1) % size,
                               deadline)
            to_next = collective._connect_peer(addresses[(rank + 1) % size], secret_of(rank),
                                               rank, deadline)
            return collective.Ring(rank, size, to_next, prev.result())

    with ThreadPoolExecutor(size) as pool:
        rings = list(pool.map(task, range(size)))
    for s in listeners:
        s.close()
    return rings


@pytest.mark.parametrize("size,length", [(2, 101_770 + 2), (3, 7), (5, 1_000_003)])
def test_the_ring_sums_and_every_task_holds_the_same_bits(size, length):
    rings = ring_of(size)
    rng = np.random.default_rng(size)
    inputs = [rng.normal(size=length).astype(np.float32) for _ in range(size)]
    bufs = [x.copy() for x in inputs]
    with ThreadPoolExecutor(size) as pool:
        list(pool.map(lambda r: r.allreduce(bufs[r.rank]), rings))
    for r in rings:
        r.close()
    np.testing.assert_allclose(bufs[0], np.sum(inputs, axis=0, dtype=np.float64), rtol=1e-5, atol=1e-5)
    for b in bufs[1:]:
        assert np.array_equal(b, bufs[0])


def test_a_peer_without_the_stage_secret_is_refused_and_the_real_one_admitted():
    listener = collective.listen("127.0.0.1", collective.PortRange())
    address = listener.getsockname()[:2]
    deadline = time.monotonic() + 10
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(collective._accept_peer, listener, SECRET, 1, deadline)
        with pytest.raises(collective.CollectiveError, match="closed"):   # refused
            collective._connect_peer(address, b"x" * 32, 1, deadline)   # a wrong secret
        plain = socket.create_connection(address)   # a client that only claims the rank
        plain.recv(collective.NONCE)
        plain.sendall(struct.pack("!I", 1) + b"n" * collective.NONCE + b"p" * 32)
        assert plain.recv(32) == b""   # closed without an answer
        real = collective._connect_peer(address, SECRET, 1, deadline)
        conn = accepted.result()
    real.sendall(b"hello")
    assert conn.recv(5) == b"hello"
    for s in (real, conn, plain, listener):
        s.close()


def test_a_port_range_is_parsed_and_an_exhausted_one_says_what_to_widen():
    assert collective.PortRange.parse("0") == collective.PortRange(0, 0)
    assert collective.PortRange.parse("47000-47010") == collective.PortRange(47000, 47010)
    taken = collective.listen("127.0.0.1", collective.PortRange())
    port = taken.getsockname()[1]
    with pytest.raises(collective.CollectiveError, match="trainer.sync_ports"):
        collective.listen("127.0.0.1", collective.PortRange(port, port))
    taken.close()


def test_the_rendezvous_answers_a_stages_tasks_and_only_those_that_hold_its_secret():
    meet = Rendezvous("127.0.0.1", "127.0.0.1", collective.PortRange())
    size = 3
    mine = [f"127.0.0.{rank + 1}:{4000 + rank}" for rank in range(size)]
    with meet.meeting(SECRET), ThreadPoolExecutor(size) as pool:
        # a hello under another secret (no meeting for it) and one with a forged MAC: closed unanswered
        for secret, forge in ((b"x" * 32, False), (SECRET, True)):
            with socket.create_connection(meet.address) as stranger:
                message = collective.hello(secret, 0, size, "10.0.0.9:1")
                collective.send_frame(stranger, message[:-1] + bytes([message[-1] ^ forge]))
                with pytest.raises(collective.CollectiveError, match="closed"):
                    collective.recv_frame(stranger)
        got = list(pool.map(lambda rank: collective.meet(meet.address, SECRET, rank, size, mine[rank], 10),
                            range(size)))
    assert got == [[(f"127.0.0.{r + 1}", 4000 + r) for r in range(size)]] * size
    with pytest.raises(collective.CollectiveError, match="rendezvous"):   # the meeting is over
        collective.meet(meet.address, SECRET, 0, 1, mine[0], 10)
