"""The enrichment worker: a bounded pool that follows the ledger's queue, never the sync.

A sync run or a put commits its items (and, through SQL triggers, their queue rows) and
moves on; this worker picks pending rows up, at most ``agent.enrich_concurrency`` at once.
Per item: ranged reads of the head (2, 16, then 64 KiB) until ``sniff`` knows the type and
dimensions; for an image, the whole object (at most ``enrich.max_bytes``) for a thumbnail (read
at once, without the head reads, when the key is named like an image), decoded in a thread
under the pixel cap and the time limit; the thumbnail is written through
the store into the hidden folder, or into the local cache for a dataset that may not write.

Nothing an item does crashes the worker: a bad file fails the item with a reason, a storage
hiccup retries it, a bug retries it ``enrich.max_attempts`` times and then fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from bucketsync import metrics
from bucketsync.core import gate
from bucketsync.core.errors import NotFound, PermissionDenied, StorageError, Transient
from bucketsync.core.model import OVERWRITE
from bucketsync.core.retry import backoff
from bucketsync.enrich.queue import EnrichQueue, Job, Result, Trash
from bucketsync.enrich.ranged import RangeFile
from bucketsync.stores import Store, one_chunk

if TYPE_CHECKING:
    from bucketsync.agent import Agent
    from bucketsync.enrich import sniff as sniffing

# Pillow, filetype and the modules on them (sniff, thumbs, video) are imported by the methods
# that use them: every agent builds an Enricher, most processes (a CLI sync) never enrich, and
# the import is 50-70 ms of CPU.

log = structlog.get_logger("bucketsync.enrich")
#: how often the worker looks at the queue when nobody wakes it
POLL = 1.0
#: results are recorded in one transaction per this many items, or every RESULT_WAIT seconds
RESULT_BATCH, RESULT_WAIT = 128, 0.05
#: an item to retry waits at least RETRY_MIN, plus a jittered backoff from RETRY_BASE (seconds)
RETRY_MIN, RETRY_BASE = 0.5, 1.0


class Enricher:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.wake = asyncio.Event()
        #: item ids being enriched now
        self.running: set[int] = set()
        #: item id -> monotonic time before which a retried item is not taken again
        self._later: dict[int, float] = {}
        self._hooked: object = None
        #: results waiting to be recorded (see ``flush``), and their item ids
        self._results: list[Result] = []
        self._unflushed: set[int] = set()

    @property
    def queue(self) -> EnrichQueue:
        assert self.agent.ledger is not None
        return EnrichQueue(self.agent.ledger)

    async def sync_datasets(self) -> None:
        """Tell the ledger which datasets queue enrichment and trigger events (after a start or reload)."""
        settings = self.agent.settings
        if self._hooked is settings:
            return
        ledger = self.agent.ledger
        assert ledger is not None
        enrich = [await ledger.dataset_id(n) for n in settings.datasets if settings.enriches(n)]
        hooks = [await ledger.dataset_id(n) for n, ds in settings.datasets.items() if ds.triggers]
        await self.queue.set_datasets(enrich, hooks)
        self._hooked = settings

    def cache_dir(self, dataset: str) -> Path:
        return self.agent.settings.enrich.cache_dir / dataset

    # -- the loop ------------------------------------------------------------------
    #
    # One pipeline for the daemon (``run``) and burst mode (``drain``): a feeder claims due items
    # a batch at a time (one transaction), ``enrich_concurrency`` consumers enrich them, and their
    # results are committed in groups (one transaction, one fsync, for up to RESULT_BATCH items):
    # two fsyncs per item would cap the worker at a few dozen items a second.

    async def run(self, stop: asyncio.Event) -> None:
        """Enrich pending items until ``stop``; items being enriched when it is set finish first."""
        await self._pipeline(stop, None, forever=True)

    async def drain(self, max_items: int | None = None) -> int:
        """Burst mode: enrich until nothing is due (or ``max_items`` are done); how many were.
        The CLI uses it without a daemon; tests use it as ``run_once``."""
        await self.sync_datasets()
        done = await self._pipeline(asyncio.Event(), max_items, forever=False)
        await self.empty_trash()
        return done

    async def _pipeline(self, stop: asyncio.Event, max_items: int | None, *, forever: bool) -> int:
        limit = self.agent.settings.agent.enrich_concurrency
        jobs: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=limit)
        taken = 0

        async def feed() -> None:
            nonlocal taken
            try:
                while not stop.is_set() and (max_items is None or taken < max_items):
                    self.wake.clear()
                    batch = await self._claim(limit * 2 if max_items is None else min(limit * 2, max_items - taken))
                    for job in batch:
                        await jobs.put(job)
                    taken += len(batch)
                    if batch:
                        continue
                    if not forever:
                        return
                    await self._idle(stop)
            finally:
                for _ in range(limit):
                    await jobs.put(None)

        async def consume() -> None:
            while (job := await jobs.get()) is not None:
                await self.process(job)

        # The flusher is never cancelled mid-transaction (a COMMIT whose await is cancelled may
        # still have committed): it is told to stop, and makes the last flush itself.
        finished = asyncio.Event()
        flusher = asyncio.create_task(self._flush_every(finished))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(feed())
                for _ in range(limit):
                    tg.create_task(consume())
        finally:
            finished.set()
            await asyncio.shield(flusher)
        return taken

    async def _claim(self, want: int) -> list[Job]:
        """Due items, claimed (an attempt counted) in one transaction; [] when none are due or the
        ledger is in trouble (logged: the daemon's worker goes on)."""
        try:
            await self.sync_datasets()
            now = time.monotonic()
            self._later = {i: t for i, t in self._later.items() if t > now}
            # Shared by agents: only the items of the datasets whose leases this agent holds, so
            # an item is enriched by one agent, not raced for by all (a handover may repeat one).
            keeper = self.agent.leases
            owned = sorted(keeper.held) if keeper is not None else None
            due = await self.queue.due(want, skip=[*self.running, *self._later], datasets=owned)
            claimed = await self.queue.claim(due)
        except Exception:
            log.exception("enrichment could not take items from the queue")
            return []
        self.running.update(j.item_id for j in claimed)
        return claimed

    async def _idle(self, stop: asyncio.Event) -> None:
        """Nothing due: housekeeping, then wait for a wake-up (a run or a put committed items) or POLL."""
        try:
            await self.empty_trash()
            metrics.set_per_dataset(metrics.ENRICH_QUEUE, await self.queue.pending_by_dataset())
        except Exception:  # the ledger in trouble (a full disk): log, wait, go on
            log.exception("enrichment housekeeping failed")
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())}
        await asyncio.wait(waiters, timeout=POLL, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    async def _flush_every(self, finished: asyncio.Event) -> None:
        """Record results every RESULT_WAIT seconds until ``finished``, then once more (a few times
        while the ledger fails; results never recorded leave their items pending, done again later)."""
        last_tries = 3
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), RESULT_WAIT)
            try:
                await self.flush()
            except Exception:
                log.exception("enrichment results could not be recorded; retried")
            if finished.is_set():
                last_tries -= 1
                if not self._results or not last_tries:
                    self._results.clear()
                    self._unflushed.clear()
                    return

    async def flush(self) -> None:
        """Record the buffered results in one transaction."""
        if not self._results:
            return
        batch, self._results = self._results, []
        try:
            stale = await self.queue.finish(batch)
        except BaseException:
            self._results[:0] = batch  # kept for the next flush
            raise
        for r in batch:
            self._unflushed.discard(r.job.item_id)
            self.running.discard(r.job.item_id)
        metrics.set_per_dataset(metrics.ENRICH_QUEUE, await self.queue.pending_by_dataset())
        if stale:
            log.debug("items changed while they were enriched; their new versions are queued", keys=stale)
            await self.empty_trash()

    # -- one item ---------------------------------------------------------------------

    async def process(self, job: Job) -> None:
        """Enrich one item; never raises (cancellation aside)."""
        t0 = time.monotonic()
        result = "failed"
        try:
            conf = self.agent.settings.enrich
            try:
                async with asyncio.timeout(conf.timeout):
                    result = await self._enrich(job)
            except TimeoutError:
                await self._finish(job, "failed", {}, f"took longer than enrich.timeout={conf.timeout:g}s")
            except NotFound:
                await self._finish(job, "failed", {}, "the object is gone from storage")
            except Transient as exc:
                result = await self._retry(job, str(exc))
            except StorageError as exc:
                await self._finish(job, "failed", {}, f"storage: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("enriching an item crashed", dataset=job.dataset, key=job.key)
            with contextlib.suppress(Exception):
                result = await self._retry(job, f"internal error ({type(exc).__name__}); see the agent's log")
        finally:
            if job.item_id not in self._unflushed:  # else it leaves ``running`` once recorded
                self.running.discard(job.item_id)
            metrics.ENRICH_TOTAL.labels(job.dataset, result).inc()
            metrics.ENRICH_SECONDS.labels(job.dataset).observe(time.monotonic() - t0)

    async def _retry(self, job: Job, error: str) -> str:
        if job.attempts + 1 >= self.agent.settings.enrich.max_attempts:
            await self._finish(job, "failed", {}, f"{error} (after {job.attempts + 1} attempts)")
            return "failed"
        self._later[job.item_id] = time.monotonic() + RETRY_MIN + backoff(job.attempts + 1, RETRY_BASE, 60.0)
        await self.queue.retry_later(job, error)
        return "retry"

    async def _enrich(self, job: Job) -> str:
        from bucketsync.enrich import thumbs

        settings = self.agent.settings
        conf = settings.enrich
        store = self._store(job.dataset)
        head, found = await self._head(store, job)
        meta = dict(found.meta)
        if found.error is None and found.video:
            return await self._video(store, job, meta)
        if found.error is not None or not found.image or not conf.thumbnails:
            state = "failed" if found.error is not None else "done"
            await self._finish(job, state, meta, found.error)
            return state
        if job.size > conf.max_bytes:
            meta["thumbnail_skipped"] = f"larger than enrich.max_bytes={conf.max_bytes}"
            await self._finish(job, "done", meta, None)
            return "done"
        data = head if len(head) >= job.size else await self._read(store, job, len(head), None, head)
        try:
            thumb = await asyncio.to_thread(
                thumbs.make_thumbnail,
                data,
                conf.thumbnail_size,
                conf.thumbnail_format,
                conf.max_pixels,
                conf.max_memory,
            )
        except thumbs.ThumbnailError as exc:
            await self._finish(job, "failed", meta, str(exc))
            return "failed"
        except thumbs.ThumbnailSkipped as exc:
            meta["thumbnail_skipped"] = str(exc)
            await self._finish(job, "done", meta, None)
            return "done"
        del data
        key, local = await self._save_thumbnail(store, job, thumb)
        await self._finish(job, "done", meta, None, thumbnail=key, local=local)
        return "done"

    async def _video(self, store: Store, job: Job, meta: dict[str, Any]) -> str:
        """A video's metadata (and first frame's thumbnail) through PyAV, over ranged reads of
        the object (``RangeFile``): the head, the index wherever it is, the first frame's packets."""
        from bucketsync.enrich import video

        conf = self.agent.settings.enrich
        why = video.missing()
        if why is not None:  # the optional extra is not installed: the mimetype, and why no more
            meta["video_skipped"] = why
            await self._finish(job, "done", meta, None)
            return "done"

        async def fetch(offset: int, length: int) -> bytes:
            return await self._read(store, job, offset, length, b"")

        reader = RangeFile(fetch, job.size, asyncio.get_running_loop(), conf.max_bytes)
        try:
            found = await asyncio.to_thread(
                video.analyse,
                reader,
                thumbnail_size=conf.thumbnail_size if conf.thumbnails else None,
                fmt=conf.thumbnail_format,
                max_pixels=conf.max_pixels,
                max_memory=conf.max_memory,
            )
        finally:
            reader.stop()  # a timed-out item: its thread's next read fails, and the thread ends
        meta.update(found.meta)
        if found.error is not None:
            await self._finish(job, "failed", meta, found.error)
            return "failed"
        if found.thumbnail_skipped is not None:
            meta["thumbnail_skipped"] = found.thumbnail_skipped
        if found.thumbnail is None:
            await self._finish(job, "done", meta, None)
            return "done"
        key, local = await self._save_thumbnail(store, job, found.thumbnail)
        await self._finish(job, "done", meta, None, thumbnail=key, local=local)
        return "done"

    async def _save_thumbnail(self, store: Store, job: Job, thumb: bytes) -> tuple[str, bool]:
        """Write the item's thumbnail into the hidden folder, or the local cache for a dataset
        that may not write; its key, and whether it is local."""
        from bucketsync.enrich import thumbs

        fmt = self.agent.settings.enrich.thumbnail_format
        key = thumbs.thumbnail_key(job.key, job.etag, job.size, job.modified, fmt)
        local = self._local(job.dataset)
        if not local:
            try:
                await store.put(key, one_chunk(thumb), OVERWRITE, thumbs.MIME[fmt])
            except PermissionDenied:  # a read-only driver the probe has not flagged (yet): the cache
                local = True
        if local:
            await asyncio.to_thread(_write_file, self.cache_dir(job.dataset) / key, thumb)
        return key, local

    async def _head(self, store: Store, job: Job) -> tuple[bytes, sniffing.Sniffed]:
        """Ranged reads of the head until the sniff can tell; then, if still not, the whole
        object (at most ``enrich.max_bytes``)."""
        from bucketsync.enrich import sniff as sniffing

        conf = self.agent.settings.enrich
        if conf.thumbnails and 0 < job.size <= conf.max_bytes and sniffing.named_like_image(job.key):
            # Its thumbnail will need every byte: one request instead of a head read and then
            # the rest (a request costs the server more than the first 2 KiB it sends).
            # The name only picks the read; the type still comes from the bytes.
            return await self._whole(store, job, b"")
        head = b""
        for step in sniffing.HEAD_STEPS:
            if len(head) >= job.size and job.size:
                break
            head = await self._read(store, job, len(head), min(step, job.size) - len(head), head)
            try:
                return head, sniffing.sniff(head, job.size, conf.max_pixels)
            except sniffing.NeedMore:
                continue
        if job.size > conf.max_bytes:
            return head, sniffing.Sniffed(
                {},
                f"the header is not in the first {len(head)} bytes and the "
                f"object is larger than enrich.max_bytes={conf.max_bytes}",
            )
        return await self._whole(store, job, head)

    async def _whole(self, store: Store, job: Job, head: bytes) -> tuple[bytes, sniffing.Sniffed]:
        """The object (``head`` and the rest of it), and what the sniff finds in all of it."""
        from bucketsync.enrich import sniff as sniffing

        data = await self._read(store, job, len(head), None, head)
        try:
            return data, sniffing.sniff(data, len(data), self.agent.settings.enrich.max_pixels)
        except sniffing.NeedMore:  # cannot happen with the whole object; kept total
            return data, sniffing.Sniffed({}, "the header cannot be read")

    async def _read(self, store: Store, job: Job, offset: int, length: int | None, have: bytes) -> bytes:
        """``have`` plus the range [offset, offset+length) of the object (to the end when None)."""
        if length is not None and length <= 0:
            return have
        parts = [have]
        async for chunk in store.open(job.key, offset, length):
            parts.append(chunk)
        data = b"".join(parts)
        metrics.ENRICH_BYTES_READ.labels(job.dataset).inc(len(data) - len(have))
        return data

    async def _finish(
        self,
        job: Job,
        state: str,
        meta: dict[str, Any],
        error: str | None,
        *,
        thumbnail: str | None = None,
        local: bool = False,
    ) -> None:
        """Buffer the item's result; ``flush`` records it (soon, with others)."""
        if error is not None:
            log.info("item enrichment failed", dataset=job.dataset, key=job.key, error=error)
        self._results.append(Result(job, state, meta, error, thumbnail, local))
        self._unflushed.add(job.item_id)
        if len(self._results) >= RESULT_BATCH:
            await self.flush()

    def _store(self, dataset: str) -> Store:
        return self.agent.stores[self.agent.settings.datasets[dataset].driver]

    def _local(self, dataset: str) -> bool:
        """A read-only dataset, or one whose storage refuses writes, keeps thumbnails locally."""
        return self.agent.settings.datasets[dataset].read_only or self.agent.storage_denies(dataset) is not None

    # -- thumbnails of items that went -------------------------------------------------------

    async def empty_trash(self) -> None:
        """Delete the thumbnails of removed or replaced items (queued by the ledger's SQL triggers)."""
        while batch := await self.queue.trash():
            gone = [t.id for t in batch if await self._delete_thumbnail(t)]
            if gone:
                await self.queue.trashed(gone)
            if len(gone) < len(batch):
                return  # storage trouble: the rest waits for the next round

    async def _delete_thumbnail(self, t: Trash) -> bool:
        """True once the thumbnail is gone (or there is nothing left to delete it from)."""
        from bucketsync.enrich import thumbs

        name = await self._dataset_name(t.dataset_id)
        settings = self.agent.settings
        if name is None or name not in settings.datasets:
            return True  # the dataset left the config: its driver is unknown
        if t.local:
            await asyncio.to_thread(_unlink, self.cache_dir(name) / t.key)
            return True
        if not t.key.startswith(thumbs.FOLDER):  # only ever our own thumbnails, whatever the row says
            log.error("refusing to delete a non-thumbnail key queued as a thumbnail", key=t.key)
            return True
        ds = settings.datasets[name]
        driver = settings.drivers[ds.driver]
        decision = gate.decide_delete(key=t.key, read_only=ds.read_only, allow_delete=driver.allow_delete)
        if decision.action != gate.DELETE_OBJECT:  # never for the hidden folder; the gate decides all the same
            log.warning("thumbnail kept: the gate refused its delete", key=t.key, reason=decision.reason)
            return True
        store = self._store(name)
        try:
            await store.delete(t.key)
        except StorageError as exc:
            log.warning("could not delete a thumbnail; retried later", key=t.key, error=str(exc))
            return False
        return True

    async def _dataset_name(self, dataset_id: int) -> str | None:
        for name in self.agent.settings.datasets:
            ledger = self.agent.ledger
            assert ledger is not None
            if await ledger.find_dataset(name) == dataset_id:
                return name
        return None


def _write_file(path: Path, data: bytes) -> None:
    """Write atomically: a reader sees the old thumbnail or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
