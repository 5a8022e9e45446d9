"""Models kept in memory by a long-running process (the dashboard): a cache sized by bytes, least recently used
out first, that never releases a model while anyone holds it.

A *hold* is taken by whoever uses a model's weights for a while — a dashboard script run, a background evaluation —
and given back when that use ends (``release``). Eviction only considers entries nobody holds, so a model in use by
one session is never dropped under it by another session loading a third model; the cache may then run over its
size until the holds end. Holds whose owner is a thread that has ended count as given back (a run that stopped
without reaching its clean-up cannot pin a model forever).

Size: each model's bytes are those of its unique parameter and buffer tensors (``model_bytes``); the cache keeps as
many models as fit in ``share`` × (memory available now + what the cache already holds), available memory from
psutil (``virtual_memory().available``), ``share`` from ``HETMOE_MODEL_CACHE_SHARE`` (default 0.5).
"""
from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

DEFAULT_SHARE = 0.5


def model_bytes(model) -> int:
    """Bytes of a torch module's unique parameter and buffer tensors (tied weights once), in its own dtype."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def cache_share() -> float:
    """Share of available memory the model cache may use: ``HETMOE_MODEL_CACHE_SHARE`` in (0, 1], default 0.5.
    Raises ValueError naming the variable for a value outside (0, 1]."""
    raw = os.environ.get("HETMOE_MODEL_CACHE_SHARE", "")
    if not raw:
        return DEFAULT_SHARE
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not 0.0 < v <= 1.0:
        raise ValueError(f"HETMOE_MODEL_CACHE_SHARE must be a number in (0, 1], got {raw!r}")
    return v


def available_bytes() -> int:
    """Memory available to new allocations now, bytes (psutil ``virtual_memory().available``)."""
    import psutil
    return int(psutil.virtual_memory().available)


@dataclass(eq=False)
class ModelHandle:
    """A loaded model plus the lock that every use of its weights takes (evaluations make the weights noisy
    inside ``analog()``; scores and routing statistics must read them clean).

    ``lm`` is a ``models.LoadedModel``; it is set to None only when the cache releases the entry, which never
    happens while a hold on it is open."""
    key: Hashable
    lm: object
    nbytes: int = 0
    load_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = 0.0
    holders: dict = field(default_factory=dict)        # owner -> number of holds; guarded by the cache's lock


def _owner_alive(owner) -> bool:
    thread = owner[0] if isinstance(owner, tuple) and owner and isinstance(owner[0], threading.Thread) else None
    return thread is None or thread.is_alive()


class ModelCache:
    """Loaded models by key, sized by memory, LRU among the entries that nobody holds.

    loader(key) -> (lm, nbytes) builds one model (called outside the cache's lock; concurrent requests for the same
    key wait for one load). max_bytes: a fixed size for the cache instead of ``share`` × available memory (tests).
    on_release(handle): called after an entry has left the cache and its model was dropped (``handle.lm`` None).
    """

    def __init__(self, loader: Callable, share: float | None = None, max_bytes: int | None = None,
                 on_release: Callable | None = None):
        self.loader, self.share, self.max_bytes = loader, share, max_bytes
        self._on_release = on_release
        self._lock = threading.RLock()
        self._entries: dict = {}
        self._loading: dict = {}

    # ---------------------------------------------------------------- holds
    def hold(self, key: Hashable, owner: Hashable) -> ModelHandle:
        """The model of ``key`` (loaded if needed), held by ``owner`` until ``release(owner)``.

        Errors of the loader (ValueError, OSError, ...) propagate; nothing is cached then."""
        while True:
            with self._lock:
                h = self._entries.get(key)
                if h is not None:
                    self._take(h, owner)
                    return h
                waiting = self._loading.get(key)
                if waiting is None:
                    self._loading[key] = threading.Event()
                    break
            waiting.wait()                      # another thread loads this key; then take its entry (or retry)
        try:
            t0 = time.perf_counter()
            lm, nbytes = self.loader(key)
            h = ModelHandle(key, lm, int(nbytes), load_s=time.perf_counter() - t0)
            with self._lock:
                self._entries[key] = h
                self._take(h, owner)
                evicted = self._evict(keep=key)
        finally:
            with self._lock:
                self._loading.pop(key).set()
        self._free(evicted)
        return h

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is loaded now (it may still leave before a later ``hold``)."""
        with self._lock:
            return key in self._entries

    def acquire(self, handle: ModelHandle, owner: Hashable) -> None:
        """One more hold on an entry already held by the caller (e.g. a background job started from a run).
        Raises ValueError when the entry has left the cache."""
        with self._lock:
            if self._entries.get(handle.key) is not handle:
                raise ValueError("this model has left the cache; load it again")
            self._take(handle, owner)

    def release(self, owner: Hashable) -> None:
        """Give back every hold of ``owner``; entries over the cache's size that nobody holds any more are freed."""
        with self._lock:
            for h in self._entries.values():
                h.holders.pop(owner, None)
            evicted = self._evict()
        self._free(evicted)

    def _take(self, h: ModelHandle, owner) -> None:
        h.holders[owner] = h.holders.get(owner, 0) + 1
        h.last_used = time.monotonic()

    # ---------------------------------------------------------------- size
    def limit(self) -> int:
        """Bytes the cache may hold now."""
        if self.max_bytes is not None:
            return int(self.max_bytes)
        share = self.share if self.share is not None else cache_share()
        return int(share * (available_bytes() + self.total_bytes()))

    def total_bytes(self) -> int:
        with self._lock:
            return sum(h.nbytes for h in self._entries.values())

    def _evict(self, keep=None) -> list:
        """Drop least recently used unheld entries (never ``keep``) until the total fits; caller holds the lock."""
        for h in self._entries.values():
            for o in [o for o in h.holders if not _owner_alive(o)]:
                del h.holders[o]
        limit, out = self.limit(), []
        while sum(h.nbytes for h in self._entries.values()) > limit:
            free = [h for k, h in self._entries.items() if not h.holders and k != keep]
            if not free:
                break                           # every other model is in use: run over the size until released
            victim = min(free, key=lambda h: h.last_used)
            out.append(self._entries.pop(victim.key))
        return out

    def entries(self) -> list[dict]:
        """What is loaded: [{"key", "bytes", "holds", "load_s", "idle_s"}], most recently used first."""
        now = time.monotonic()
        with self._lock:
            hs = sorted(self._entries.values(), key=lambda h: -h.last_used)
            return [{"key": h.key, "bytes": h.nbytes, "holds": sum(c for o, c in h.holders.items()
                                                                   if _owner_alive(o)),
                     "load_s": h.load_s, "idle_s": now - h.last_used} for h in hs]

    def clear(self) -> None:
        """Release every entry nobody holds (held ones stay)."""
        with self._lock:
            out = [self._entries.pop(k) for k, h in list(self._entries.items()) if not h.holders]
        self._free(out)

    def _free(self, handles: list) -> None:
        for h in handles:
            _drop(h)
            if self._on_release is not None:
                self._on_release(h)


def _drop(handle: ModelHandle) -> None:
    """Release: drop the model and give its memory back (CUDA's cache included)."""
    handle.lm = None
    gc.collect()
    try:
        import sys
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except RuntimeError:       # a broken CUDA set-up must not stop a release
        pass
