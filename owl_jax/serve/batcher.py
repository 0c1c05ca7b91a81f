"""Decoding requests that arrive together in one batch: a thread that owns the model's `Generator`.

Requests queue up; the thread takes the oldest, waits `wait_s` for more that can share its batch (the
same sampling settings: greedy requests always can), up to `max_batch`, and decodes them together
with the KV cache, streaming each request's text as it comes. Every batch has `max_batch` rows and
room for `max_new_tokens` (each request stops at its own limit), so the compiled programs depend only
on the prompt-length and image buckets: once those are warm, nothing compiles again.

Under greedy decoding a request's answer does not depend on what it is batched with (left padding,
per-sample positions and limits): on CPU it is the answer it gets alone, bit for bit; elsewhere, up
to float near-ties, as other batch shapes may sum in another order.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from typing import Callable

import numpy as np

from owl_jax.inference.api import Owl
from owl_jax.inference.engine import bucket_count, make_batch, trim
from owl_jax.inference.sampling import Sampling

CHUNK = 4  # tokens decoded between looks at the rows: how often text streams out


class Closed(RuntimeError):
    """The batcher is shutting down and takes no more requests."""


@dataclasses.dataclass
class Request:
    """One prompt to answer. `on_text(piece)` gets the answer's new text as it is decoded, then
    `on_done(text, finish_reason, tokens)` (finish_reason "stop": EOS, "length": max_new_tokens;
    tokens generated, EOS included) or `on_error(exc)`, all called from the batcher's thread. Setting
    `cancelled` (the client went away) stops its callbacks, and its row once it is the batch's last."""

    ids: np.ndarray  # prompt ids with placeholders
    images: list[np.ndarray]
    clips: list[np.ndarray]
    max_new_tokens: int
    sampling: Sampling  # its max_new_tokens is ignored: the batch's is the batcher's
    on_text: Callable[[str], None]
    on_done: Callable[[str, str, int], None]
    on_error: Callable[[BaseException], None]
    seeded: bool = True  # False: sampling.seed is no choice of the client's; the batch draws one
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def group(self) -> tuple:
        """Requests with the same group share a batch: one set of sampling scalars a batch."""
        s = self.sampling
        return ("greedy",) if s.greedy else ("sample", s.temperature, s.top_k, s.top_p, s.seed if self.seeded else None)


def _call(request: Request, callback: Callable, *args) -> None:
    """A request's callback; one that raises fails that request alone, never the batch or the thread."""
    if request.cancelled:
        return
    try:
        callback(*args)
    except Exception:  # noqa: BLE001 - a client's callback, logged and dropped
        logging.exception("a request's %s callback failed", getattr(callback, "__name__", "callback"))
        request.cancelled = True


class Batcher:
    """`submit` requests from any thread; `close` stops taking them, answers the queued ones and ends
    the thread."""

    def __init__(self, owl: Owl, max_batch: int = 8, max_new_tokens: int = 256, wait_s: float = 0.01):
        self.owl, self.max_new_tokens, self.wait_s = owl, max_new_tokens, wait_s
        self.max_batch = bucket_count(max_batch)  # every batch padded to it: one compilation per bucket
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches = 0  # batches decoded, and requests in them: what the load test reports
        self.batched_requests = 0
        self._thread = threading.Thread(target=self._run, name="owl-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        if not 1 <= request.max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens {request.max_new_tokens}: expected 1 to {self.max_new_tokens}")
        with self._cv:
            if self._closed or not self._thread.is_alive():
                raise Closed("the server is shutting down")
            self._queue.append(request)
            self._cv.notify()

    def close(self) -> None:
        """Takes no more requests; answers the queued ones, then stops."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    # ------------------------------------------------------------------------------ the thread
    def _next_batch(self) -> list[Request] | None:
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            first = self._queue.popleft()
            batch = [first]
            deadline = first.arrived + self.wait_s
            while len(batch) < self.max_batch:
                same = next((r for r in self._queue if r.group == first.group), None)
                if same is not None:
                    self._queue.remove(same)
                    batch.append(same)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cv.wait(left)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [r for r in batch if not r.cancelled]
            if not live:
                continue
            try:
                self._decode(live)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests; the server goes on
                logging.exception("a batch of %d requests failed", len(live))
                for r in live:
                    _call(r, r.on_error, e)

    def _decode(self, requests: list[Request]) -> None:
        owl = self.owl
        batch = make_batch([r.ids for r in requests], [x for r in requests for x in r.images],
                           [len(r.images) for r in requests], owl.cfg, pad_id=owl.generator.pad_id,
                           min_batch=self.max_batch, clips=[x for r in requests for x in r.clips],
                           num_videos=[len(r.clips) for r in requests])
        first = requests[0]
        seed = first.sampling.seed if first.seeded else secrets.randbelow(2**31)
        sampling = dataclasses.replace(first.sampling, max_new_tokens=self.max_new_tokens, seed=seed)
        self.batches += 1
        self.batched_requests += len(requests)
        printed = [""] * len(requests)
        finished = [False] * len(requests)
        for out in owl.generator.stream(batch, sampling, chunk=CHUNK, limits=[r.max_new_tokens for r in requests]):
            for i, r in enumerate(requests):
                if finished[i]:
                    continue
                length = int(out["length"][i])
                ids = trim(out["tokens"][i], length, owl.eos_id)
                done = bool(out["done"][i])
                stable = owl.stable_text(ids, done)
                if stable.startswith(printed[i]) and len(stable) > len(printed[i]):
                    _call(r, r.on_text, stable[len(printed[i]):])
                    printed[i] = stable
                if done:
                    finished[i] = True
                    stopped = length > len(ids)  # the EOS was its last token
                    _call(r, r.on_done, owl.stable_text(ids, True), "stop" if stopped else "length", length)
            if all(f or r.cancelled for f, r in zip(finished, requests)):
                break  # nobody waits for the rest: the rows still decoding belong to clients gone
        for f, r in zip(finished, requests):
            if not f:  # the stream ended before this row: say so rather than leave it waiting
                _call(r, r.on_error, RuntimeError("decoding stopped before the answer ended"))
