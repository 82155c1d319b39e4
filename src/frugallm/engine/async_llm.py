"""``AsyncLLM``: an :class:`LLMEngine` stepping in a background thread, awaited per request.

One thread owns the engine (nothing else touches it). Callers hand it requests and aborts through a
thread-safe inbox; each request gets an ``asyncio.Queue`` on the caller's event loop that the engine
thread feeds with :class:`StepOutput` objects. Leaving the ``async for`` early (a client disconnect
cancels the task) aborts the request, which frees its KV blocks at the start of the next step.

Queued work is capped: at most ``max_queue`` sequences (a prompt's ``n`` choices count ``n``) are admitted,
waiting or running, at once. A request that would pass the cap raises :class:`QueueFullError` (HTTP 429 with
``Retry-After``) before anything is tokenized or queued; one larger than the cap by itself can never run and is
an :class:`InvalidRequestError` (400).

Per-token costs are kept off the engine's path: a step's outputs reach each event loop in one
``call_soon_threadsafe`` (one wake-up per step, not per token), and a consumer that fell behind gets
the tokens queued for a choice merged into one output (one SSE event) instead of one per token.

>>> async for out in async_llm.generate("Hello", SamplingParams(max_tokens=8)):
...     print(out.text, end="")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from frugallm.engine.inputs import EngineRequest, InputProcessor
from frugallm.engine.llm_engine import LLMEngine, StepOutput
from frugallm.engine.spec_solo import solo_for
from frugallm.errors import InvalidRequestError
from frugallm.sampling import SamplingParams

log = logging.getLogger("frugallm.serve")


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


# Sequences admitted (waiting or running) at most, by default. vLLM queues without bound (a 20,000-prompt request
# is accepted and runs for minutes); TGI refuses past 128 concurrent requests with 429. Counting sequences, 512
# is 32 full batches at the default max_num_seqs (16) and fits one request of the largest n (128) x 4 prompts.
DEFAULT_MAX_QUEUE = 512


class QueueFullError(RuntimeError):
    """More work is queued than ``max_queue`` allows; retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index_offset: int  # choice index of this prompt's first choice within the caller's request
    retire: Callable[[], None] | None = None  # engine thread: called once when the engine is done with it


# Messages from callers' threads to the engine thread.
@dataclass(frozen=True)
class AddRequest:
    request: EngineRequest  # validated by the caller (InputProcessor): the engine thread trusts it
    sink: _Sink


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


class AsyncLLM:
    """Serve many concurrent requests from one engine. Start with :meth:`start`, stop with :meth:`shutdown`."""

    def __init__(self, engine: LLMEngine | None = None, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_queue < 1:
            raise InvalidRequestError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine  # type: ignore[assignment]  # None only inside launch(), until built
        self.max_queue = max_queue
        self._admitted = 0  # sequences of requests between admission and their last output (or abort)
        self._admit_lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="frugallm-engine", daemon=True)
        self.error: BaseException | None = None
        self.solo = solo_for(engine)  # speculative decoding while the server is nearly idle (LLM spec=)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> AsyncLLM:
        self._thread.start()
        return self

    @classmethod
    def launch(cls, build: Callable[[], LLMEngine], max_queue: int = DEFAULT_MAX_QUEUE) -> AsyncLLM:
        """Build the engine (model loading included) *in* the engine thread, then serve from it.

        Why: torch's OpenMP runtime keeps a pool of worker threads per thread that runs parallel ops. A
        model loaded in the main thread and served from another leaves two pools, and once libgomp
        manages more threads than there are cores it stops spin-waiting between parallel regions: every
        parallel op then pays a wake-up (~50 us; a 16-sequence decode step ran 1.35x slower). Errors from
        ``build`` are raised here.
        """
        self = cls(max_queue=max_queue)
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.engine = build()
                self.solo = solo_for(self.engine)
            except BaseException as e:
                failure.append(e)
                return
            finally:
                ready.set()
            self._loop()

        self._thread = threading.Thread(target=run, name="frugallm-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    # -- requests -----------------------------------------------------------------------------------
    @property
    def inputs(self) -> InputProcessor:
        """The engine's request validator (thread-safe): callers build :class:`EngineRequest` s with it."""
        return self.engine.inputs

    @property
    def num_admitted(self) -> int:
        """Sequences admitted and not finished yet (what ``max_queue`` caps)."""
        return self._admitted

    def check_capacity(self, num_seqs: int) -> None:
        """Raise unless ``num_seqs`` more sequences fit under ``max_queue`` now: :class:`InvalidRequestError` if
        they never could, :class:`QueueFullError` if other work has to finish first. Cheap: call it before
        tokenizing a request."""
        if num_seqs > self.max_queue:
            raise InvalidRequestError(
                f"this request asks for {num_seqs} sequences (prompts x n); this server queues at most "
                f"{self.max_queue} (serve --max-queue); split it into smaller requests")
        if self._admitted + num_seqs > self.max_queue:
            raise QueueFullError(
                f"server busy: {self._admitted} sequences queued or running, {num_seqs} more would pass the cap of "
                f"{self.max_queue} (serve --max-queue); retry shortly")

    def _admit(self, num_seqs: int) -> Callable[[], None]:
        """Count ``num_seqs`` in (or raise); returns the function that counts them out, once."""
        with self._admit_lock:
            self.check_capacity(num_seqs)
            self._admitted += num_seqs
        released = False

        def release() -> None:
            nonlocal released
            with self._admit_lock:
                if not released:
                    released = True
                    self._admitted -= num_seqs

        return release

    async def generate(
        self, prompt: str | Seq[int], params: SamplingParams, n: int = 1, request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one prompt (``n`` choices) as the engine produces them."""
        async for out in self.generate_many([self.inputs.process(prompt, params, n=n)], request_id):
            yield out

    def generate_many(
        self, requests: Seq[EngineRequest], request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        """Several validated prompts as one request: choice ``index`` is ``prompt_index * n + i`` (each
        request's ``n`` must be the same). Their own ``request_id`` s are replaced by ``request_id``-based ones.

        Admission happens here, not at the first iteration: :class:`QueueFullError` (or, for a request larger
        than ``max_queue``, :class:`InvalidRequestError`) is raised by this call, before anything is queued, so
        a server can still answer 429. The sequences are counted out when the stream ends, fails, is closed,
        or is dropped without being read."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        release = self._admit(sum(r.n for r in requests))
        return _Admitted(self._generate_admitted(requests, request_id, release), release)

    async def _generate_admitted(
        self, requests: Seq[EngineRequest], request_id: str | None, release: Callable[[], None]
    ) -> AsyncIterator[StepOutput]:
        base = request_id or f"async-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rids = [base if len(requests) == 1 else f"{base}-{i}" for i in range(len(requests))]
        # The admission is released when the engine is done with every prompt (finished, aborted, refused), not
        # only when this stream is closed: a client that hangs up between two reads leaves the stream suspended
        # until the garbage collector finds it, and its sequences would hold the queue cap meanwhile.
        left = [len(requests)]

        def retire() -> None:  # engine thread only
            left[0] -= 1
            if left[0] == 0:
                release()

        offset = 0
        for rid, req in zip(rids, requests, strict=True):
            sink = _Sink(loop, q, offset, retire)
            self._inbox.put(AddRequest(dataclasses.replace(req, request_id=rid), sink))
            offset += req.n
        self._wake.set()
        remaining = offset
        try:
            while remaining:
                for item in _coalesce(await q.get(), q):
                    if isinstance(item, BaseException):
                        raise item
                    if item.finished:
                        remaining -= 1
                    yield item
        finally:
            if remaining:  # cancelled (client gone) or failed: free the blocks
                for rid in rids:
                    self._inbox.put(AbortRequest(rid))
                self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))
        self._wake.set()

    # -- the engine thread --------------------------------------------------------------------------
    def _retire(self, rid: str) -> _Sink | None:
        """The engine is done with request ``rid``: forget its sink and count its sequences out."""
        sink = self._sinks.pop(rid, None)
        if sink is not None and sink.retire is not None:
            sink.retire()
        return sink

    def _deliver(self, sink: _Sink, item: StepOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: the caller's loop is closed, nobody listens
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)

    def _deliver_step(self, outputs: list[StepOutput]) -> None:
        """Hand a step's outputs to their queues: one wake-up per event loop, not one per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                out.index += sink.index_offset
                by_loop.setdefault(sink.loop, []).append((sink.queue, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, AddRequest):
                try:  # only a request id already in use can fail here
                    if self.solo is not None and self.solo.accepts(msg.request):
                        self.solo.start(msg.request)
                        rid = msg.request.request_id
                    else:
                        rid = self.engine.add_request(msg.request)
                    self._sinks[rid] = msg.sink
                except InvalidRequestError as e:
                    self._deliver(msg.sink, e)
                    if msg.sink.retire is not None:
                        msg.sink.retire()
            elif (self.solo is not None and self.solo.abort(msg.request_id)) or self.engine.abort(msg.request_id):
                self._retire(msg.request_id)

    def _solo_round(self) -> None:
        """One round of the request decoded speculatively beside the engine (``engine/spec_solo.py``)."""
        try:
            out = self.solo.step()
        except Exception as e:  # as for an engine step: fail that request, keep serving
            rid = self.solo.fail()
            log.exception("speculative round failed; aborting request %s", rid)
            sink = self._retire(rid) if rid is not None else None
            if sink is not None:
                self._deliver(sink, e)
            return
        self._deliver_step([out])
        if out.finished:
            self._retire(out.request_id)

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                solo = self.solo is not None and self.solo.running
                if solo:
                    self._solo_round()
                if not self.engine.has_unfinished_requests():
                    if not solo:
                        self._wake.wait(0.5)
                        self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a bug or out-of-memory: fail the running requests, keep serving
                    log.exception("engine step failed; aborting %d requests", len(self._sinks))
                    if self.solo is not None:
                        self.solo.fail()
                    for rid, sink in list(self._sinks.items()):
                        self.engine.abort(rid)
                        self._deliver(sink, e)
                        self._retire(rid)
                    continue
                self._deliver_step(outputs)
                for rid in {out.request_id for out in outputs} - self.engine.requests.keys():
                    self._retire(rid)  # finished
        except BaseException as e:  # pragma: no cover - fatal
            self.error = e
            log.exception("engine thread died")
            for sink in self._sinks.values():
                self._deliver(sink, EngineDeadError(f"engine thread died: {e}"))
            raise


class _Admitted:
    """An output stream holding admitted sequences; ``release`` runs once, however the stream ends."""

    def __init__(self, agen: AsyncIterator[StepOutput], release: Callable[[], None]) -> None:
        self._agen, self._release = agen, release

    def __aiter__(self) -> _Admitted:
        return self

    async def __anext__(self) -> StepOutput:
        try:
            return await self._agen.__anext__()
        except BaseException:  # finished (StopAsyncIteration), failed or cancelled
            self._release()
            raise

    async def aclose(self) -> None:
        try:
            await self._agen.aclose()  # type: ignore[attr-defined]
        finally:
            self._release()

    def __del__(self) -> None:  # dropped unread (a response never started); a started stream aborts itself
        self._release()


def _put_all(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _coalesce(first: StepOutput | BaseException, q: asyncio.Queue) -> list[StepOutput | BaseException]:
    """``first`` plus whatever is already queued, with the outputs of each choice merged into one.

    Order within a choice is kept; nothing is merged across an exception (it is raised in place).
    """
    items = [first]
    at: dict[int, int] = {} if isinstance(first, BaseException) else {first.index: 0}
    while not q.empty():
        item = q.get_nowait()
        if isinstance(item, BaseException):
            at.clear()
            items.append(item)
        elif (i := at.get(item.index)) is not None:
            items[i] = items[i].merge(item)
        else:
            at[item.index] = len(items)
            items.append(item)
    return items
