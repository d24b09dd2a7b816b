"""Continuous batching: many requests share every forward pass of the model.

A decode step's time goes to reading the weights and to per-call overhead, not to
arithmetic: 8 rows take little longer than 1 (``bench_server.py`` measures it), so
batching requests multiplies the tokens per pass. *Static* batching starts a batch
together and waits for its longest request (and a request arriving meanwhile
waits too); Orca's *iteration-level scheduling* (Yu et al., OSDI 2022) decides
again at every step:

1. waiting requests join as long as there is a free slot: each prompt runs through
   the model alone (*prefill*) into its own slot of the cache, and its first token
   comes from that pass;
2. every other running request gets one token from ONE batched forward pass
   (*decode*), each row at its own position, with its own sampling settings and its
   own ``torch.Generator``, so a seeded request gives exactly its solo text;
3. a request that is done (``max_new_tokens``, a stop id, cancelled by its client,
   e.g. on a stop string) leaves at once and frees its slot for the next step.

``SlotKVCache`` holds the slots: tensors (n_layer, n_slots, n_kv_head, max_len,
head_dim) and a length per slot. Running requests live in slots ``0..B-1``: when
one leaves, the last one moves into its slot, so the decode step reads a view of
the first B slots rather than gathering them. Its (B, L) attention mask hides each
row's unused positions, and ``position_ids`` (B, 1) place each new token after its
own row. A request whose sequence outgrows the context recomputes its last
``context_length`` tokens at each step, exactly as ``iter_tokens`` does.

**Paged attention** (vLLM, Kwon et al., SOSP 2023), not built here: a slot reserves
``max_len`` positions for every request, however short, so most of the cache sits
reserved and unused and the number of slots, not memory, caps the batch. vLLM cuts
the cache into fixed-size *blocks* (e.g. 16 positions) from one pool; each sequence
has a *block table* mapping its logical blocks to physical ones, allocated as it
grows and freed when it ends, like an operating system's pages. Waste drops to
under one block per sequence, sequences sharing a prefix (a system prompt, parallel
samples) share its blocks (copy-on-write), and the attention kernel gathers each
row's keys through its block table.

``SchedulerThread`` runs the loop in a background thread for the HTTP server:
requests are submitted from any thread and read back as a ``TokenStream``.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field

import torch
from torch import nn

from shared.generation.cache import LayerCache
from shared.generation.sampling import sample_next_token
from shared.generation.text import Completion, _text_pieces


@dataclass(eq=False)
class Request:
    """One generation request: its prompt ids, settings, callbacks and results."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: the global RNG, as generate(generator=None)
    stop_ids: Sequence[int] = ()  # e.g. <|endoftext|> or <|end|>, sampled and kept
    on_token: Callable[[int], None] | None = None  # called with each new token id
    on_finish: Callable[[Request], None] | None = None  # called once, at the end
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: BaseException | None = None
    cancelled: bool = False  # set from any thread: leaves before the next step

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (it leaves at the next step)."""
        self.cancelled = True


# ------------------------------------------------------------------ the slot cache


class SlotKVCache:
    """Keys and values of ``n_slots`` sequences, each in its own slot.

    Tensors (n_layer, n_slots, n_kv_head, max_len, head_dim), allocated on the first
    write with the keys' shape, dtype and device; ``lengths[s]`` counts the
    positions slot ``s`` holds. ``rows(...)`` is what the model gets as ``kv_cache``.
    """

    def __init__(self, n_layer: int, n_slots: int, max_len: int) -> None:
        self.n_layer, self.n_slots, self.max_len = n_layer, n_slots, max_len
        self.lengths = [0] * n_slots
        self.k: torch.Tensor | None = None  # allocated by the first write
        self.v: torch.Tensor | None = None

    def rows(self, slots: Sequence[int]) -> SlotRows:
        """The cache of these slots for one forward pass."""
        return SlotRows(self, list(slots))

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into slot ``dst`` (compaction when a request leaves)."""
        n = self.lengths[src]
        if self.k is not None and n:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def _allocate(self, k: torch.Tensor) -> None:
        if self.k is None:
            _, h, _, d = k.shape
            shape = (self.n_layer, self.n_slots, h, self.max_len, d)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros_like(self.k)


class SlotRows:
    """Some slots of a ``SlotKVCache`` as one batch: the ``kv_cache`` protocol of
    ``GPT.forward`` (``layer(i).update(k, v)``, then ``advance(t)``).

    A prefill writes T positions of one row; a decode step writes one position per
    row, each at its own length. Keys and values come back for positions
    ``0..max(lengths)`` of every row: the caller's attention mask hides the
    positions a shorter row does not have.
    """

    def __init__(self, cache: SlotKVCache, slots: list[int]) -> None:
        self.cache, self.slots = cache, slots
        self.starts = [cache.lengths[s] for s in slots]  # before this forward
        self.contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self.index_lists, self.index = (slots, self.starts), None

    @property
    def length(self) -> int:  # KVCache's: where a prefill's positions start
        return max(self.starts)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, n_kv_head, T, head_dim); return (B, n_kv_head, L,
        head_dim) keys and values, L = the longest row's length after them."""
        cache, t = self.cache, k.size(2)
        cache._allocate(k)
        end = max(self.starts) + t
        if end > cache.max_len:
            raise ValueError(f"a slot holds {cache.max_len} positions; {end} needed")
        if self.index is None:  # made once per forward pass, used by every layer
            self.index = [torch.tensor(x, device=k.device) for x in self.index_lists]
        slots, at = self.index
        if t == 1:  # decode: row i writes at its own position starts[i]
            cache.k[layer, slots, :, at] = k[:, :, 0]
            cache.v[layer, slots, :, at] = v[:, :, 0]
        else:  # prefill: the T positions of one row
            cache.k[layer, slots, :, end - t : end] = k
            cache.v[layer, slots, :, end - t : end] = v
        if self.contiguous:  # a view: no copy of the cache
            rows = slice(self.slots[0], self.slots[0] + len(self.slots))
            return cache.k[layer, rows, :, :end], cache.v[layer, rows, :, :end]
        return cache.k[layer, slots, :, :end], cache.v[layer, slots, :, :end]

    def advance(self, t: int) -> None:
        """Count ``t`` more positions in every row (the model calls it last)."""
        for s in self.slots:
            self.cache.lengths[s] += t


# ------------------------------------------------------------------ the scheduler


@dataclass(eq=False)
class _Running:
    """A request in a slot: all its ids so far and its random generator."""

    request: Request
    ids: list[int]
    generator: torch.Generator | None
    fresh: bool = True  # admitted this step: its token came from the prefill


class Scheduler:
    """Iteration-level scheduling of requests over one model (Orca).

    ``add`` queues a request; each ``step`` admits waiting requests into free slots,
    gives every running request one token and retires the finished ones; ``run``
    steps until all are done. Single-threaded: ``SchedulerThread`` serves threads.
    """

    def __init__(self, model: nn.Module, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.context = model.config.context_length
        self.cache = SlotKVCache(model.config.n_layer, max_batch, self.context)
        self.waiting: deque[Request] = deque()
        self.running: list[_Running] = []  # running[i] lives in slot i
        self.device = next(model.parameters()).device
        self.batch_sizes: list[int] = []  # rows of each decode pass (statistics)

    def add(self, request: Request) -> Request:
        """Queue ``request``; it joins the batch at a step with a free slot."""
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token id")
        self.waiting.append(request)
        return request

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self, requests: Sequence[Request] = ()) -> list[Request]:
        """Add ``requests`` and step until every request is done; returns them."""
        for request in requests:
            self.add(request)
        while self.has_work:
            self.step()
        return list(requests)

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: admit, prefill, one batched decode pass, retire."""
        was_training = self.model.training
        if was_training:  # eval() walks every module: not at every step
            self.model.eval()
        try:
            for row in self.running:
                row.fresh = False
                if row.request.cancelled:
                    self._finish(row, "cancelled")
            self._retire()  # their slots are free for the requests that join now
            self._admit()
            self._decode([r for r in self.running if not r.fresh])
        finally:
            if was_training:
                self.model.train()
            self._retire()

    def fail_all(self, error: BaseException) -> None:
        """End every request, running and waiting, with ``error``."""
        for row in self.running:
            self._finish(row, "error", error)
        self._retire()
        while self.waiting:
            self._finish(_Running(self.waiting.popleft(), [], None), "error", error)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            seed, generator = request.seed, None  # a CPU generator, as complete()'s
            if seed is not None:
                generator = torch.Generator().manual_seed(seed)
            row = _Running(request, list(request.prompt), generator)
            self.running.append(row)  # its slot: len(running) - 1
            if request.cancelled or request.max_new_tokens <= 0:
                self._finish(row, "cancelled" if request.cancelled else "length")
                continue
            try:
                self._emit([row], self._prefill(row, len(self.running) - 1))
            except Exception as err:  # this prompt fails alone; the others go on
                self._finish(row, "error", err)

    def _prefill(self, row: _Running, slot: int) -> torch.Tensor:
        """Logits (1, V) after the prompt, written into ``slot`` of the cache."""
        if len(row.ids) >= self.context:  # no room to decode: the window, as solo
            return self._window([row])
        idx = torch.tensor([row.ids], device=self.device)
        return self.model(idx, kv_cache=self.cache.rows([slot]))[:, -1]

    def _window(self, rows: list[_Running]) -> torch.Tensor:
        """Logits (B, V) from each row's last ``context`` ids, no cache."""
        idx = torch.tensor([r.ids[-self.context :] for r in rows], device=self.device)
        return self.model(idx)[:, -1]

    def _decode(self, rows: list[_Running]) -> None:
        """One token for each of ``rows``: cached rows in one batched pass."""
        slot = {id(r): i for i, r in enumerate(self.running)}
        # a sequence of n ids feeds id n-1 at position n-1: cached while n <= context
        cached = [r for r in rows if len(r.ids) <= self.context]
        windowed = [r for r in rows if len(r.ids) > self.context]
        try:
            if cached:
                self._emit(cached, self._decode_cached(cached, slot))
            if windowed:
                self._emit(windowed, self._window(windowed))
        except Exception as err:  # the batch failed: every request in it ends
            for row in rows:
                self._finish(row, "error", err)

    def _decode_cached(self, rows: list[_Running], slot: dict) -> torch.Tensor:
        cache = self.cache.rows([slot[id(r)] for r in rows])
        self.batch_sizes.append(len(rows))
        positions = torch.tensor(cache.starts, device=self.device)[:, None]  # (B, 1)
        mask = None  # rows of one length (one row): every key is theirs
        if len(set(cache.starts)) > 1:  # (B, L): each row sees its own positions
            seen = torch.arange(max(cache.starts) + 1, device=self.device)
            mask = seen[None, :] <= positions
        idx = torch.tensor([[r.ids[-1]] for r in rows], device=self.device)
        logits = self.model(
            idx, attention_mask=mask, position_ids=positions, kv_cache=cache
        )
        return logits[:, -1]

    def _emit(self, rows: list[_Running], logits: torch.Tensor) -> None:
        """Sample each row's token with its own settings and generator."""
        for i, row in enumerate(rows):
            r = row.request
            settings = (r.temperature, r.top_k, r.top_p, row.generator)
            token = int(sample_next_token(logits[i : i + 1], *settings))
            row.ids.append(token)
            r.tokens.append(token)
            try:
                if r.on_token is not None:
                    r.on_token(token)
            except Exception as err:  # a failing callback ends its request only
                self._finish(row, "error", err)
                continue
            if token in r.stop_ids:
                self._finish(row, "stop")
            elif len(r.tokens) >= r.max_new_tokens:
                self._finish(row, "length")

    def _finish(self, row: _Running, reason: str, error: Exception | None = None):
        request = row.request
        if not request.done:
            request.finish_reason, request.error = reason, error
            try:
                if request.on_finish is not None:
                    request.on_finish(request)
            except Exception:  # the scheduler goes on for the others
                traceback.print_exc()

    def _retire(self) -> None:
        """Free the slots of finished requests; the last running fills each gap."""
        for i in reversed(range(len(self.running))):
            if self.running[i].request.done:
                last = len(self.running) - 1
                if i != last:
                    self.cache.move(last, i)
                    self.running[i] = self.running[last]
                self.cache.lengths[last] = 0
                self.running.pop()


# ------------------------------------------------------------------ serving threads

_END = object()  # what a TokenStream's queue holds after the last token


class TokenStream:
    """The tokens of a submitted request, as an iterator another thread reads.

    Iterating blocks until the scheduler sends the next token; it ends with the
    request, or raises the error that ended it. ``close`` cancels the request.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        request.on_token = self._queue.put
        request.on_finish = lambda _: self._queue.put(_END)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # a later next() ends too
            if self.request.error is not None:
                raise self.request.error
            raise StopIteration
        return item

    def close(self) -> None:
        self.request.cancel()


class SchedulerThread:
    """A ``Scheduler`` stepping in a background thread while it has work.

    ``submit`` may be called from any thread (an HTTP handler's); the model is only
    ever run by this one thread, one batched pass at a time.
    """

    def __init__(self, model: nn.Module, max_batch: int = 8) -> None:
        self.scheduler = Scheduler(model, max_batch)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="scheduler")
        self._thread.daemon = True  # an unclosed server never keeps Python alive
        self._thread.start()

    def submit(self, request: Request) -> TokenStream:
        """Queue ``request``; read its tokens from the returned stream."""
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token id")
        stream = TokenStream(request)
        self._inbox.put(request)
        return stream

    def close(self) -> None:
        """Stop the thread; requests still running end with an error."""
        self._inbox.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            try:  # wait for work only when there is none
                item = self._inbox.get(block=not scheduler.has_work)
                while True:
                    if item is None:
                        scheduler.fail_all(RuntimeError("the server is closing"))
                        return
                    scheduler.add(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            try:
                scheduler.step()
            except Exception as err:  # a bug: fail its requests, keep serving
                traceback.print_exc()
                scheduler.fail_all(err)


def stream_text(
    thread: SchedulerThread,
    tokenizer,
    request: Request,
    stops: Sequence[str] = (),
) -> Generator[str, None, Completion]:
    """``stream_completion`` through the scheduler: the request's text in pieces,
    ending at its first stop id (not shown) or a stop string; returns the
    ``Completion``. The request is submitted at the first ``next``; closing the
    generator (or a stop string) cancels it, which frees its slot."""
    eos_id = request.stop_ids[0] if request.stop_ids else None
    tokens = thread.submit(request)
    with closing(tokens):
        text = _text_pieces(tokenizer, tokens, eos_id, stops, len(request.prompt))
        return (yield from text)
