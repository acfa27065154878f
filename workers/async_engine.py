"""Streaming on top of ``Engine``: a background thread steps the engine while asyncio callers
await their own request's outputs.

Threading contract: the engine is only touched under ``self._lock``; the step thread holds it
for one ``step()`` at a time, so ``add``/``abort`` wait at most one step. Outputs cross to the
caller's event loop with ``call_soon_threadsafe``. A caller that stops iterating (client
disconnect, cancellation) aborts its request, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from .engine import Engine
from .request import Chunks, Request, RequestOutput, SamplingParams, Status

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._loop, name="pdserve-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.engine.has_work
                try:
                    outs = self.engine.step() if busy else []
                except Exception as e:  # noqa: BLE001 - a bad step must not kill the instance
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(e)
                    continue
                # Delivered under the lock, so anything a control call delivers later (an
                # end-of-stream for a migrated request) is queued after these outputs.
                for o in outs:
                    self._deliver(o.request_id, o)
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
            else:
                # Let the replica's event loop run between steps: a GIL-bound step loop
                # starved it, and Serve's 0.1 s queue-length probes to a busy replica timed
                # out (targeted calls — aborts, migrations — then waited for seconds).
                time.sleep(0.0005)

    def _fail_all(self, error: BaseException) -> None:
        """Abort every streamed request and hand it ``error`` (called with the lock held)."""
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._deliver(rid, EngineDead(f"engine step failed: {error}"))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        s = self._streams.get(request_id)
        if s is not None:
            loop, q = s
            loop.call_soon_threadsafe(q.put_nowait, item)

    def call(self, fn, *args):
        """Run ``fn(engine, *args)`` under the engine lock (for control calls)."""
        with self._lock:
            return fn(self.engine, *args)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
        chunks: Chunks | None = None,
    ) -> AsyncIterator[RequestOutput]:
        async for o in self.stream(lambda e: e.add_request(prompt_ids, params, request_id,
                                                           chunks)):
            yield o

    async def stream(self, add: Callable[[Engine], Request]) -> AsyncIterator[RequestOutput]:
        """Add a request with ``add(engine)`` (under the lock) and stream its outputs."""
        rid = self.adopt(add, asyncio.get_running_loop())
        async for o in self.consume(rid):
            yield o

    def adopt(self, add: Callable[[Engine], Request], loop: asyncio.AbstractEventLoop) -> str:
        """Add a request and start buffering its outputs for ``consume`` (on ``loop``), which
        may come later: a migrated request decodes on before its new stream is opened."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            req = add(self.engine)
            self._streams[req.request_id] = (loop, q)
        self._wake.set()
        return req.request_id

    def adopted(self, request_id: str) -> bool:
        return request_id in self._streams

    async def consume(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The outputs of an adopted request; stopping early aborts it."""
        s = self._streams.get(request_id)
        if s is None:
            raise KeyError(f"no stream for {request_id!r}")
        q = s[1]
        done = False
        try:
            while not done:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not done:
                self.abort(request_id)

    def end(self, request_id: str, reason: str) -> None:
        """Finish a running request now and close its stream with ``reason`` (e.g. "migrate"
        when draining: the router continues it elsewhere)."""
        with self._lock:
            req = self.engine.requests.get(request_id)
            if req is None:
                return
            self.engine.finish(request_id, reason)
            self._deliver(request_id, RequestOutput(
                request_id, [], [], len(req.prompt_ids), len(req.output_ids), True, reason))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)

    def notify(self, output: RequestOutput) -> None:
        """Put a control item on a request's stream, in order with its outputs."""
        with self._lock:
            self._deliver(output.request_id, output)

    def discard(self, request_id: str) -> None:
        """Abort an adopted request nobody consumes, and forget its stream."""
        with self._lock:
            self.engine.abort(request_id)
            self._streams.pop(request_id, None)

    # ---- live migration: the source side's pause / resume / hand-over ----------------------
    def reattach(self, req: Request) -> None:
        """A detached request decodes on here; if its stream was closed meanwhile (client
        gone), it is freed instead."""
        with self._lock:
            self.engine.reattach(req)
            if req.request_id not in self._streams:
                self.engine.abort(req.request_id)
        self._wake.set()

    def close_detached(self, req: Request, reason: str) -> None:
        """A detached request now lives elsewhere: free its blocks and end its stream."""
        with self._lock:
            self.engine.blocks.free(req)
            req.status, req.finish_reason = Status.FINISHED, reason
            self._deliver(req.request_id, RequestOutput(
                req.request_id, [], [], len(req.prompt_ids), len(req.output_ids), True, reason))

    def finish(self, request_id: str, reason: str) -> None:
        with self._lock:
            self.engine.finish(request_id, reason)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
