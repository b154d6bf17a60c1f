"""One inference service for all the media workers of a server: one model copy (on a GPU, one CUDA
context), and earliest-deadline batching across every worker's channels.

The service runs the usual InferenceWorker. Each media worker connects over a Unix socket (with the
server's secret key) and owns a shared-memory region of SLOTS fixed slots, each holding a request's
mel window and face crop and, once done, its mouth. Only small tuples cross the socket: (slot, seq,
step, deadline) one way, (slot, seq) the other, so no array is pickled per frame. The service also
sends its call-time estimates and counters every half second, which a media worker's deadline logic
(auto delay) and /metrics use. Deadlines are CLOCK_MONOTONIC times, the same in every process.
"""

from __future__ import annotations

import logging
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from streamer.live.worker import CallCost, InferenceWorker, Request
from streamer.pauses import settle

log = logging.getLogger(__name__)

SLOTS = 256  # requests one media worker may have in flight (10 s of 25 fps speech)
RECLAIM_S = 1.0  # a slot whose deadline passed this long ago is free again (its answer is ignored)
REPORT_S = 0.5


class Slots:
    """A media worker's shared memory: windows, crops and mouths, SLOTS of each."""

    def __init__(self, size: int, shape: tuple[int, ...], name: str | None = None):
        self.size = size
        window, face = int(np.prod(shape)) * 4, size * size * 3
        self.shm = SharedMemory(name=name, create=name is None, size=SLOTS * (window + 2 * face))
        if name is not None:  # attached, not owned: Python < 3.13 would unlink it when this process exits
            from multiprocessing import resource_tracker

            resource_tracker.unregister(self.shm._name, "shared_memory")
        buf = self.shm.buf
        self.windows = np.ndarray((SLOTS, *shape), np.float32, buf, 0)
        self.crops = np.ndarray((SLOTS, size, size, 3), np.uint8, buf, SLOTS * window)
        self.mouths = np.ndarray((SLOTS, size, size, 3), np.uint8, buf, SLOTS * (window + face))

    def close(self, unlink: bool = False) -> None:
        del self.windows, self.crops, self.mouths  # views must go before the mapping
        try:
            self.shm.close()
        except BufferError:  # a request still holds a view (dropped soon): the mapping goes with it
            pass
        if unlink:
            self.shm.unlink()


# the service


class _Client:
    """One connected media worker, as the service sees it."""

    def __init__(self, conn: Connection, slots: Slots):
        self.conn, self.slots = conn, slots
        self.closed = False
        self.lock = threading.Lock()

    def send(self, msg) -> None:
        try:
            with self.lock:
                self.conn.send(msg)
        except (OSError, ValueError):
            self.closed = True


class _SlotSink:
    """Where a remote request's mouth goes: its slot, then a note to its worker."""

    def __init__(self, client: _Client, slot: int, seq: int):
        self.client, self.slot, self.seq = client, slot, seq

    @property
    def closed(self) -> bool:
        return self.client.closed

    def accept(self, step: int, face: np.ndarray) -> None:
        self.client.slots.mouths[self.slot] = face
        self.client.send((self.slot, self.seq))


def run_service(engine, path: str, authkey: bytes, max_batch: int, stop: threading.Event, on_ready=None) -> None:
    """Serve inference to media workers on the Unix socket `path` until `stop` is set; `on_ready()` is
    called once it accepts connections (after the warm-up)."""
    worker = InferenceWorker(engine, max_batch=max_batch)
    batch_counts: dict[int, int] = {}  # batch size -> batches run, for every worker's /metrics
    worker.on_batch = lambda n: batch_counts.__setitem__(n, batch_counts.get(n, 0) + 1)
    listener = Listener(path, family="AF_UNIX", authkey=authkey)
    clients: list[_Client] = []

    def serve(conn: Connection) -> None:
        try:
            conn.send({"name": engine.name, "face_size": engine.face_size, "sizes": worker.sizes,
                       "cost": worker.cost.known(), "window": engine.features.shape})
            slots = Slots(engine.face_size, engine.features.shape, name=conn.recv()["shm"])
        except (EOFError, OSError, KeyError, TypeError):
            conn.close()
            return
        client = _Client(conn, slots)
        clients.append(client)
        try:
            while True:
                slot, seq, step, deadline = conn.recv()
                worker.submit(Request(_SlotSink(client, slot, seq), step, slots.windows[slot],
                                      slots.crops[slot], deadline))
        except (EOFError, OSError, ValueError, TypeError):
            pass
        client.closed = True
        clients.remove(client)
        worker.drain(2.0)
        slots.close()
        conn.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn = listener.accept()
            except OSError:
                return
            except Exception:  # noqa: BLE001 - a bad handshake (wrong key) must not stop the service
                log.warning("refused a connection to the inference service")
                continue
            threading.Thread(target=serve, args=(conn,), name="service-client", daemon=True).start()

    settle()  # the model and its warm-up objects kept out of the garbage collector's pauses
    threading.Thread(target=accept, name="service-accept", daemon=True).start()
    log.info("inference service ready on %s: %s", path, engine.name)
    if on_ready:
        on_ready()
    while not stop.wait(REPORT_S):
        report = ("report", worker.cost.known(), worker.busy_s, worker.batches, worker.depth(), dict(batch_counts))
        for c in list(clients):
            c.send(report)
    listener.close()
    worker.close()


# a media worker's side


class RemoteEngine:
    """What a media worker knows of the service's engine; `features` (the audio front end, which runs
    in the media worker) is set by whoever loads it."""

    backend = "service"

    def __init__(self, name: str, face_size: int):
        self.name, self.face_size = name, face_size
        self.features = None


class RemoteWorker:
    """In a media worker, stands in for InferenceWorker (submit, cost, sizes, counters), served by the
    server's inference service. Reconnects by itself if the service restarts."""

    def __init__(self, path: str, authkey: bytes, timeout: float = 120.0):
        self.path, self.authkey = path, authkey
        self.cost = CallCost()
        self.frames = self.dropped = 0  # mouths received, requests never answered (this worker's)
        self.batches, self.busy_s = 0, 0.0  # the service's, as last reported
        self._depth = 0
        self.on_batch = None  # batches happen in the service: see batch_counts
        self.batch_counts: dict[int, int] = {}  # the service's batches by size, as last reported
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._busy: dict[int, tuple[int, object, int, float]] = {}  # slot -> (seq, sink, step, deadline)
        self._free = list(range(SLOTS))
        self._seq = 0
        self._closing = False
        self.conn: Connection | None = None
        self.slots: Slots | None = None
        end = time.monotonic() + timeout
        while not self._connect():
            if time.monotonic() > end:
                raise RuntimeError(f"no inference service at {path}")
            time.sleep(0.2)
        self._reader = threading.Thread(target=self._read, name="service-results", daemon=True)
        self._reader.start()

    def _connect(self) -> bool:
        try:
            conn = Client(self.path, family="AF_UNIX", authkey=self.authkey)
            info = conn.recv()
        except (OSError, EOFError):
            return False
        if self.slots is None:
            self.engine = RemoteEngine(info["name"], info["face_size"])
            self.sizes = tuple(info["sizes"])
            self.slots = Slots(info["face_size"], tuple(info["window"]))
        for n, sec in info["cost"].items():
            self.cost.add(n, sec)
        conn.send({"shm": self.slots.shm.name})
        self.conn = conn
        return True

    def submit(self, req: Request) -> bool:
        now = time.monotonic()
        with self._lock:
            for slot in [s for s, b in self._busy.items() if b[3] + RECLAIM_S < now]:
                del self._busy[slot]
                self._free.append(slot)
                self.dropped += 1  # never answered: skipped by the service, or lost with it
            if self.conn is None or not self._free:
                self.dropped += 1
                return False
            slot = self._free.pop()
            self._seq += 1
            self._busy[slot] = (self._seq, req.sink, req.step, req.deadline)
            self.slots.windows[slot] = req.window
            self.slots.crops[slot] = req.crop
            msg = (slot, self._seq, req.step, req.deadline)
        try:
            with self._send_lock:
                self.conn.send(msg)
            return True
        except (OSError, AttributeError, ValueError):
            self.dropped += 1
            return False

    def _read(self) -> None:
        while not self._closing:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError, AttributeError, TypeError):  # TypeError: closed by close() mid-read
                if self._closing:
                    return
                log.error("the inference service went away; reconnecting (mouths are idle meanwhile)")
                self.conn = None
                while not self._closing and not self._connect():
                    time.sleep(0.5)
                continue
            if msg[0] == "report":  # service-wide: its time in inference, its batches, its queue
                _, known, self.busy_s, self.batches, self._depth, self.batch_counts = msg
                for n, sec in known.items():
                    self.cost.add(n, sec)
                continue
            slot, seq = msg
            with self._lock:
                got = self._busy.get(slot)
                if got is None or got[0] != seq:
                    continue  # reclaimed after its deadline: too late to matter
                del self._busy[slot]
                face = self.slots.mouths[slot].copy()
                self._free.append(slot)
            _, sink, step, _ = got
            self.frames += 1
            sink.accept(step, face)

    def depth(self) -> int:
        return self._depth

    def drain(self, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if not self._busy:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._closing = True
        if self.conn is not None:
            self.conn.close()
        self._reader.join(timeout=2)
        if self.slots is not None:
            self.slots.close(unlink=True)
