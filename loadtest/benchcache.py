"""In-process near-cache microbenchmarks: lookup cost at 1k vs 1M entries, bytes per entry.

`python -m loadtest bench-cache [--sizes 1000,1000000] [--lookups 200000] [--memory 100000]`

The cache under test comes from ONE adapter function, `make_near_cache()`: the router's
`router.locator.NearCache` when importable, else a plain `dict` of sid -> pod name (the
shape the near-cache is built on). Everything else here only calls `set(sid, pod)` and
`get(sid)`.

How it is measured:
- lookup: fill a cache with N lowercase-uuid4 session ids over 32 pod names, then time
  `lookups` `get()` calls of existing ids in random order (perf_counter_ns around the loop,
  minus an empty loop over the same ids); ns per lookup, best of 3 rounds.
- memory: `tracemalloc` traced bytes around inserting N entries, *including* the session-id
  strings (the cache keeps them alive; pod names are shared), so it is what one more cached
  session costs the router process; once for open sessions and once for ended ones (kept
  with an expiry for the retention window, so they cost more: what sizes
  `--cache-max-sessions`). Also RSS delta for the largest lookup size (coarser:
  allocator arenas, page granularity).

Bounded: 1M entries take ~0.3 GB and a few seconds; sizes above 5M are refused.
"""

from __future__ import annotations

import gc
import random
import sys
import time
import tracemalloc
import uuid
from typing import Any, Protocol

MAX_SIZE = 5_000_000
POD_NAMES = tuple(f"pod{i}" for i in range(32))


class CacheAdapter(Protocol):
    name: str

    def set(self, sid: str, pod: str) -> None: ...
    def set_ended(self, sid: str, pod: str) -> None: ...
    def get(self, sid: str) -> str | None: ...


class DictCache:
    """Plain dict sid -> pod name (what the near-cache stores for an open session)."""

    name = "dict"

    def __init__(self) -> None:
        self._d: dict[str, str] = {}
        self.get = self._d.get  # type: ignore[method-assign]

    def set(self, sid: str, pod: str) -> None:
        self._d[sid] = pod

    def set_ended(self, sid: str, pod: str) -> None:
        self._d[sid] = pod

    def get(self, sid: str) -> str | None:  # replaced per instance by dict.get
        return self._d.get(sid)


class RouterNearCache:
    """`router.locator.NearCache` with open sessions, behind the adapter interface."""

    name = "router.locator.NearCache"

    def __init__(self) -> None:
        from router.near_cache import NearCache
        from router.store import OPEN, RESOLVED

        self._open, self._ended = OPEN, RESOLVED
        self._cache: Any = NearCache()
        self.get = self._cache.get  # type: ignore[method-assign]

    def set(self, sid: str, pod: str) -> None:
        self._cache.set(sid, pod, self._open)

    def set_ended(self, sid: str, pod: str) -> None:
        self._cache.set(sid, pod, self._ended, 600.0)  # the default --retention-s

    def get(self, sid: str) -> str | None:  # replaced per instance by NearCache.get
        return self._cache.get(sid)  # type: ignore[no-any-return]


def make_near_cache() -> CacheAdapter:
    """THE adapter: the router's near-cache if importable, else a plain dict."""
    try:
        return RouterNearCache()
    except ImportError:
        return DictCache()


def _sids(n: int) -> list[str]:
    rnd = random.Random(n)
    return [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(n)]


def _fill(cache: CacheAdapter, sids: list[str], ended: bool = False) -> None:
    put = cache.set_ended if ended else cache.set
    for i, sid in enumerate(sids):
        put(sid, POD_NAMES[i % len(POD_NAMES)])


def _time_lookups(cache: CacheAdapter, probe: list[str]) -> float:
    """ns per lookup: the best loop with lookups minus the best empty loop (each the minimum of
    3 runs on its own: subtracting within one noisy run could give a negative figure)."""
    get = cache.get
    best_lookups = best_empty = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for sid in probe:
            get(sid)
        t1 = time.perf_counter_ns()
        for _sid in probe:
            pass
        t2 = time.perf_counter_ns()
        best_lookups = min(best_lookups, t1 - t0)
        best_empty = min(best_empty, t2 - t1)
    return (best_lookups - best_empty) / len(probe)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def bench_near_cache(sizes: tuple[int, ...] | list[int], lookups: int = 200_000
                     ) -> dict[str, Any]:
    """ns per `get()` at each size (best of 3), and the large/small ratio."""
    out: dict[str, Any] = {"cache": make_near_cache().name, "lookups": lookups, "sizes": {}}
    for n in sizes:
        if n > MAX_SIZE:
            raise ValueError(f"cache size {n} > {MAX_SIZE}: refused (time/memory bound)")
        gc.collect()
        rss0 = _rss()
        cache = make_near_cache()
        sids = _sids(n)
        t0 = time.perf_counter()
        _fill(cache, sids)
        fill_s = time.perf_counter() - t0
        rss1 = _rss()
        rnd = random.Random(7)
        probe = [sids[rnd.randrange(n)] for _ in range(lookups)]
        ns = _time_lookups(cache, probe)
        out["sizes"][str(n)] = {
            "ns_per_lookup": round(ns, 1),
            "fill_s": round(fill_s, 3),
            "rss_bytes_per_entry": round((rss1 - rss0) / n, 1),
        }
        del cache, sids, probe
        gc.collect()
    keys = [str(n) for n in sizes]
    if len(keys) >= 2:
        small, large = out["sizes"][keys[0]], out["sizes"][keys[-1]]
        out["lookup_ratio_large_vs_small"] = round(
            large["ns_per_lookup"] / max(0.1, small["ns_per_lookup"]), 3)
        out["lookup_delta_ns"] = round(large["ns_per_lookup"] - small["ns_per_lookup"], 1)
    return out


def _traced_bytes(n: int, ended: bool) -> tuple[float, float]:
    """(bytes per session, the same without its session-id string) for n sessions."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        cache = make_near_cache()
        sids = _sids(n)
        mid = tracemalloc.take_snapshot()
        _fill(cache, sids, ended)
        end = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    with_keys = sum(s.size_diff for s in end.compare_to(base, "filename"))
    keys_only = sum(s.size_diff for s in mid.compare_to(base, "filename"))
    # the list holding the ids is a benchmark artefact, not cache memory
    list_bytes = sys.getsizeof(sids)
    del cache, sids
    return (with_keys - list_bytes) / n, (with_keys - keys_only) / n


def bench_memory(n: int = 100_000) -> dict[str, Any]:
    """tracemalloc bytes per cached session, open and ended (with and without its
    session-id string)."""
    if n > MAX_SIZE:
        raise ValueError(f"{n} entries > {MAX_SIZE}: refused")
    name = make_near_cache().name  # imports the cache's modules before anything is traced
    open_bytes, open_no_sid = _traced_bytes(n, ended=False)
    ended_bytes, ended_no_sid = _traced_bytes(n, ended=True)
    return {
        "cache": name,
        "entries": n,
        "bytes_per_session": round(open_bytes, 1),
        "bytes_per_session_excluding_sid_string": round(open_no_sid, 1),
        "bytes_per_ended_session": round(ended_bytes, 1),
        "bytes_per_ended_session_excluding_sid_string": round(ended_no_sid, 1),
        "method": "tracemalloc, in process",
    }
