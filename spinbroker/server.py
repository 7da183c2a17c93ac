"""The asyncio server: glue between sockets, the codec, the core and the log.

It owns no broker logic. Each connection feeds its bytes to a sans-IO `ServerCodec`, hands
the requests to the verb handlers below (argument reading in `requests.py`, decisions in
`core.py`), and writes the encoded replies. After every batch of work (one `data_received`,
one timer, one disconnect) `_after_batch` drains what the core produced: records go to the
journal, deliveries to blocked agents and finished packages to WAIT become replies.

Durability rule (Redis' AE_BARRIER lesson): a reply never leaves before the records
appended so far are durable. A reply made while records are still in flight is held on its
connection with the log position it needs, and released by the commit that covers it.
Replies on one connection therefore leave in the order they were made.

Lifecycle: `Server.start` opens the data dir (locked), the listeners and the tick timer;
`Server.stop` stops accepting, answers blocked NEXT and WAIT with `shutting_down`, flushes
and closes. `run(config)` is the process entry: uvloop when importable, SIGINT/SIGTERM stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, cast

import msgpack

from . import PROTOCOL_VERSION, __version__, persist, records, requests, schema
from .clock import SteadyWallClock
from .codec import TEXT_USAGE, BadInput, Mode, Request, ServerCodec
from .config import ServerConfig
from .core import LEASED, Broker, Command, NewCommand, Waiter, check_name
from .errors import BrokerError, ErrorCode
from .ids import IdGenerator
from .persist import RecoveryReport, Snapshotter
from .readiness import ReadyLsns
from .wal import FileLayer, Wal, WalCorruption, WalError, WalNewerVersion, WalWriteError
from .wal.files import lock_directory

log = logging.getLogger("spinbroker.server")

Handler = Callable[["Connection", Request], None]

#: Verbs that make records: refused while the log cannot be written.
CHANGES_STATE = frozenset(
    {"NEW", "ADD", "ENQUEUE", "SUBMIT", "NEXT", "TOUCH", "COMPLETE", "CANCEL", "ANNOUNCE"}
)
#: Verbs that change nothing: answered from memory even while the log cannot be written.
READS = frozenset({"HELLO", "PING", "HELP", "STATUS", "STATS", "WAIT", "QUIT"})
#: Text mode: lines read ahead of a blocked request before reading pauses.
TEXT_BACKLOG_MAX = 1000
#: After a failed write, how long the committer waits before asking the log again.
STORAGE_RETRY_SECONDS = 0.1
#: The longest the timer pass waits between looks at the clock. Its timer runs on the event
#: loop's clock, which stops while the machine is suspended; the deadlines are on the
#: server's clock, which counts that sleep (clock.py). So after a resume a deadline that
#: passed during the sleep is met within this long, not a whole sleep late.
TICK_CHECK_SECONDS = 1.0
#: Every this many records, the objects alive are moved out of the cyclic collector's way
#: (gc.freeze). Without it a full collection walks the whole state: 1.6 s pauses while a
#: broker grows to 1M queued commands (bench/RESULTS.md); with it a
#: collection only walks what is younger than the last freeze (worst pause then: 70 ms).
FREEZE_EVERY = 20_000
#: File descriptors kept for all but connections: log segments and snapshots, listeners,
#: the data dir lock, stdio, a forked snapshot writer's files (see `fit_connections`).
FD_RESERVE = 64
#: A connection's replies are written once this many bytes wait, not only at the end of
#: the batch, so that the transport can pause a client that does not read.
OUT_FLUSH_BYTES = 256 << 10
#: The exit code of a broker that stopped because a record could not be logged.
EXIT_CANNOT_LOG = 70


#: A connection's reasons to pause reading, when it has none.
NOT_PAUSED: frozenset[str] = frozenset()

#: A lease a reply delivers: the command and its delivery number then.
Lease = tuple[Command, int]
#: A reply waiting for the log, (need, data, request id, verb, lease): it leaves once LSN
#: `need` is durable; `lease` if it delivers one (see `Connection.fail_held`).
Held = tuple[int, bytes, int | None, str | None, Lease | None]


class Blocked:
    """A NEXT or WAIT that has not been answered yet."""

    __slots__ = ("conn", "package", "req", "timer", "waiter")

    def __init__(self, conn: Connection, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: Waiter | None = None
        self.package: str | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Connection(asyncio.Protocol):
    """One client. Text mode is strictly sequential (a blocked request holds the lines after
    it); msgpack mode keeps reading while NEXT and WAIT are blocked. Slotted, as what it
    holds while idle is most of what an idle connection costs (bench: `connections`)."""

    __slots__ = (
        "_drain_scheduled",
        "_read_paused_by",
        "backlog",
        "blocked",
        "closing",
        "codec",
        "eof",
        "held",
        "id",
        "inflight",
        "out",
        "out_bytes",
        "server",
        "transport",
        "undelivered",
    )

    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.codec = ServerCodec(server.config.limits.max_frame)
        self.transport: asyncio.Transport | None = None
        self.blocked: set[Blocked] = set()
        #: Requests read but not handled yet: behind a blocked text request, or past the
        #: in-flight limit (`flush` carries on with them once replies went out). None when
        #: there are none: an empty deque costs 760 bytes, most of an idle connection.
        self.backlog: deque[Request | BadInput] | None = None
        self._drain_scheduled = False
        #: Replies waiting for the log position they need (see Held), in that order.
        self.held: list[Held] = []
        #: Leases whose delivering reply was failed (`fail_held`).
        self.undelivered: list[Lease] = []
        self.out: list[bytes] = []
        #: Bytes in `out`: past OUT_FLUSH_BYTES they are written before the next request.
        self.out_bytes = 0
        self.closing = False
        #: The client will send nothing more (see eof_received).
        self.eof = False
        self.inflight = 0
        #: Why reading is paused (a frozenset: an empty set would cost 216 bytes each).
        self._read_paused_by: frozenset[str] = NOT_PAUSED

    # asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if not self.server.admit(self):
            return
        self.server.connections[self.id] = self

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        server = self.server
        self.codec.receive_data(data)
        events = self.codec.next_events()
        if events:
            if self.backlog is None:
                self.backlog = deque(events)
            else:
                self.backlog.extend(events)
        self._drain_backlog()
        server.after_batch()

    def eof_received(self) -> bool:
        """The client closed its sending side (`nc -N`, shutdown(SHUT_WR)) but may still
        read: answer everything it sent, blocked requests included, then close."""
        self.eof = True
        self.server.input_ended(self)
        return True  # keep the transport open for the replies

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.server.connections.get(self.id) is self:
            self.server.disconnected(self)

    def pause_writing(self) -> None:
        self._pause_reading("write-buffer")

    def resume_writing(self) -> None:
        self._resume_reading("write-buffer")
        self._schedule_drain()

    # request flow ------------------------------------------------------------

    def _drain_backlog(self) -> None:
        server = self.server
        text = self.codec.mode is Mode.TEXT
        limit = server.config.limits.max_inflight
        backlog = self.backlog
        while backlog and not self.closing:
            if text and self.blocked:
                # A person may type ahead of a blocked NEXT, but nobody may queue unbounded
                # lines behind it: stop reading past a limit (resumed once it answers).
                if len(backlog) >= TEXT_BACKLOG_MAX:
                    self._pause_reading("backlog")
                return
            if self.inflight >= limit:
                self._pause_reading("inflight")
                return
            if "write-buffer" in self._read_paused_by:
                return  # resume_writing carries on
            event = backlog.popleft()
            self.inflight += 1
            if isinstance(event, BadInput):
                self.reply_error(event.id, event.verb, event.error)
                if event.fatal:
                    self.close_after_flush()
                continue
            server.handle(self, event)
            if self.out_bytes >= OUT_FLUSH_BYTES:
                self.flush()  # may pause writing: a client that does not read stops here
        if self.backlog is backlog and not backlog:
            self.backlog = None

    def reply(
        self,
        req: Request,
        kind: str,
        body: Any,
        need: int | None = None,
        lease: Lease | None = None,
    ) -> None:
        """`lease`: the reply delivers this lease (NEXT, COMPLETE with `next`)."""
        try:
            data = self.codec.encode_reply(req, kind, body)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # cannot encode
            log.exception("cannot encode the reply to %s", req.verb)
            err = BrokerError(ErrorCode.INTERNAL, f"cannot encode the reply: {exc}")
            data = self.codec.encode_error(req.id, req.verb, err)
        self._emit(data, req.id, req.verb, need, lease)

    def deliver(self, req: Request, cmd: Command, need: int | None) -> None:
        """Reply with `cmd`, just leased."""
        self.reply(req, "ok", cmd.delivered(), need, (cmd, cmd.delivery))

    def take_undelivered(self, resource: str) -> Command | None:
        """A command of `resource` still leased by a delivery whose reply failed."""
        found = None
        kept: list[Lease] = []
        for cmd, delivery in self.undelivered:
            alive = cmd.state is LEASED and cmd.delivery == delivery
            if alive and found is None and cmd.queue.name == resource:
                found = cmd
            elif alive:
                kept.append((cmd, delivery))
        self.undelivered = kept
        return found

    def reply_error(self, req_id: int | None, verb: str | None, err: BrokerError) -> None:
        self._emit(self.codec.encode_error(req_id, verb, err), req_id, verb)

    def _emit(
        self,
        data: bytes,
        req_id: int | None,
        verb: str | None,
        need: int | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.inflight -= 1
        server = self.server
        if need is None:
            # Everything the core has produced so far, appended or not yet, must be durable
            # before this reply may leave: it may reveal any of it.
            need = server.appended_lsn + len(server.core.outbox)
            if verb in READS and server.wal is not None and server.wal.error is not None:
                # While the disk fails, reads answer from memory rather than not at all: what
                # they show may include changes not durable yet (see protocol.md).
                need = server.durable_lsn
        held = self.held
        if need > server.durable_lsn or (held and self.codec.mode is Mode.TEXT):
            # Text mode answers in request order. msgpack replies carry their request's id,
            # so one that needs nothing more overtakes those still waiting for the log, and
            # held ones are kept in the order of the LSN they need (a NEXT may need less
            # than the replies before it).
            at = len(held)
            if self.codec.mode is not Mode.TEXT:
                while at and held[at - 1][0] > need:
                    at -= 1
            held.insert(at, (need, data, req_id, verb, lease))
            server.holding.add(self)
        else:
            self.out.append(data)
            self.out_bytes += len(data)
        server.dirty.add(self)

    def release(self, durable_lsn: int) -> None:
        held = self.held
        ready = 0
        while ready < len(held) and held[ready][0] <= durable_lsn:
            data = held[ready][1]
            self.out.append(data)
            self.out_bytes += len(data)
            ready += 1
        del held[:ready]
        if not held:
            self.server.holding.discard(self)

    def fail_held(self, err: BrokerError) -> None:
        """The log could not make the held replies' records durable: none of them is an
        acknowledgement any more; each becomes `err`. A lease such a reply delivered was
        made all the same (its record waits in the log): the connection's next NEXT on its
        resource gets it again (`Server._take`), so that it is not left with nobody."""
        encode = self.codec.encode_error
        for _, _, req_id, verb, lease in self.held:
            data = encode(req_id, verb, err)
            self.out.append(data)
            self.out_bytes += len(data)
            if lease is not None:
                self.undelivered.append(lease)
        self.held.clear()
        self.server.holding.discard(self)

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.transport.write(data)
        self.out.clear()
        self.out_bytes = 0
        if self.closing and not self.held and self.transport is not None:
            self.transport.close()
        elif self.eof and not (self.inflight or self.backlog or self.held):
            self.closing = True  # everything it sent is answered
            if self.transport is not None:
                self.transport.close()
        elif self.inflight < self.server.config.limits.max_inflight:
            self._resume_reading("inflight")
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        if (
            self.backlog
            and not self._drain_scheduled
            and not self.write_paused
            and not (self.codec.mode is Mode.TEXT and self.blocked)
        ):
            # Requests read ahead waited for replies to go out (a blocked text request was
            # answered, the in-flight limit is no longer reached, the client read its
            # replies): carry on with them now, not when the client happens to send more.
            self._drain_scheduled = True
            self.server.loop.call_soon(self._continue_backlog)

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is over its high-water mark: no more requests are handled
        (their replies would pile up in memory) until it drains (resume_writing)."""
        return "write-buffer" in self._read_paused_by

    def _continue_backlog(self) -> None:
        self._drain_scheduled = False
        if not self.closing:
            self._resume_reading("backlog")
            self._drain_backlog()
            self.server.after_batch()

    def close_after_flush(self) -> None:
        self.closing = True
        self.backlog = None
        self.server.dirty.add(self)

    def _pause_reading(self, why: str) -> None:
        if why in self._read_paused_by:
            return
        if not self._read_paused_by and self.transport is not None:
            self.transport.pause_reading()
        self._read_paused_by |= {why}

    def _resume_reading(self, why: str) -> None:
        if why in self._read_paused_by:
            # Back to the shared empty one: an empty frozenset of its own costs 216 bytes.
            self._read_paused_by = (self._read_paused_by - {why}) or NOT_PAUSED
            if not self._read_paused_by and self.transport is not None:
                self.transport.resume_reading()


class Server:
    #: How the broker stops at once (see `_cannot_log`); a test replaces it.
    exit_now: Callable[[int], object] = staticmethod(os._exit)

    def __init__(
        self,
        config: ServerConfig,
        clock: Callable[[], float] | None = None,
        files: FileLayer | None = None,
    ) -> None:
        self.config = config
        #: Wall-clock seconds for the core and its records; by default one that a step of
        #: the system clock does not move while the broker runs (clock.py).
        self.clock = SteadyWallClock() if clock is None else clock
        #: The log's file layer: the real one, or a test's that loses power or fills up.
        self.files = files
        # Replaced by the recovered broker in start().
        self.core = Broker(config.limits, schema.check_command)
        self.wal: Wal | None = None
        self.snapshotter: Snapshotter | None = None
        self.recovery: RecoveryReport | None = None
        self.new_id = IdGenerator()
        self._packer = msgpack.Packer(use_bin_type=True)
        #: A commit is in flight (its callback requests the next one if needed).
        self._committing = False
        #: A commit is requested for the end of this loop pass.
        self._commit_soon = False
        #: appended_lsn at the last gc.freeze (see FREEZE_EVERY).
        self._frozen_at = 0
        self._commit_retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: While the log fails: since when, and when that was last logged (monotonic).
        self._failing_since: float | None = None
        self._failure_logged = 0.0
        self.connections: dict[int, Connection] = {}
        self.dirty: set[Connection] = set()
        #: The connections holding replies for the log (see Connection.held): what a commit
        #: visits, however many connections sit idle.
        self.holding: set[Connection] = set()
        self.appended_lsn = 0
        self.durable_lsn = 0
        #: Which record made each deliverable command deliverable (what a NEXT waits for).
        self.ready_lsns = ReadyLsns(0)
        #: Parked WAITs per package, in arrival order (a dict: one leaves in O(1)).
        self.waits: dict[str, dict[Blocked, None]] = {}
        self.tcp_port: int | None = None
        #: --max-connections, or fewer if the open-file limit leaves room for fewer.
        self.max_connections = config.limits.max_connections
        self.loop: asyncio.AbstractEventLoop  # set by start()
        self._servers: list[asyncio.AbstractServer] = []
        self._next_conn = 0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._snapshot_timer: asyncio.TimerHandle | None = None
        self._tick_at: float | None = None
        self._lock_fd: int | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self.handlers: dict[str, Handler] = {
            "HELLO": self._hello,
            "PING": self._ping,
            "NEW": self._new,
            "ADD": self._add,
            "ENQUEUE": self._enqueue,
            "SUBMIT": self._submit,
            "STATUS": self._status,
            "WAIT": self._wait,
            "NEXT": self._next,
            "TOUCH": self._touch,
            "COMPLETE": self._complete,
            "CANCEL": self._cancel,
            "STATS": self._stats,
            "HELP": self._help,
            "QUIT": self._quit,
            "ANNOUNCE": self._announce,
        }

    @property
    def socket_path(self) -> Path:
        return self.config.socket_path

    # lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        # Forked helpers (log checks, snapshots) close their copy first (detach_forked_child).
        self._lock_fd = lock_directory(data_dir)
        self.max_connections = fit_connections(self.config.limits.max_connections)
        try:
            await self._recover(data_dir)
            await self._listen_unix(self.socket_path)
            if self.config.tcp is not None:
                host, port = self.config.tcp
                srv = await self.loop.create_server(self._make_connection, host, port)
                self._servers.append(srv)
                self.tcp_port = srv.sockets[0].getsockname()[1]
                log.info("listening on tcp %s:%d", host, self.tcp_port)
        except BaseException:
            for listening in self._servers:
                listening.close()
            if self.wal is not None:
                with contextlib.suppress(Exception):
                    await self.wal.close()
            self._unlock()
            raise
        self._schedule_tick()

    async def _recover(self, data_dir: Path) -> None:
        """Open the log, rebuild the core from snapshot + records, and make the recovery's
        own records (released leases) durable before serving anyone."""
        config = self.config
        wal, recovery = Wal.open(
            data_dir,
            fsync=config.fsync,
            batch_interval_ms=config.fsync_interval_ms,
            segment_size=config.segment_size,
            files=self.files,
        )
        self.wal = wal
        if recovery.torn is not None:
            log.warning("recovery: %s", recovery.torn)
        self.core, self.recovery = persist.recover(
            wal, config.limits, schema.check_command, self.clock()
        )
        log.info("recovered: %s", self.recovery.describe())
        self.appended_lsn = self.durable_lsn = wal.last_lsn
        self.core.readied.clear()  # replayed: all of it is durable
        self._frozen_at = self.appended_lsn  # persist.recover froze what it built
        self.ready_lsns = ReadyLsns(self.core.next_order)
        self.snapshotter = Snapshotter(wal)
        self.snapshotter.last_lsn = self.recovery.snapshot_lsn
        self._append_outbox()
        await wal.commit()
        self.durable_lsn = self.appended_lsn

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _listen_unix(self, path: Path) -> None:
        _claim_socket_path(path)
        old_umask = os.umask(0o177)
        try:
            srv = await self.loop.create_unix_server(self._make_connection, str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._servers.append(srv)
        log.info("listening on unix %s", path)

    def _make_connection(self) -> Connection:
        self._next_conn += 1
        return Connection(self, self._next_conn)

    def admit(self, conn: Connection) -> bool:
        """Refuse a connection over the limit (or while stopping) with one text error line:
        its mode is not known yet, and a line is what a person or a log can read."""
        if len(self.connections) < self.max_connections and not self._stopping:
            return True
        code = ErrorCode.SHUTTING_DOWN if self._stopping else ErrorCode.LIMIT_EXCEEDED
        msg = "broker is stopping" if self._stopping else "too many connections"
        assert conn.transport is not None
        conn.closing = True
        conn.transport.write(f"ERR {code.value} {msg}\n".encode())
        conn.transport.close()
        return False

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        for srv in self._servers:
            srv.close()
        err = BrokerError(ErrorCode.SHUTTING_DOWN, "broker is stopping")
        for conn in list(self.connections.values()):
            for blocked in list(conn.blocked):
                self._unblock(blocked)
                if blocked.req.verb == "COMPLETE":
                    # COMPLETE with `next`: its completion is made, and the reply
                    # acknowledges it (once durable); only the NEXT part comes back empty.
                    conn.reply(blocked.req, "empty", None)
                else:
                    conn.reply_error(blocked.req.id, blocked.req.verb, err)
            conn.close_after_flush()
        self.after_batch()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._snapshot_timer is not None:
            self._snapshot_timer.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        try:
            await self._close_log()
        finally:
            self._unlock()
            self._stopped.set()

    async def _close_log(self) -> None:
        """Flush what is left, snapshot the final state, close the log."""
        if self._commit_retry is not None:
            self._commit_retry.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        if self.wal is None:
            return
        try:
            await self.wal.commit()
            # The last held replies are acknowledgements now: send them, then close.
            self._made_durable(self.appended_lsn)
            self._release_held()
            if self.snapshotter is not None and self.appended_lsn > 0:
                await self.snapshotter.take_inline(self.core, self.appended_lsn)
        except WalError as exc:
            log.error("could not flush the log at shutdown: %s", exc)
            self._fail_held(
                BrokerError(ErrorCode.STORAGE_FAILED, f"could not be made durable: {exc}")
            )
        finally:
            with contextlib.suppress(WalError):
                await self.wal.close()
        log.info("log closed at lsn %d", self.appended_lsn)

    # the batch boundary ----------------------------------------------------------

    def after_batch(self) -> None:
        """Drain what the core produced, log it, and write the replies it allows."""
        core = self.core
        base = self.appended_lsn
        if core.outbox:
            self._append_outbox()
            assert self.wal is not None
            if self.wal.write_now() >= self.appended_lsn:
                self._made_durable(self.appended_lsn)  # `off`/`batch`: written in this pass
            elif not self._commit_soon:
                # Not at once: the other connections whose data arrived in this loop pass
                # are handled before the call_soon callback, so their records share the
                # flush (unpipelined x16 produce: +20%; a lone client pays one loop hop).
                self._commit_soon = True
                self.loop.call_soon(self._request_commit)
        if core.deliveries:
            deliveries, core.deliveries = core.deliveries, []
            for waiter, cmd in deliveries:
                # Both logged by now: the batch's records are appended above.
                before = base + waiter.lease_record
                need = self._delivery_need(waiter, cmd, before, ())
                self._deliver(waiter, cmd, need)
        if core.finished:
            finished, core.finished = core.finished, []
            for pkg in finished:
                for blocked in self.waits.pop(pkg.id, ()):
                    self._unblock(blocked)
                    blocked.conn.reply(blocked.req, "ok", pkg.status())
        self._flush_dirty()
        self._schedule_tick()
        self._maybe_snapshot()
        if self.appended_lsn - self._frozen_at >= FREEZE_EVERY:
            self._freeze()

    def _freeze(self) -> None:
        """Collect the young generations, then freeze what survives: the broker's state is
        long-lived and frees itself by refcount (its cycles, package <-> commands, are
        broken when a package is forgotten), so the cyclic collector has nothing to find
        in it and walking it is pure pause. What a freeze keeps is still freed by refcount;
        only an object that becomes cyclic garbage after a freeze would stay forever, so
        the broker must make none: tests/test_garbage.py drives every path that drops
        state and checks that the collector finds none of spinbroker's objects."""
        self._frozen_at = self.appended_lsn
        gc.collect(1)
        gc.freeze()

    def _flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, set()
        durable = self.durable_lsn
        for conn in dirty:
            if conn.held:
                conn.release(durable)
            conn.flush()

    def _append_outbox(self) -> None:
        """Hand the core's new records to the log (buffered; made durable by the committer)."""
        assert self.wal is not None
        append, pack = self.wal.append, self._packer.pack
        lsn = self.appended_lsn
        core = self.core
        for index, rec in enumerate(core.outbox):
            try:
                body = pack(records.to_wire(rec))
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                del core.outbox[:index]  # those are logged
                self.appended_lsn = lsn
                self._cannot_log(rec, exc)
                return
            lsn = append(body)
        core.outbox.clear()
        self.appended_lsn = lsn
        self.ready_lsns.logged(core.next_order, core.readied, lsn)
        if core.readied:
            core.readied = []

    def _cannot_log(self, rec: records.Record, exc: BaseException) -> None:
        """A record the core applied cannot be encoded for the log: a bug (requests are
        checked so that every record they make can be logged). The state in memory now
        holds a change the log never will, so nothing more may be acknowledged nor
        snapshotted: stop at once. Everything acknowledged is already in the log (written,
        and synced in mode `always`), and a restart recovers from it."""
        log.critical("cannot log a record, stopping at once: %.300r: %s", rec, exc)
        self.exit_now(EXIT_CANNOT_LOG)

    def _made_durable(self, lsn: int) -> None:
        if lsn > self.durable_lsn:
            self.durable_lsn = lsn
            self.ready_lsns.durable(lsn)

    def _request_commit(self) -> None:
        """Group commit: one commit in flight at a time; every record appended meanwhile
        goes out with the next one, which the callback of this one requests."""
        self._commit_soon = False
        if self._committing or self._commit_retry is not None or self._stopping:
            return
        assert self.wal is not None
        self._committing = True
        target = self.appended_lsn
        self.wal.on_commit(lambda exc: self._committed(exc, target))

    def _committed(self, exc: BaseException | None, target: int) -> None:
        self._committing = False
        if self._stopping:
            return  # _close_log commits what is left itself
        if isinstance(exc, WalWriteError):
            self._storage_failed(exc)
            # The log keeps the records and retries; ask again a little later.
            self._commit_retry = self.loop.call_later(STORAGE_RETRY_SECONDS, self._retry_commit)
            return
        if exc is not None:
            log.error("commit failed: %r", exc)
            return
        if self._failing_since is not None:
            log.warning(
                "the log is written again after %.1fs of failures",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        self._made_durable(target)
        self._release_held()
        if self.durable_lsn < self.appended_lsn:
            self._request_commit()

    def _retry_commit(self) -> None:
        self._commit_retry = None
        if self.durable_lsn < self.appended_lsn:
            self._request_commit()

    def _release_held(self) -> None:
        self.dirty.update(self.holding)
        self._flush_dirty()

    def _storage_failed(self, exc: WalWriteError) -> None:
        now = time.monotonic()
        if self._failing_since is None or now - self._failure_logged >= 10.0:
            log.error("the log cannot be written: %s; refusing changes until it can", exc)
            self._failure_logged = now
        if self._failing_since is None:
            self._failing_since = now
        self._fail_held(
            BrokerError(ErrorCode.STORAGE_FAILED, f"the change could not be made durable: {exc}")
        )

    def _fail_held(self, err: BrokerError) -> None:
        for conn in list(self.holding):
            conn.fail_held(err)
            self.dirty.add(conn)
        self._flush_dirty()

    def _maybe_snapshot(self) -> None:
        snap = self.snapshotter
        config = self.config
        if snap is None or self._stopping:
            return
        if snap.due(self.appended_lsn, config.snapshot_every, config.snapshot_interval):
            try:
                task = snap.start(self.core, self.appended_lsn)
            except OSError:
                return  # logged; the next one is due after another interval
            self._tasks.add(task)
            task.add_done_callback(self._snapshot_done)
        elif (
            snap.running is None
            and self.appended_lsn > snap.last_lsn
            and self._snapshot_timer is None
        ):
            # Changes wait for the interval: come back then even if no request comes.
            delay = max(0.01, config.snapshot_interval - (time.monotonic() - snap.last_at))
            self._snapshot_timer = self.loop.call_later(delay, self._snapshot_timer_fired)

    def _snapshot_timer_fired(self) -> None:
        self._snapshot_timer = None
        self._maybe_snapshot()

    def _snapshot_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._maybe_snapshot()  # records made while it ran wait for the interval

    def _delivery_need(
        self,
        waiter: Waiter,
        cmd: Command,
        everything_before: int,
        unlogged: Collection[Command],
    ) -> int:
        """The LSN a reply delivering `cmd` to `waiter` waits for (see `_deliver`): what made
        it ready, for a first delivery whose readiness is logged; else `everything_before`,
        the LSN of the last record before its lease. Both cover what the reply reveals. A
        lease that skipped a number waits for its own record too (Broker.recover_leases)."""
        if waiter.skipped:
            return everything_before + 1
        if cmd.delivery != 1:
            return everything_before
        ready = self.ready_lsns.need(cmd, unlogged)
        return everything_before if ready is None else min(everything_before, ready)

    def _deliver(self, waiter: Waiter, cmd: Command, need: int) -> None:
        """Answer a parked NEXT. A first delivery waits only for what made the command
        deliverable (readiness.py), not for unrelated records nor its own lease record: a
        lease is not promised to outlive a crash (the command is delivered again), so a
        NEXT costs no fsync of its own. A later delivery waits for every record before its
        lease, the earlier leases' included, so that a crash loses at most the last one
        (which the restarted broker's numbering skips: Broker.recover_leases)."""
        blocked = waiter.token
        assert isinstance(blocked, Blocked)
        self._unblock(blocked)
        blocked.conn.deliver(blocked.req, cmd, need)

    def _unblock(self, blocked: Blocked) -> None:
        blocked.cancel_timer()
        blocked.conn.blocked.discard(blocked)
        waiter = blocked.waiter
        if waiter is not None:
            # Break the Blocked <-> Waiter cycle: what is frozen must be freed by refcount
            # alone (see FREEZE_EVERY), or each parked NEXT alive at a freeze would leak.
            blocked.waiter = None
            self.core.unpark(waiter)
        if blocked.package is not None:
            waits = self.waits.get(blocked.package)
            if waits is not None and blocked in waits:
                del waits[blocked]
                if not waits:
                    del self.waits[blocked.package]

    def input_ended(self, conn: Connection) -> None:
        """`conn` sent EOF: its parked NEXTs and WAITs end as if timed out (and later ones
        do not park: see `_take`, `_wait`), so that a client that closed is not kept
        waiting for events that may never come; every other reply goes out once its
        records are durable, then `Connection.flush` closes the connection."""
        for blocked in list(conn.blocked):
            self._unblock(blocked)
            conn.reply(blocked.req, "empty", None)
        self.dirty.add(conn)
        self.after_batch()

    def disconnected(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        self.dirty.discard(conn)
        self.holding.discard(conn)
        for blocked in list(conn.blocked):
            self._unblock(blocked)
        if self._stopping:
            # stop() closes every connection and its records are all logged: ending these
            # leases now would change the core past the log, and the final snapshot would
            # hold what no record says. The next start ends them, as after a crash.
            return
        self.core.release_owner(conn.id, self.clock())
        self.after_batch()

    def _schedule_tick(self) -> None:
        when = self.core.next_deadline()
        if when is None or (self._tick_at is not None and self._tick_at <= when):
            return
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        now = self.clock()
        self._tick_at = min(when, now + TICK_CHECK_SECONDS)
        self._tick_handle = self.loop.call_later(max(0.0, self._tick_at - now), self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        self._tick_at = None
        self.core.tick(self.clock())
        self.after_batch()

    # requests ------------------------------------------------------------------

    def handle(self, conn: Connection, req: Request) -> None:
        handler = self.handlers.get(req.verb)
        try:
            if handler is None:
                raise BrokerError(
                    ErrorCode.UNKNOWN_VERB, f"unknown verb {req.verb!r}; HELP lists the verbs"
                )
            if req.verb in CHANGES_STATE and self.wal is not None and self.wal.error is not None:
                raise BrokerError(
                    ErrorCode.STORAGE_FAILED,
                    f"the log cannot be written ({self.wal.error}); changes are refused",
                )
            handler(conn, req)
        except BrokerError as err:
            conn.reply_error(req.id, req.verb, err)
        except Exception as exc:  # a bug: answer it, log it, keep serving everyone else
            log.exception("internal error handling %s", req.verb)
            conn.reply_error(req.id, req.verb, BrokerError(ErrorCode.INTERNAL, repr(exc)))

    def _hello(self, conn: Connection, req: Request) -> None:
        body = {
            "server": "spinbroker",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "mode": conn.codec.mode.value if conn.codec.mode else None,
            "limits": self.config.limits.to_wire(),
        }
        conn.reply(req, "ok", body)

    def _ping(self, conn: Connection, req: Request) -> None:
        conn.reply(req, "ok", "pong")

    def _help(self, conn: Connection, req: Request) -> None:
        conn.reply(req, "ok", list(TEXT_USAGE.values()))

    def _quit(self, conn: Connection, req: Request) -> None:
        conn.reply(req, "ok", "bye")
        conn.close_after_flush()

    def _new(self, conn: Connection, req: Request) -> None:
        package_id = self.new_id()
        self.core.new_package(package_id, self.clock())
        conn.reply(req, "ok", {"package": package_id})

    def _add(self, conn: Connection, req: Request) -> None:
        args = req.args
        package_id = requests.string(args, "package")
        many = "commands" in args
        commands: list[NewCommand]
        if many:
            commands = requests.command_list(args, positions=False)
        else:
            commands = [requests.new_command(args, level=requests.ONE_COMMAND_LEVEL)]
        ids = self.new_id.many(len(commands))
        self.core.add_commands(package_id, commands, ids, self.clock())
        conn.reply(req, "ok", {"commands": ids} if many else {"command": ids[0]})

    def _enqueue(self, conn: Connection, req: Request) -> None:
        ids = self.core.enqueue(requests.string(req.args, "package"), self.clock())
        conn.reply(req, "ok", {"commands": ids})

    def _submit(self, conn: Connection, req: Request) -> None:
        commands = requests.command_list(req.args, positions=True)
        package_id = self.new_id()
        ids = self.new_id.many(len(commands))
        self.core.submit(package_id, commands, ids, self.clock())
        conn.reply(req, "ok", {"package": package_id, "commands": ids})

    def _status(self, conn: Connection, req: Request) -> None:
        args = req.args
        with_commands = requests.boolean(args, "commands", False)
        conn.reply(req, "ok", self.core.status(requests.string(args, "id"), with_commands))

    def _wait(self, conn: Connection, req: Request) -> None:
        package_id = requests.string(req.args, "package")
        timeout = requests.seconds(req.args, "timeout")
        pkg = self.core.wait_target(package_id)
        if pkg.finished:
            conn.reply(req, "ok", pkg.status())
            return
        if timeout == 0 or conn.eof:
            conn.reply(req, "empty", None)
            return
        blocked = Blocked(conn, req)
        blocked.package = package_id
        self.waits.setdefault(package_id, {})[blocked] = None
        self._block(conn, blocked, timeout)

    def _next(self, conn: Connection, req: Request) -> None:
        self._take(conn, req, *_next_args(req.args), acknowledges=False)

    def _take(
        self,
        conn: Connection,
        req: Request,
        resource: str,
        timeout: float | None,
        ttr: float | None,
        acknowledges: bool,
    ) -> None:
        """NEXT: deliver the first ready command of `resource`, or park until one is.
        `acknowledges`: the reply also acknowledges this request's earlier change (COMPLETE
        with `next`), so it waits for that change's record too."""
        again = conn.take_undelivered(resource) if conn.undelivered else None
        if again is not None:  # its reply failed with the log (see Broker.give_again)
            given = self.core.give_again(again.id, again.delivery, ttr, self.clock())
            if given is not None:  # the reply waits for its touch record too (need None)
                conn.deliver(req, given, None)
                return
        blocked = Blocked(conn, req)
        waiter = Waiter(blocked, conn.id, ttr)
        # A client that sent EOF has likely closed: no NEXT of it parks (a lease made to it
        # later would be lost with its connection).
        block = timeout != 0 and not conn.eof
        cmd = self.core.next(resource, waiter, self.clock(), block)
        if cmd is not None:
            everything_before = self.appended_lsn + len(self.core.outbox) - 1
            need = self._delivery_need(waiter, cmd, everything_before, self.core.readied)
            if acknowledges:  # and the completion before the lease
                need = max(need, everything_before)
            conn.deliver(req, cmd, need)
            return
        if not block:
            conn.reply(req, "empty", None)
            return
        blocked.waiter = waiter
        self._block(conn, blocked, timeout)

    def _block(self, conn: Connection, blocked: Blocked, timeout: float | None) -> None:
        conn.blocked.add(blocked)
        if timeout is not None:
            blocked.timer = self.loop.call_later(timeout, self._timed_out, blocked)

    def _timed_out(self, blocked: Blocked) -> None:
        blocked.timer = None
        if blocked not in blocked.conn.blocked:
            return
        self._unblock(blocked)
        blocked.conn.reply(blocked.req, "empty", None)
        self.after_batch()

    def _touch(self, conn: Connection, req: Request) -> None:
        args = req.args
        command_id = requests.string(args, "command")
        ttr = requests.positive_seconds(args, "ttr")
        delivery = requests.optional_int(args, "delivery")
        in_force = self.core.touch(command_id, ttr, delivery, self.clock())
        conn.reply(req, "ok", {"command": command_id, "ttr": in_force})

    def _complete(self, conn: Connection, req: Request) -> None:
        args = req.args
        command_id = requests.string(args, "command")
        success = requests.boolean(args, "success")
        reason = requests.optional_str(args, "reason")
        delivery = requests.optional_int(args, "delivery")
        then = args.get("next")
        if then is None:
            state = self.core.complete(command_id, success, reason, delivery, self.clock())
            conn.reply(req, "ok", {"command": command_id, "state": state.value})
            return
        # COMPLETE + NEXT in one round trip: the reply is NEXT's; it leaves only once the
        # completion is durable (the completion's record comes before any lease's).
        if not isinstance(then, dict):
            raise BrokerError(ErrorCode.BAD_REQUEST, "argument 'next' must be a map")
        next_args = _next_args(then)
        self.core.complete(command_id, success, reason, delivery, self.clock())
        self._take(conn, req, *next_args, acknowledges=True)

    def _cancel(self, conn: Connection, req: Request) -> None:
        package_id = requests.string(req.args, "package")
        n = self.core.cancel(package_id, self.clock())
        conn.reply(req, "ok", {"package": package_id, "cancelled": n})

    def _announce(self, conn: Connection, req: Request) -> None:
        resource = requests.string(req.args, "resource")
        wire = req.args.get("schema")
        try:
            schema.from_wire(wire)
        except schema.SchemaError as exc:
            raise BrokerError(ErrorCode.BAD_REQUEST, f"bad schema: {exc.message}") from None
        assert isinstance(wire, dict)
        self.core.announce(resource, wire, self.clock())
        conn.reply(req, "ok", {"resource": resource})

    def _stats(self, conn: Connection, req: Request) -> None:
        body = self.core.stats()
        body["connections"] = len(self.connections)
        body["log"] = self._log_stats()
        conn.reply(req, "ok", body)

    def _log_stats(self) -> dict[str, Any]:
        """The log and snapshot section of STATS (protocol.md): for an operator to see
        what durability costs (group size, sync times) and how far snapshots are."""
        assert self.wal is not None
        out: dict[str, Any] = {
            "fsync": self.wal.fsync.value,
            # Changes made in this loop pass are in the core's outbox, not yet in the log.
            "appended_lsn": self.appended_lsn + len(self.core.outbox),
            "durable_lsn": self.durable_lsn,
        }
        out.update(self.wal.stats())
        snap = self.snapshotter
        if snap is not None:
            out["snapshots"] = snap.taken
            out["snapshot_lsn"] = snap.last_lsn
            out["snapshot_fork_ms"] = round(snap.last_fork_s * 1000, 3)
            out["snapshot_seconds"] = round(snap.last_took_s, 3)
        return out


def fit_connections(wanted: int) -> int:
    """Raise the open-file limit (up to its hard limit) to what `wanted` connections and
    FD_RESERVE need; returns how many connections it leaves room for. Past the limit a
    new client would be dropped at accept() with no error line, and the log could fail
    to open a segment (EMFILE) under an honest workload."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    infinity = resource.RLIM_INFINITY
    if soft != infinity and soft < need:
        target = need if hard == infinity else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", target, exc)
    if soft == infinity or soft >= need:
        return wanted
    fitting = max(1, soft - FD_RESERVE)
    log.warning(
        "the open-file limit (%d) leaves room for %d connections, not --max-connections %d "
        "(raise it with ulimit -n)",
        soft,
        fitting,
        wanted,
    )
    return fitting


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket file at `path` (one left by a broker that was killed). The
    socket path need not be inside the data dir, so holding the data dir's lock does not
    make it ours: refuse a path another process listens on, or a file that is no socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise RuntimeError(f"socket {path} is in use by another process")


def _next_args(args: dict[str, Any]) -> tuple[str, float | None, float | None]:
    resource = requests.string(args, "resource")
    check_name("resource", resource)
    return resource, requests.seconds(args, "timeout"), requests.positive_seconds(args, "ttr")


def _open_stdio() -> None:
    """Open /dev/null on each of fds 0-2 found closed (`serve 0<&-`): otherwise the next
    descriptor opened takes its number, the event loop's own included, and libuv aborts
    the process when it closes a descriptor below 3 at the end. Best effort: with no
    /dev/null (a bare chroot) the broker starts as it did before."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                continue
            try:
                opened = os.open(os.devnull, os.O_RDWR)  # the lowest free one: this one
            except OSError:
                return
            os.set_inheritable(opened, True)  # standard descriptors are


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _serve(config: ServerConfig) -> int:
    server = Server(config)
    try:
        await server.start()
    except WalCorruption as exc:
        log.error(
            "cannot start: the log is corrupt: %s\n"
            "  `spinbroker wal inspect %s` shows it; `spinbroker wal repair %s` truncates it "
            "there, keeping a backup of everything it removes",
            exc,
            config.data_dir,
            config.data_dir,
        )
        return 1
    except WalNewerVersion as exc:
        log.error(
            "cannot start: %s\n  this is no damage but a newer spinbroker's data dir: nothing "
            "of %s was cut or set aside, for that version to open",
            exc,
            config.data_dir,
        )
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: loop.create_task(server.stop()))
    log.info("spinbroker %s ready (data dir %s)", __version__, config.data_dir)
    await server.serve_forever()
    log.info("stopped")
    return 0


def run(config: ServerConfig) -> int:
    """Run a broker until SIGINT or SIGTERM; the process exit code."""
    _open_stdio()
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(_serve(config))
