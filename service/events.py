"""Job events for everyone who waits on a job: SSE readers, gRPC streams and synchronous requests.
Their layout and the worker's writer are contract/events.py. No torch.

One `EventHub` per gateway process reads the event streams of every job that someone waits on
with one blocking XREAD on one Redis connection, and hands each entry to that job's watchers. A
watcher is a bounded buffer on the event loop, not a thread or a connection, so one process holds
thousands. Per job (a `Feed`), not per watcher, the hub:
- fetches the PNG of each image event once;
- while the job's stream is quiet, checks every `check_s` whether it waits in its queue (a
  `queued` event when its position changes), ended without a stream entry (cancelled while
  queued, or a stream that expired: the end is derived from its record) or is gone.

A watcher that joins reads what it missed from the stream itself (XRANGE, a page at a time), then
attaches to the job's feed. A slow reader's buffer holds at most `buffer_bytes`: when the next
event does not fit, the watcher detaches, and once its reader has drained the buffer it catches
up from the stream as a late joiner does. Nothing is lost and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from prometheus_client import Gauge
from rq.job import JobStatus as RQStatus

from contract.events import TERMINAL, Frame, JobEvent, decode_entry, events_key
from contract.jobs import JobStatus
from contract.ledger import Keys, text
from service.ledger import STATUS_OF_RQ, Ledger

log = logging.getLogger("service.events")
T = TypeVar("T")
Blocking = Callable[[Callable[[], T]], Awaitable[T]]

PAGE_ENTRIES = 16  # stream entries per catch-up read (entries with previews can be large)
READ_ENTRIES = 64  # entries per job per hub read
PAGE_CACHE_ENTRIES = 4096  # catch-up pages kept (and bounded in bytes too)
EVENT_OVERHEAD_BYTES = 512  # what an event costs in a buffer beyond its PNGs


def stream_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def event_bytes(event: JobEvent) -> int:
    """What an event costs held in the gateway's memory: its PNGs and an allowance for the rest."""
    return EVENT_OVERHEAD_BYTES + sum(len(f.png) for f in event.frames)


def expired(job_id: str) -> JobEvent:
    return JobEvent("error", job_id, {"status": "failed", "message": "the job expired"})


class Encodings:
    """What an event looks like on the wire (SSE text, a gRPC message), made once however many
    watchers send it: a least-recently-used cache keyed by (format, job, stream id), bounded in bytes.
    Events without a stream id (derived ones) are encoded each time."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str, str], tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def get(self, form: str, event: JobEvent, encode: Callable[[JobEvent], T], size: Callable[[T], int]) -> T:
        if not event.id:
            return encode(event)
        key = (form, event.job_id, event.id)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]  # type: ignore[no-any-return]
        value = encode(event)
        cost = size(value)
        self._items[key] = (value, cost)
        self._bytes += cost
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= dropped
        return value


class HubClosed(Exception):
    """The gateway is shutting down: watchers end (their jobs go on)."""


@dataclass(eq=False)
class Feed:
    """One watched job: where the hub's reads of its stream are, and who watches it."""

    job_id: str
    cursor: str  # the id of the last entry the hub read
    watchers: set[Watcher] = field(default_factory=set)
    checked_at: float = 0.0  # monotonic time of the last status check; 0 = never
    active_at: float = field(default_factory=time.monotonic)  # of the last entry read
    position: int | None = None
    model: str | None = None  # its queue's model, read once (for queue positions)
    end: JobEvent | None = None  # the terminal event, once seen: for watchers that attach later

    @property
    def started(self) -> bool:
        """Any stream entry means a worker has started the job (queued events stop there)."""
        return stream_order(self.cursor) > (0, 0)

    def publish(self, event: JobEvent) -> None:
        if event.terminal:
            self.end = event
        for watcher in list(self.watchers):
            watcher.offer(event)


class Watcher:
    """One reader of one job's events. `next()` waits for what is new; after the terminal event
    (done or error) `finished` is True. `terminal_only`: only the end matters (a waiting request)."""

    def __init__(self, hub: EventHub, job_id: str, *, after: str = "", terminal_only: bool = False):
        self.hub = hub
        self.job_id = job_id
        self.last_id = after or "0-0"  # the last stream entry buffered or handed out
        self.terminal_only = terminal_only
        self.finished = False
        self.feed: Feed | None = None
        self._buffer: deque[JobEvent] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()

    async def next(self, timeout_s: float | None = None) -> list[JobEvent]:
        """New events (at least one), or [] when `timeout_s` passed first or the watcher has finished.
        Raises HubClosed when the gateway shuts down, redis.RedisError when a catch-up read fails."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.finished:
            if self._buffer:
                return self._hand_out(list(self._buffer))
            if self.hub.closed:
                raise HubClosed
            if self.feed is None:
                events = await self.hub.catch_up(self)
                if events:
                    return self._hand_out(events)
                continue
            self._ready.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                return []
        return []

    def offer(self, event: JobEvent) -> None:
        """From the hub: buffer `event` unless it was seen or is not wanted; detach when it does not fit."""
        if self.terminal_only and not event.terminal:
            return
        if event.id and stream_order(event.id) <= stream_order(self.last_id):
            return
        cost = event_bytes(event)
        if self._buffer and self._bytes + cost > self.hub.buffer_bytes:
            self.hub.detach(self)  # the reader is slow: it reads the stream itself once it has drained
        else:
            self._buffer.append(event)
            self._bytes += cost
            if event.id:
                self.last_id = event.id
        self._ready.set()

    def close(self) -> None:
        self.hub.detach(self)
        self._buffer.clear()
        self._bytes = 0

    def _hand_out(self, events: list[JobEvent]) -> list[JobEvent]:
        self._buffer.clear()
        self._bytes = 0
        for k, event in enumerate(events):
            if event.id:
                self.last_id = max(self.last_id, event.id, key=stream_order)
            if event.terminal:
                self.finished = True
                self.hub.detach(self)
                return events[:k + 1]
        return events


class EventHub:
    """Reads the streams of watched jobs for the whole gateway; see the module's docstring.

    `blocking` runs a synchronous call off the event loop (in the gateway's bounded pool): the
    hub uses it, with `ledger`, only to derive the rare ends that have no stream entry."""

    def __init__(self, url: str, *, timeout_s: float, ledger: Ledger, blocking: Blocking[Any],
                 buffer_bytes: int, check_s: float = 0.5, max_connections: int = 8,
                 watched_jobs: Gauge | None = None):
        self.ledger = ledger
        self.watched_jobs = watched_jobs  # counts len(feeds), summed over the gateway's hubs
        self._counted = 0
        self.blocking = blocking
        self.buffer_bytes = buffer_bytes
        self.check_s = check_s
        # The blocking read has a connection of its own; the hub's short reads share a small pool.
        self._reader = aioredis.Redis.from_url(url, socket_timeout=check_s + timeout_s,
                                               socket_connect_timeout=min(timeout_s, 1.0),
                                               single_connection_client=True)
        # A burst of joining watchers waits its turn for one of them (timeout=None): never "Redis down".
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=None,
                                                        socket_timeout=timeout_s,
                                                        socket_connect_timeout=min(timeout_s, 1.0))
        self.conn = aioredis.Redis(connection_pool=pool)
        self.feeds: dict[str, Feed] = {}
        self.encodings = Encodings()
        self.page_cache_bytes = 64 << 20
        self._pages: OrderedDict[tuple[str, str], asyncio.Future[list[JobEvent]]] = OrderedDict()
        self._page_sizes: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._page_bytes = 0
        self.closed = False
        self._changed = asyncio.Event()
        self._reading = False  # the reader is inside a blocking XREAD
        self._reader_id: int | None = None
        self._wake_task: asyncio.Task[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- life -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-hub")

    async def close(self) -> None:
        """Every watcher's next() raises HubClosed; the hub's connections close. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for feed in list(self.feeds.values()):
            for watcher in list(feed.watchers):
                watcher._ready.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2 * self.check_s + 1)
        if self.watched_jobs is not None:  # its feeds are no longer read
            self.watched_jobs.dec(self._counted)
            self._counted = 0
        await self._reader.aclose()
        await self.conn.aclose()
        await self.conn.connection_pool.disconnect()

    # -- for watchers ------------------------------------------------------------------------------

    def watch(self, job_id: str, *, after: str = "", terminal_only: bool = False) -> Watcher:
        return Watcher(self, job_id, after=after, terminal_only=terminal_only)

    async def wait_end(self, job_id: str, timeout_s: float | None = None) -> bool:
        """Until the job's terminal event (True) or `timeout_s` (False; None: no limit). Raises
        HubClosed when the gateway shuts down first."""
        watcher = self.watch(job_id, terminal_only=True)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while not watcher.finished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                await watcher.next(remaining)
            return True
        finally:
            watcher.close()

    async def last_event(self, job_id: str) -> JobEvent | None:
        """The newest stored event of a job (None when its stream is empty or gone)."""
        entries: Any = await self.conn.xrevrange(events_key(job_id), count=1)
        if not entries:
            return None
        entry_id, fields = entries[0]
        return decode_entry(job_id, entry_id, fields)

    async def catch_up(self, watcher: Watcher) -> list[JobEvent]:
        """A page of what `watcher` missed; attach it to its job's feed once it has read up to the feed."""
        if watcher.terminal_only:  # only the end matters: the newest entry says whether it has come
            last = await self.last_event(watcher.job_id)
            if last is not None and last.terminal:
                return [last]
            events: list[JobEvent] = []
            seen = watcher.last_id if last is None else last.id
        else:
            events = await self._page(watcher.job_id, watcher.last_id)
            if len(events) == PAGE_ENTRIES:
                return events  # more to read: the caller hands these out first
            seen = events[-1].id if events else watcher.last_id
        # No await from here on: the hub cannot read the stream between the check and the attach.
        feed = self.feeds.get(watcher.job_id)
        if feed is not None and stream_order(feed.cursor) > stream_order(seen):
            if watcher.terminal_only:
                seen = feed.cursor  # what lies between was handed out without it: an end would be feed.end
            else:
                return events  # the hub has read further meanwhile: read that too, then attach
        if feed is None:
            feed = self.feeds[watcher.job_id] = Feed(watcher.job_id, cursor=seen)
            self._count_feeds()
            self._wake_reader()
        feed.watchers.add(watcher)
        watcher.feed = feed
        watcher.last_id = max(watcher.last_id, seen, key=stream_order)
        if feed.end is not None:
            watcher.offer(feed.end)
        elif feed.position is not None and not feed.started and not watcher.terminal_only:
            watcher.offer(JobEvent("queued", watcher.job_id, {"position": feed.position}))
        return events

    async def _page(self, job_id: str, after: str) -> list[JobEvent]:
        """Up to PAGE_ENTRIES events of a job's stream after `after`, read once for every watcher that
        replays the same part: watchers that join a job together read the same pages, so a read in
        flight is shared, and a full page is kept (entries never change) in an LRU of `page_cache_bytes`."""
        key = (job_id, after)
        page = self._pages.get(key)
        if page is None:
            page = self._pages[key] = asyncio.ensure_future(self._read_page(job_id, after))
            while len(self._pages) > PAGE_CACHE_ENTRIES:  # reads whose every reader left: drop the oldest
                oldest, _ = self._pages.popitem(last=False)
                self._page_bytes -= self._page_sizes.pop(oldest, 0)
        else:
            self._pages.move_to_end(key)
        try:
            events = await asyncio.shield(page)
        except BaseException:
            if self._pages.get(key) is page and page.done():
                del self._pages[key]
            raise
        if self._pages.get(key) is page and len(events) < PAGE_ENTRIES:
            del self._pages[key]  # the live end of the stream: the next read may find more
        elif key in self._pages and key not in self._page_sizes:
            self._page_sizes[key] = sum(event_bytes(event) for event in events)
            self._page_bytes += self._page_sizes[key]
            while self._page_bytes > self.page_cache_bytes and len(self._page_sizes) > 1:
                oldest = next(iter(self._page_sizes))
                self._page_bytes -= self._page_sizes.pop(oldest)
                self._pages.pop(oldest, None)
        return events

    async def _read_page(self, job_id: str, after: str) -> list[JobEvent]:
        reply: Any = await self.conn.xrange(events_key(job_id), min=f"({after}", count=PAGE_ENTRIES)
        return await self._with_pngs([decode_entry(job_id, i, f) for i, f in reply])

    def detach(self, watcher: Watcher) -> None:
        feed, watcher.feed = watcher.feed, None
        if feed is None:
            return
        feed.watchers.discard(watcher)
        if not feed.watchers and self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]
            self._count_feeds()

    def _count_feeds(self) -> None:
        if self.watched_jobs is not None and not self.closed:
            self.watched_jobs.inc(len(self.feeds) - self._counted)
            self._counted = len(self.feeds)

    # -- the reader --------------------------------------------------------------------------------

    def _wake_reader(self) -> None:
        """A new feed: end the reader's blocking XREAD now (CLIENT UNBLOCK) so that it reads the new
        job too; without this it would after at most `check_s`."""
        self._changed.set()
        if self._reading and self._reader_id is not None and (self._wake_task is None or self._wake_task.done()):
            self._wake_task = asyncio.get_running_loop().create_task(self._unblock(self._reader_id))

    async def _unblock(self, client_id: int) -> None:
        try:
            await self.conn.client_unblock(client_id)
        except redis.RedisError as error:
            log.debug("could not wake the event reader: %s", error)

    async def _run(self) -> None:
        while True:
            try:
                self._reader_id = int(await self._reader.client_id())
                while True:
                    await self._read_once()
            except redis.RedisError as error:
                log.warning("event hub: Redis unavailable (%s); retrying", error)
                self._reading = False
                await asyncio.sleep(self.check_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop every watcher: log it, go on
                log.exception("event hub failed; restarting it")
                await asyncio.sleep(self.check_s)

    async def _read_once(self) -> None:
        if not self.feeds:
            self._changed.clear()
            await self._changed.wait()
            return
        await self._check_quiet_feeds()
        streams = {events_key(job_id): feed.cursor for job_id, feed in self.feeds.items()}
        if not streams:
            return
        self._changed.clear()
        self._reading = True
        try:
            reply: Any = await self._reader.xread(streams, count=READ_ENTRIES,  # type: ignore[arg-type]
                                                  block=max(1, int(self.check_s * 1000)))
        finally:
            self._reading = False
        if reply:
            await self._dispatch(reply)
            # One XREAD costs in proportion to the jobs watched: with many of them, let entries
            # gather for a moment (up to 20 ms at 2,000 jobs) rather than read one at a time.
            await asyncio.sleep(min(0.02, 1e-5 * len(self.feeds)))

    async def _dispatch(self, reply: Any) -> None:
        now = time.monotonic()
        read: list[tuple[Feed, JobEvent]] = []
        prefix = len(events_key(""))
        for key, entries in reply:
            feed = self.feeds.get(text(key)[prefix:])
            if feed is None:
                continue
            everything = not all(watcher.terminal_only for watcher in feed.watchers)
            for entry_id, fields in entries:
                feed.cursor = text(entry_id)
                feed.active_at = now
                if everything or text(fields.get(b"type", b"")) in TERMINAL:
                    read.append((feed, decode_entry(feed.job_id, entry_id, fields)))
        events = await self._with_pngs([event for _, event in read])
        for (feed, _), event in zip(read, events, strict=True):
            feed.publish(event)

    async def _with_pngs(self, events: list[JobEvent]) -> list[JobEvent]:
        """Image events with their PNG (stored beside the stream), fetched in one round trip."""
        wanted = [k for k, event in enumerate(events) if event.type == "image" and not event.frames]
        if not wanted:
            return events
        keys = [Keys.png(events[k].job_id, int(events[k].data["index"])) for k in wanted]
        pngs: list[Any] = await self.conn.mget(keys)
        out = list(events)
        for k, png in zip(wanted, pngs, strict=True):
            event = events[k]
            frames = () if png is None else (Frame(int(event.data["index"]), bytes(png)),)
            out[k] = JobEvent(event.type, event.job_id, event.data, frames, event.id)
        return out

    # -- jobs whose streams are quiet --------------------------------------------------------------

    async def _check_quiet_feeds(self) -> None:
        now = time.monotonic()
        due = [feed for feed in self.feeds.values() if feed.end is None
               and (not feed.checked_at or now - max(feed.checked_at, feed.active_at) >= self.check_s)]
        if not due:
            return
        async with self.conn.pipeline(transaction=False) as pipe:
            for feed in due:
                pipe.hget(Keys.rq_job(feed.job_id), "status")
                if feed.model is None:
                    pipe.hget(Keys.job(feed.job_id), "model")
            replies = iter(await pipe.execute())
        statuses = []
        for feed in due:
            raw = next(replies)
            statuses.append(None if raw is None else STATUS_OF_RQ[RQStatus(text(raw))])
            if feed.model is None:
                model = next(replies)
                feed.model = None if model is None else text(model)
        waiting = [(feed, feed.model) for feed, status in zip(due, statuses, strict=True)
                   if status is JobStatus.queued and feed.model is not None and not feed.started
                   and not all(watcher.terminal_only for watcher in feed.watchers)]  # someone wants positions
        if waiting:
            async with self.conn.pipeline(transaction=False) as pipe:
                for feed, model in waiting:
                    pipe.lpos(Keys.queue(model), feed.job_id)
                positions = await pipe.execute()
            for (feed, _), found in zip(waiting, positions, strict=True):
                position = found if isinstance(found, int) else 0  # not in the list: a worker just claimed it
                if position != feed.position and not feed.started:
                    feed.position = position
                    feed.publish(JobEvent("queued", feed.job_id, {"position": position}))
        for feed, status in zip(due, statuses, strict=True):
            feed.checked_at = now
            if status is None:
                feed.publish(expired(feed.job_id))
            elif status.terminal:
                await self._end_without_entry(feed)

    async def _end_without_entry(self, feed: Feed) -> None:
        """The job has ended: its terminal entry is written in the transaction that ends it, so read
        once more; when there is none (cancelled while queued, stream expired), derive the end."""
        reply: Any = await self.conn.xrange(events_key(feed.job_id), min=f"({feed.cursor}", count=READ_ENTRIES)
        if reply:
            await self._dispatch([(events_key(feed.job_id), reply)])
            return
        for event in await self.blocking(lambda: derived_end(self.ledger, feed.job_id)):
            feed.publish(event)


def derived_end(ledger: Ledger, job_id: str) -> list[JobEvent]:
    """The end of a job that has no terminal stream entry, from its record: its images and done,
    or an error with its status (blocking: runs in the gateway's pool)."""
    record = ledger.record(job_id)
    if record is None:
        return [expired(job_id)]
    if record.status is JobStatus.succeeded and record.result is not None:
        images = record.result.images
        pngs = ledger.pngs(job_id, len(images))
        out = [JobEvent("image", job_id, i.model_dump(mode="json"), () if png is None else (Frame(i.index, png),))
               for i, png in zip(images, pngs, strict=True)]
        done = {"images": len(images), "sampling_s": round(record.result.sampling_s, 4)}
        return [*out, JobEvent("done", job_id, done)]
    return [JobEvent("error", job_id, {"status": record.status.value, "message": record.error or record.status.value})]
