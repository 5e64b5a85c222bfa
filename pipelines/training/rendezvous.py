"""The driver's rendezvous for `sync`'s barrier stages: where a stage's tasks learn each other's
addresses before forming their all-reduce ring (udfs/training/collective.py).

One listener serves the driver process's life: a thread accepts each task's hello, keeps it under
its stage's meeting, and when the last of the stage's tasks has arrived sends every one of them
the whole list. That costs a connection per task, where Spark's `allGather` cost about a second a
stage. A hello counts only under the MAC of a secret the driver opened a meeting for
(`Rendezvous.meeting`); anything else is closed unanswered.
"""
from __future__ import annotations

import hmac
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

from pyspark import SparkContext

from udfs.training import collective
from udfs.training.collective import CollectiveError, PortRange

KEY = 16
MAC = 32


@dataclass
class _Meeting:
    """One stage attempt: its secret, and the tasks that have reported (rank -> address, socket)."""

    secret: bytes
    size: int = 0
    arrived: dict[int, tuple[str, socket.socket]] = field(default_factory=dict)

    def close(self) -> None:
        for _, conn in self.arrived.values():
            conn.close()
        self.arrived.clear()


class Rendezvous:
    """A listener on the driver; `address` is what the tasks connect to."""

    def __init__(self, bind: str, advertise: str, ports: PortRange):
        self._listener = collective.listen(bind, ports)
        self.address = (advertise, self._listener.getsockname()[1])
        self._meetings: dict[bytes, _Meeting] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="fedspark-rendezvous", daemon=True).start()

    @contextmanager
    def meeting(self, secret: bytes) -> Iterator[None]:
        """Admit the tasks that hold `secret` while the block runs (a stage attempt)."""
        key = collective.meeting_key(secret)
        with self._lock:
            self._meetings[key] = _Meeting(secret)
        try:
            yield
        finally:
            with self._lock:
                meeting = self._meetings.pop(key)
            meeting.close()

    def _accept(self) -> None:
        while True:
            conn, _ = self._listener.accept()
            threading.Thread(target=self._admit, args=(conn,), daemon=True).start()

    def _admit(self, conn: socket.socket) -> None:
        """Check a task's hello; the last arrival of a stage answers them all."""
        conn.settimeout(collective.HANDSHAKE_TIMEOUT_S)
        try:
            message = collective.recv_frame(conn, limit=4096)
        except (OSError, CollectiveError):
            conn.close()
            return
        key, body, proof = message[:KEY], message[KEY:-MAC], message[-MAC:]
        with self._lock:
            meeting = self._meetings.get(key)
            if (meeting is None or len(body) < 8
                    or not hmac.compare_digest(proof, collective.mac(meeting.secret, b"hello", key, body))):
                conn.close()
                return
            rank, size = struct.unpack("!II", body[:8])
            if meeting.size not in (0, size) or not 0 <= rank < size:
                conn.close()
                return
            meeting.size = size
            if rank in meeting.arrived:   # the same task again (a reconnect): the newer socket wins
                meeting.arrived.pop(rank)[1].close()
            meeting.arrived[rank] = (body[8:].decode(), conn)
            if len(meeting.arrived) < size:
                return
            answer = collective.peers_message(meeting.secret,
                                              [meeting.arrived[r][0] for r in range(size)])
            for _, peer in meeting.arrived.values():
                try:
                    collective.send_frame(peer, answer)
                except OSError:
                    pass   # that task is gone; its stage fails and is run again
            meeting.close()


@cache
def _rendezvous(bind: str, advertise: str, ports: PortRange) -> Rendezvous:
    return Rendezvous(bind, advertise, ports)


def for_driver(sc: SparkContext, ports: PortRange) -> Rendezvous:
    """The driver's rendezvous, started on first use: bound where Spark binds the driver
    (spark.driver.bindAddress, else spark.driver.host), reached at spark.driver.host."""
    conf = sc.getConf()
    advertise = conf.get("spark.driver.host") or socket.gethostname()
    return _rendezvous(conf.get("spark.driver.bindAddress") or advertise, advertise, ports)
