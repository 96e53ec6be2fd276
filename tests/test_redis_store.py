"""RedisStore beyond the conformance suite: pipelining, key layout, corrupt data, URLs, passwords,
and what happens when Redis is unreachable, killed, restarted or flushed.

Every test runs a real server (tests/redis_fixture.py) and waits for states with bounded polling.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from router.redis_store import (
    BATCH_SIZE,
    DEFAULT_INDEX_SHARDS,
    RedisStore,
    entry_key,
    index_key,
    redact_url,
    shard_of,
    shard_tags,
)
from router.redis_topology import CLUSTER, SENTINEL, STANDALONE, parse_url
from router.store import OPEN, BroadcastRecord, Location, StoreUnavailable
from router.supervisor import Supervisor
from tests.redis_fixture import RedisServer, free_port
from tests.waiting import eventually

LOGGER = "router.redis_store"
WAIT_S = 10.0

ServerFactory = Callable[..., RedisServer]


def records(caplog: pytest.LogCaptureFixture, level: int, needle: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and needle in r.getMessage()
    ]


@pytest.fixture
async def stores() -> AsyncIterator[list[RedisStore]]:
    """Stores a test creates; all closed at teardown (no orphan health tasks)."""
    created: list[RedisStore] = []
    yield created
    for store in created:
        await store.aclose()


@pytest.fixture
def make(stores: list[RedisStore]) -> Callable[..., RedisStore]:
    def make(url: str, **kwargs) -> RedisStore:
        kwargs.setdefault("health_interval_s", 0.05)
        store = RedisStore(url, **kwargs)
        stores.append(store)
        return store

    return make


# --- pipelining and layout ---------------------------------------------------------------------


async def test_put_many_sends_one_round_trip_per_batch(
    redis_server_factory: ServerFactory,
    make: Callable[..., RedisStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = redis_server_factory()
    ops: list[str] = []
    store = make(server.url, timeout_s=5.0, observe_latency=lambda op, _s: ops.append(op))
    await store.start()
    await store.put("warm-up", Location("pod-a", OPEN))  # connection handshake done before counting

    sends = 0
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, *args: object, **kwargs: object) -> None:
        nonlocal sends
        sends += 1
        await original(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    with server.client() as admin:
        admin.config_resetstat()
        ops.clear()
        await store.put_many((f"s{i}", Location("pod-a", OPEN, "inc", i)) for i in range(5000))
        stats = admin.info("commandstats")
    monkeypatch.undo()

    batches = 5000 // BATCH_SIZE
    assert sends == batches, f"{sends} round trips for 5000 puts, expected {batches}"
    assert ops == ["put_many"] * batches
    assert stats["cmdstat_evalsha"]["calls"] == 5000
    assert "cmdstat_script" not in stats  # scripts were loaded once at start, not per batch
    assert len(await store.pod_sessions("pod-a")) == 5001


async def test_every_key_lives_under_the_prefix(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisStore]
) -> None:
    with redis_server.client() as admin:
        admin.set("macp:runtime-owned", b"untouched")
        store = make(redis_url)
        await store.start()
        await store.put("s1", Location("pod-a", OPEN))
        await store.put("s2", Location("pod-b", "resolved"))
        assert await store.reserve("s3", "pod-a") == "pod-a"
        await store.put_many([("s4", Location("pod-c", OPEN))])
        await store.record_broadcast(BroadcastRecord("k", "/m/M", b"x"))
        await store.pod_sessions("pod-a")
        await store.drop_pod_sessions("pod-b", set())
        await store.delete("s1", "pod-a")
        keys = sorted(k.decode() for k in admin.keys("*"))
        assert admin.get("macp:runtime-owned") == b"untouched"
    ours = [k for k in keys if k != "macp:runtime-owned"]
    assert ours and all(k.startswith("mrouter:") for k in ours), keys
    assert entry_key("s3") in ours and index_key("pod-a", "s3") in ours
    assert {"mrouter:{bc}:data", "mrouter:{bc}:order", "mrouter:{bc}:seq"} <= set(ours)
    assert len([k for k in ours if k.endswith(":marker")]) == DEFAULT_INDEX_SHARDS


def test_every_script_touches_one_hash_slot() -> None:
    """A session's entry and its index keys share a hash tag (one cluster slot), and the shards'
    tags are spread evenly over the slot space."""
    for sid in ("s1", "0f8fad5b-d9cb-469f-a165-70867728950e", "x" * 200):
        slot = key_slot(entry_key(sid).encode())
        assert key_slot(index_key("pod-a", sid).encode()) == slot
        assert key_slot(index_key("some-other-pod", sid).encode()) == slot
    slots = sorted(key_slot(f"{{{tag}}}".encode()) for tag in shard_tags(DEFAULT_INDEX_SHARDS))
    width = 16384 // DEFAULT_INDEX_SHARDS
    assert [slot // width for slot in slots] == list(range(DEFAULT_INDEX_SHARDS))
    # Sessions spread over the shards.
    counts = collections.Counter(shard_of(f"sid-{i}", DEFAULT_INDEX_SHARDS) for i in range(6400))
    assert len(counts) == DEFAULT_INDEX_SHARDS and max(counts.values()) < 2 * 100


async def test_a_prefix_written_with_another_layout_is_refused(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisStore]
) -> None:
    first = make(redis_url, index_shards=16)
    await first.start()
    other = make(redis_url, index_shards=32, required=True)
    with pytest.raises(StoreUnavailable, match="another key layout"):
        await other.start()
    separate = make(redis_url, index_shards=32, prefix="mrouter:v32:")
    await separate.start()
    assert not separate.degraded


async def test_prefixes_isolate_stores(redis_url: str, make: Callable[..., RedisStore]) -> None:
    one = make(redis_url, prefix="mrouter:one:")
    two = make(redis_url, prefix="mrouter:two:")
    await one.start()
    await two.start()
    await one.put("s1", Location("pod-a", OPEN))
    assert await two.get("s1") is None
    assert await two.reserve("s1", "pod-b") == "pod-b"
    assert await one.pod_sessions("pod-a") == {"s1"}


@pytest.mark.parametrize("prefix", ["macp:", "macp:router:", ""])
def test_prefix_may_not_be_the_runtimes_or_empty(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisStore("redis://127.0.0.1:6379", prefix=prefix)


# --- corrupt and foreign data ------------------------------------------------------------------


async def test_corrupt_values_read_as_absent_with_one_warning(
    redis_server: RedisServer,
    redis_url: str,
    make: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    store = make(redis_url)
    await store.start()
    with redis_server.client() as admin:
        admin.set(entry_key("garbage"), b"\xff\xfe not ours")
        admin.set(entry_key("bad-state"), b"1\x1fpod-a\x1fexploded\x1f\x1f5")
        admin.set(entry_key("bad-time"), b"1\x1fpod-a\x1fopen\x1f\x1fsoon")
        admin.set(entry_key("future"), b"2\x1fpod-a\x1fopen\x1f\x1f5")
        admin.hset(entry_key("hash"), "pod", "pod-a")
        admin.sadd(index_key("pod-a", "garbage"), "garbage")
        admin.sadd(index_key("pod-a", "hash"), "hash")
    for sid in ("garbage", "bad-state", "bad-time", "future", "hash"):
        assert await store.get(sid) is None
    warnings = records(caplog, logging.WARNING, "undecodable")
    assert len(warnings) == 1, "corrupt-value warnings are rate-limited"
    assert entry_key("garbage") in warnings[0].getMessage()
    # Nothing crashes on them, and writes replace them.
    assert await store.pod_sessions("pod-a") == set()
    assert await store.reserve("garbage", "pod-b") == "pod-b"
    await store.put("hash", Location("pod-c", OPEN))
    assert await store.get("hash") == Location("pod-c", OPEN)
    assert await store.delete("bad-state", "pod-a") is False
    assert await store.drop_pod_sessions("pod-a", set()) == 0


async def test_corrupt_broadcast_entries_are_skipped(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisStore]
) -> None:
    store = make(redis_url)
    await store.start()
    await store.record_broadcast(BroadcastRecord("good", "/m/A", b"1"))
    with redis_server.client() as admin:
        admin.hset("mrouter:{bc}:data", "bad", b"no-newline-here")
        admin.zadd("mrouter:{bc}:order", {"bad": 99})
        admin.zadd("mrouter:{bc}:order", {"dangling": 100})
    assert await store.broadcasts() == [BroadcastRecord("good", "/m/A", b"1")]


# --- URLs and passwords --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "localhost:6379",
        "http://127.0.0.1:6379",
        "redis://",
        "redis://:6379",
        "redis://127.0.0.1:port",
        "redis://127.0.0.1:70000",
        "redis://127.0.0.1:6379/zero",
        "redis://127.0.0.1:6379?db=x",
        "unix://",
        "redis://:hunter2-secret@127.0.0.1:notaport/0",
        "redis+cluster://",
        "redis+cluster://:hunter2-secret@h1:1,h2:notaport",
        "redis+cluster://h1:1,:2",
        "redis+cluster://h1:1/3",
        "redis+sentinel://h1:26379",
        "redis+sentinel://:hunter2-secret@h1:26379,h2:26379/",
        "redis+sentinel://h1:26379/master/zero",
        "redis+sentinel://h1:26379/master/0/extra",
        "redis+sentinel://h1:99999/master",
        "redis+clusters://h1:1",
    ],
)
def test_malformed_url_is_a_clear_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="invalid Redis URL") as info:
        RedisStore(url)
    assert "hunter2-secret" not in str(info.value)
    assert "redis://" in str(info.value)  # says what a good one looks like


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1",
        "redis://127.0.0.1:6379/3",
        "redis://user:pw@redis.example:6380/0",
        "rediss://:pw@redis.example:6380",
        "unix:///run/redis.sock",
        "unix:///run/redis.sock?db=2",
        "redis+cluster://10.0.0.1:7000",
        "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002",
        "rediss+cluster://alice:pw@redis.example:6380",
        "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster",
        "redis+sentinel://:pw@10.0.0.1/mymaster/2?sentinel_password=s",
        "rediss+sentinel://alice:pw@sentinel.example:26380/mymaster/0",
    ],
)
def test_wellformed_urls_are_accepted(url: str) -> None:
    RedisStore(url)


@pytest.mark.parametrize(
    ("url", "kind", "tls", "nodes", "master", "db"),
    [
        ("redis://h:1/2", STANDALONE, False, (), "", 2),
        ("rediss://h:1", STANDALONE, True, (), "", 0),
        ("redis+cluster://a:7000,b:7001,[::1]:7002", CLUSTER, False,
         (("a", 7000), ("b", 7001), ("::1", 7002)), "", 0),
        ("rediss+cluster://a", CLUSTER, True, (("a", 6379),), "", 0),
        ("redis+sentinel://s1,s2:26380/main", SENTINEL, False,
         (("s1", 26379), ("s2", 26380)), "main", 0),
        ("rediss+sentinel://:pw@s1:1/main/3", SENTINEL, True, (("s1", 1),), "main", 3),
    ],
)
def test_url_spellings_name_the_topology(url, kind, tls, nodes, master, db) -> None:  # type: ignore[no-untyped-def]
    target = parse_url(url)
    assert (target.kind, target.tls, target.nodes, target.master, target.db) == (
        kind, tls, nodes, master, db)


def test_url_credentials_reach_the_right_servers() -> None:
    target = parse_url("redis+sentinel://al%40ce:p%40ss@s1:1/main?sentinel_password=sp"
                       "&sentinel_username=su")
    assert (target.username, target.password) == ("al@ce", "p@ss")
    assert (target.sentinel_username, target.sentinel_password) == ("su", "sp")
    assert "p@ss" not in repr(target) and "'sp'" not in repr(target)
    cluster = RedisStore("rediss+cluster://:pw@h:1")
    assert cluster.topology == CLUSTER
    assert cluster._link.connection.client.connection_kwargs["password"] == "pw"
    assert cluster._link.connection.client.connection_kwargs["connection_class"].__name__ == (
        "SSLConnection"
    )


def test_rediss_uses_tls() -> None:
    store = RedisStore("rediss://redis.example:6380/0")
    pool = store._link.connection.pool
    assert pool is not None and pool.connection_class.__name__ == "SSLConnection"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:s3cret@h:1/0", "redis://:***@h:1/0"),
        ("redis://alice:s3cret@h:1", "redis://alice:***@h:1"),
        ("rediss://alice:p%40ss@h", "rediss://alice:***@h"),
        ("redis://alice@h:1", "redis://alice@h:1"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("unix:///tmp/r.sock?db=1&password=s3cret", "unix:///tmp/r.sock?db=1&password=***"),
        ("redis://:pa:ss@word@h:1", "redis://:***@h:1"),
        ("redis+cluster://:s3cret@a:1,b:2", "redis+cluster://:***@a:1,b:2"),
        ("rediss+sentinel://u:s3cret@a:1,b:2/m/0?sentinel_password=s3cret",
         "rediss+sentinel://u:***@a:1,b:2/m/0?sentinel_password=***"),
    ],
)
def test_redact_url_hides_passwords(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


async def test_unix_socket_url_works(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisStore]
) -> None:
    store = make(redis_server.unix_url)
    await store.start()
    assert not store.degraded
    await store.put("s1", Location("pod-a", OPEN))
    tcp = make(redis_url)
    await tcp.start()
    assert await tcp.get("s1") == Location("pod-a", OPEN)


async def test_password_from_argument_or_url(
    redis_server_factory: ServerFactory, make: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory(password="correct-horse")
    by_arg = make(server.url, password="correct-horse", required=True)
    await by_arg.start()
    await by_arg.put("s1", Location("pod-a", OPEN))
    by_url = make(f"redis://:correct-horse@127.0.0.1:{server.port}/0", required=True)
    await by_url.start()
    assert await by_url.get("s1") == Location("pod-a", OPEN)
    # The argument wins over the URL.
    both = make(f"redis://:wrong@127.0.0.1:{server.port}/0", password="correct-horse")
    await both.start()
    assert not both.degraded


async def test_wrong_password_degrades_without_leaking_it(
    redis_server_factory: ServerFactory,
    make: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = redis_server_factory(password="correct-horse")
    url = f"redis://:battery-staple-9@127.0.0.1:{server.port}/0"
    store = make(url)
    await store.start()
    assert store.degraded
    assert "authentication" in store.degraded_reason
    with pytest.raises(StoreUnavailable) as info:
        await store.get("s1")
    assert "battery-staple-9" not in str(info.value)

    strict = make(url, required=True)
    with pytest.raises(StoreUnavailable, match="authentication") as info:
        await strict.start()
    message = str(info.value)
    assert f"127.0.0.1:{server.port}" in message and "battery-staple-9" not in message
    assert "battery-staple-9" not in caplog.text
    assert len(records(caplog, logging.WARNING, "unavailable at")) == 1


async def test_missing_password_degrades(
    redis_server_factory: ServerFactory, make: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory(password="correct-horse")
    store = make(server.url)
    await store.start()
    assert store.degraded and "authentication" in store.degraded_reason


# --- unreachable, killed, restarted, flushed -----------------------------------------------------


async def test_unreachable_redis_at_start_comes_up_degraded(
    make: Callable[..., RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    url = f"redis://127.0.0.1:{free_port()}/0"
    store = make(url)
    await asyncio.wait_for(store.start(), WAIT_S)
    assert store.degraded
    lines = records(caplog, logging.WARNING, "unavailable at")
    assert len(lines) == 1 and url in lines[0].getMessage()
    started = time.monotonic()
    for call in (store.get("s1"), store.reserve("s1", "pod-a"), store.broadcasts()):
        with pytest.raises(StoreUnavailable, match="degraded"):
            await call
    assert time.monotonic() - started < 0.5, "degraded store fails fast"
    # Several health probes fail in the background: still one line.
    await eventually(lambda: store.health_probes >= 3)
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


async def test_unreachable_redis_with_required_raises(make: Callable[..., RedisStore]) -> None:
    url = f"redis://:topsecret@127.0.0.1:{free_port()}/0"
    store = make(url, required=True)
    with pytest.raises(StoreUnavailable) as info:
        await asyncio.wait_for(store.start(), WAIT_S)
    message = str(info.value)
    assert "required" in message and f"127.0.0.1:{url.rsplit(':', 1)[1]}" in message
    assert "topsecret" not in message
    assert "start Redis" in message  # says what to do


async def test_unresponsive_redis_times_out(make: Callable[..., RedisStore]) -> None:
    """A server that accepts connections but never answers: every call still has a deadline."""
    hung: list[asyncio.StreamWriter] = []

    async def accept_and_ignore(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        hung.append(writer)

    server = await asyncio.start_server(accept_and_ignore, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = make(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        started = time.monotonic()
        await store.start()
        assert store.degraded and "deadline" in store.degraded_reason
        strict = make(f"redis://127.0.0.1:{port}/0", timeout_s=0.2, required=True)
        with pytest.raises(StoreUnavailable, match="deadline"):
            await strict.start()
        assert time.monotonic() - started < 3.0
    finally:
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_killed_redis_degrades_once_and_recovers_on_restart(
    redis_server_factory: ServerFactory,
    make: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = redis_server_factory()
    store = make(server.url)
    recovered = asyncio.Event()
    resyncs = 0

    async def on_recovered() -> None:
        nonlocal resyncs
        resyncs += 1
        await store.put("resynced", Location("pod-a", OPEN))
        recovered.set()

    store.on_recovered = on_recovered
    await store.start()
    await store.put("s1", Location("pod-a", OPEN))

    server.kill()
    with pytest.raises(StoreUnavailable):
        await store.get("s1")
    assert store.degraded
    for _ in range(5):
        with pytest.raises(StoreUnavailable):
            await store.put("s2", Location("pod-a", OPEN))
        with pytest.raises(StoreUnavailable):
            await store.reserve("s3", "pod-a")
    assert len(records(caplog, logging.WARNING, "degraded")) == 1

    server.start()  # same port
    await asyncio.wait_for(recovered.wait(), WAIT_S)
    assert not store.degraded
    assert resyncs == 1
    assert len(records(caplog, logging.INFO, "recovered")) == 1
    assert await store.get("resynced") == Location("pod-a", OPEN)
    assert await store.get("s1") is None  # the killed server kept nothing; no crash
    assert await store.reserve("s3", "pod-a") == "pod-a"
    assert len(records(caplog, logging.WARNING, "degraded")) == 1


async def test_graceful_restart_between_calls_is_transparent(
    redis_server_factory: ServerFactory, make: Callable[..., RedisStore]
) -> None:
    """Pooled connections closed by a restart are re-opened once, without degrading."""
    server = redis_server_factory()
    store = make(server.url)
    await store.start()
    await store.put("s1", Location("pod-a", OPEN))
    server.restart()
    assert await store.get("s1") is None
    assert not store.degraded


async def test_on_recovered_failure_is_logged_not_fatal(
    redis_server_factory: ServerFactory,
    make: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    port = free_port()
    store = make(f"redis://127.0.0.1:{port}/0")
    called = asyncio.Event()

    async def broken() -> None:
        called.set()
        raise RuntimeError("resync bug")

    store.on_recovered = broken
    await store.start()
    assert store.degraded
    redis_server_factory(port=port)
    await asyncio.wait_for(called.wait(), WAIT_S)
    await eventually(lambda: bool(records(caplog, logging.WARNING, "on_recovered")))
    assert not store.degraded
    await store.put("s1", Location("pod-a", OPEN))


async def test_flushed_server_reads_as_empty(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisStore]
) -> None:
    store = make(redis_url)
    await store.start()
    await store.put("s1", Location("pod-a", OPEN))
    await store.record_broadcast(BroadcastRecord("k", "/m/M", b"x"))
    with redis_server.client() as admin:
        admin.flushall()
        admin.script_flush()
    assert await store.get("s1") is None
    assert await store.pod_sessions("pod-a") == set()
    assert await store.broadcasts() == []
    # Scripts are reloaded when Redis forgot them, on single calls and in pipelines alike.
    assert await store.reserve("s1", "pod-b") == "pod-b"
    with redis_server.client() as admin:
        admin.script_flush()
    await store.put_many([("s2", Location("pod-b", OPEN)), ("s3", Location("pod-b", OPEN))])
    with redis_server.client() as admin:
        admin.script_flush()
    assert await store.drop_pod_sessions("pod-b", {"s1"}) == 2
    assert not store.degraded


def health_tasks(store: RedisStore) -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == f"service:{store.service}"]


async def test_aclose_leaves_no_task_behind(redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.start()
    (task,) = health_tasks(store)
    assert not task.done()
    await store.aclose()
    assert task.done()
    await store.aclose()  # idempotent
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get("s1")


async def test_async_context_manager(redis_url: str) -> None:
    async with RedisStore(redis_url) as store:
        await store.put("s1", Location("pod-a", OPEN))
        assert await store.get("s1") == Location("pod-a", OPEN)
        assert health_tasks(store)
    assert not health_tasks(store)


async def test_a_health_loop_crash_is_counted_and_the_loop_restarted(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception the loop does not expect (before: it ended the loop for good, and a flushed
    Redis was never resynced again) is a crash of the router supervisor's `store_health`
    service: counted, and the loop restarted."""
    crashes: list[str] = []
    supervisor = Supervisor(on_crash=lambda name, exc: crashes.append(name))
    store = RedisStore(redis_url, supervisor=supervisor, marker_interval_s=0.05)
    await store.start()
    check_marker = store._link.check_marker
    checks = 0

    async def surprise() -> None:
        nonlocal checks
        checks += 1
        if checks == 1:
            raise KeyError("a reply shape the client did not expect")
        await check_marker()

    monkeypatch.setattr(store._link, "check_marker", surprise)
    await eventually(lambda: crashes == [store.service] and checks >= 3, timeout=WAIT_S,
                     what="crashed once, then checking again")
    state = supervisor.state(store.service)
    assert state is not None and state.up and state.crashes == 1
    assert state.last_error == "KeyError: 'a reply shape the client did not expect'"
    await store.aclose()
    assert supervisor.state(store.service) is None and not supervisor.closing
    await supervisor.aclose()


async def test_latency_hook_sees_every_operation(
    redis_url: str, make: Callable[..., RedisStore]
) -> None:
    seen: list[tuple[str, float]] = []
    store = make(redis_url, observe_latency=lambda op, s: seen.append((op, s)))
    await store.start()
    await store.put("s1", Location("pod-a", OPEN))
    await store.get("s1")
    await store.reserve("s2", "pod-a")
    await store.delete("s2", "pod-a")
    assert [op for op, _ in seen] == ["put", "get", "reserve", "delete"]
    assert all(0 <= s < 5 for _, s in seen)


def test_invalid_values_are_rejected_before_io() -> None:
    store = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="state"):
        asyncio.run(store.put("s1", Location("pod-a", "bogus")))
    with pytest.raises(ValueError, match="separator"):
        asyncio.run(store.put("s1", Location("pod\x1fa", OPEN)))


async def test_calls_before_start_are_a_programming_error(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        with pytest.raises(RuntimeError, match=r"before start\(\)"):
            await store.get("s1")
    finally:
        await store.aclose()


def test_the_command_counter_adds_nothing_to_what_it_counts(redis_server: RedisServer) -> None:
    """Valkey counts a new connection's HELLO / CLIENT SETINFO, Redis 7.0 does not: the counter
    must not open connections between samples, or a zero-commands assertion depends on the
    server flavour."""
    with redis_server.command_counter() as counter:
        first = counter.sample()
        second = counter.sample()
        with redis_server.client() as other:
            other.get("mrouter:test:counted")
        third = counter.sample()
    assert first == second
    assert third.get("get", 0) == first.get("get", 0) + 1
