"""Prometheus metrics: bounded labels, real exposition that parses, the numbers that matter."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import UNKNOWN, Metrics, bounded
from tests import macp_calls
from tests.waiting import eventually


def test_bounded_maps_unexpected_label_values_to_unknown():
    assert bounded("hit", {"hit", "stale"}) == "hit"
    assert bounded("a-session-id-" + str(uuid.uuid4()), {"hit"}) == UNKNOWN


def test_helpers_never_create_a_label_per_session_or_pod_name():
    metrics = Metrics()
    metrics.add_pod("a")
    metrics.add_methods(["Send"])
    for _ in range(50):
        sid = str(uuid.uuid4())
        metrics.record_locate("macp", sid)
        metrics.record_request("macp", sid, "session", sid, sid, 0.001)
        metrics.record_probe("macp", sid, sid)
        metrics.record_placement("macp", sid, sid)
        metrics.record_watch_event(sid, sid)
    metrics.record_request("macp", "Send", "session", "a", "OK", 0.001)
    labels = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels |= set(sample.labels.values())
    assert not any(len(value) > 30 for value in labels), labels
    assert {"a", "Send", UNKNOWN} <= labels
    assert metrics.registry.get_sample_value(
        "macp_router_locate_total", {"protocol": "macp", "result": UNKNOWN}) == 50


def test_bad_protocol_label_is_bounded_too():
    metrics = Metrics()
    metrics.record_locate("http-3", "hit")
    assert metrics.registry.get_sample_value(
        "macp_router_locate_total", {"protocol": UNKNOWN, "result": "hit"}) == 1


@pytest.fixture
async def scraped(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods, metrics_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await macp_calls.start(channel)
        for _ in range(5):
            assert (await macp_calls.send(channel, macp_calls.proposal_envelope(sid))).ok
        with pytest.raises(grpc.aio.AioRpcError):
            await macp_calls.get_session(channel, str(uuid.uuid4()))

    def fetch() -> str:
        url = f"http://127.0.0.1:{router.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            return response.read().decode()

    return router, await asyncio.to_thread(fetch)


async def test_metrics_endpoint_parses_and_names_follow_the_convention(scraped):
    _router, text = scraped
    families = {family.name: family for family in text_string_to_metric_families(text)}
    expected = {
        "macp_router_requests", "macp_router_request_duration_seconds", "macp_router_locate",
        "macp_router_probe_fanouts", "macp_router_probe_duration_seconds",
        "macp_router_coalesced_misses", "macp_router_placements", "macp_router_broadcasts",
        "macp_router_watch_up", "macp_router_watch_reconnects", "macp_router_watch_events",
        "macp_router_cached_sessions", "macp_router_active_streams", "macp_router_pod_healthy",
        "macp_router_store_degraded", "macp_router_redis_command_duration_seconds",
    }
    assert expected <= set(families), expected - set(families)
    for name, family in families.items():
        assert name.startswith("macp_router_"), name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name


async def test_metrics_count_what_happened(scraped):
    _router, text = scraped
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("macp_router_watch_up", pod="a") == 1
    assert value("macp_router_pod_healthy", pod="b") == 1
    assert value("macp_router_locate_total", protocol="macp", result="not_found") == 1
    assert value("macp_router_probe_fanouts_total", protocol="macp") == 1
    sent_ok = sum(v for (name, labels), v in samples.items()
                  if name == "macp_router_requests_total"
                  and ("method", "Send") in labels and ("code", "OK") in labels)
    assert sent_ok == 6  # one start + five proposals
    cached = sum(v for (name, _), v in samples.items() if name == "macp_router_cached_sessions")
    assert cached == 1
    assert value("macp_router_store_degraded") == 0


# -- series lifecycle: known label sets at 0, a removed pod's series gone -----------------------


def scrape(router) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{router.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def series_of_pod(samples: dict, pod: str) -> list[str]:
    return [name for name, labels in samples if ("pod", pod) in labels]


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_fresh_router_exports_every_known_series_at_zero(sim_pods, make_router):
    pods = await sim_pods(2)
    router = await make_router(pods, metrics_listen="127.0.0.1:0")
    samples = await asyncio.to_thread(scrape, router)
    for result in ("hit", "store_hit", "probe_hit", "not_found", "negative_hit", "unknown",
                   "stale"):
        assert sample(samples, "macp_router_locate_total", protocol="macp", result=result) == 0
    for name in ("macp_router_coalesced_misses_total", "macp_router_probe_fanouts_total",
                 "macp_router_duplicate_sessions_total"):
        assert sample(samples, name, protocol="macp") == 0, name
    for pod in ("a", "b"):
        assert sample(samples, "macp_router_watch_reconnects_total", pod=pod) == 0
        assert sample(samples, "macp_router_placements_total", protocol="macp", pod=pod,
                      result="placed") == 0
        assert sample(samples, "macp_router_pod_draining", pod=pod) == 0
    for result in ("ok", "partial", "failed"):
        assert sample(samples, "macp_router_broadcasts_total", method="RegisterPolicy",
                      result=result) == 0
    assert sample(samples, "macp_router_pods", protocol="macp") == 2
    assert sample(samples, "macp_router_healthy_pods", protocol="macp") == 2


async def test_asyncio_tasks_are_exported_and_follow_open_streams(sim_pods, make_router):
    """`macp_router_asyncio_tasks` counts the router loop's live tasks (the soak's leak check):
    open relayed streams add tasks, and the count comes back down once they end."""
    pods = await sim_pods(2)
    router = await make_router(pods, metrics_listen="127.0.0.1:0")

    def tasks() -> float:
        value = sample(scrape(router), "macp_router_asyncio_tasks")
        assert value is not None, "macp_router_asyncio_tasks is not exported"
        return value

    idle = await asyncio.to_thread(tasks)
    assert idle >= len(pods)  # at least one watch feed per pod
    async with grpc.aio.insecure_channel(router.address) as channel:
        watch = channel.unary_stream("/macp.v1.MACPRuntimeService/WatchSessions")
        calls = [watch(b"", metadata=(("authorization", "Bearer coordinator"),), timeout=30)
                 for _ in range(5)]
        busy = await eventually(lambda: asyncio.to_thread(lambda: tasks() >= idle + 5),
                                timeout=10, what="tasks of 5 open merged watches")
        assert busy
        for call in calls:
            call.cancel()
    await eventually(lambda: asyncio.to_thread(lambda: tasks() <= idle), timeout=10,
                     what="task count back to idle")


async def test_removed_pod_loses_every_series_and_others_keep_theirs(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods, metrics_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(router.address) as channel:
        for _ in range(6):  # placements spread over the pods: request series per pod
            await macp_calls.start(channel)
    before = await asyncio.to_thread(scrape, router)
    assert "macp_router_requests_total" in series_of_pod(before, "c") or \
        "macp_router_placements_total" in series_of_pod(before, "c")
    assert sample(before, "macp_router_watch_up", pod="c") == 1

    await router.pods.remove("c")  # what a static pod list change or DNS discovery does

    async def gone() -> bool:
        samples = await asyncio.to_thread(scrape, router)
        return bool(samples) and not series_of_pod(samples, "c")

    await eventually(gone, what="every series of pod c deleted")
    after = await asyncio.to_thread(scrape, router)
    assert sample(after, "macp_router_watch_up", pod="c") is None
    assert sample(after, "macp_router_pod_healthy", pod="c") is None
    assert sample(after, "macp_router_watch_up", pod="a") == 1
    assert sample(after, "macp_router_pod_healthy", pod="b") == 1
    assert not series_of_pod(after, "unknown"), "late writes for c must not reappear as unknown"
    assert sample(after, "macp_router_pods", protocol="macp") == 2


async def test_pod_gone_from_dns_loses_its_feed_series_so_feed_down_stops(sim_pods):
    from tests.test_discovery import FakeResolver, start_router

    resolver = FakeResolver()
    a, b = await sim_pods(2)
    resolver.pods = [a, b]
    router = await start_router(resolver)
    try:
        await eventually(lambda: {p.name for p in router.pods if p.feed_up} == {"a", "b"},
                         what="a and b up")
        resolver.pods = [a]
        await b.stop()  # scaled down: gone from DNS and silent

        async def feed_series_gone() -> bool:
            samples = await asyncio.to_thread(scrape, router)
            return sample(samples, "macp_router_watch_up", pod="b") is None and \
                not series_of_pod(samples, "b")

        await eventually(feed_series_gone, what="b's series deleted after it left DNS")
        samples = await asyncio.to_thread(scrape, router)
        assert sample(samples, "macp_router_watch_up", pod="a") == 1
    finally:
        await router.stop(grace=0)


async def test_router_with_no_pod_at_all_exports_zero_healthy_pods(sim_pods):
    from tests.test_discovery import FakeResolver, start_router

    router = await start_router(FakeResolver())  # DNS answers, with no pod
    try:
        await eventually(lambda: router.discovery is not None
                         and router.discovery.resolutions >= 1, what="resolved once")

        async def exported() -> bool:
            samples = await asyncio.to_thread(scrape, router)
            return sample(samples, "macp_router_healthy_pods", protocol="macp") == 0 and \
                sample(samples, "macp_router_pods", protocol="macp") == 0

        await eventually(exported, what="healthy_pods 0 with no pod")
        samples = await asyncio.to_thread(scrape, router)
        assert not [name for name, _ in samples if name == "macp_router_pod_healthy"]
    finally:
        await router.stop(grace=0)


# -- the metrics port speaks HTTP properly --------------------------------------------------------


def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_metrics_port_answers_404_on_unknown_paths_and_head_on_every_known_path(
    sim_pods, make_router,
):
    pods = await sim_pods(1)
    router = await make_router(pods, metrics_listen="127.0.0.1:0")
    port = router.metrics_port
    for path in ("/nope", "/metrics/extra", "/favicon.ico", "/readyz/x"):
        status, _, body = await asyncio.to_thread(http, port, path)
        assert status == 404, path
        assert b"macp_router_" not in body, f"{path} must not serve metrics"
    for path in ("/metrics", "/healthz", "/livez", "/readyz", "/", "/session?id=x"):
        got, got_headers, got_body = await asyncio.to_thread(http, port, path, "GET")
        head, head_headers, head_body = await asyncio.to_thread(http, port, path, "HEAD")
        assert got == 200, path
        assert head == got, path
        assert head_body == b"" and got_body, path
        assert head_headers["Content-Type"] == got_headers["Content-Type"], path
        if path in ("/healthz", "/livez", "/readyz"):  # the others change between requests
            assert int(head_headers["Content-Length"]) == len(got_body), path
        assert int(head_headers["Content-Length"]) > 0, path
    status, headers, _ = await asyncio.to_thread(http, port, "/metrics", "POST")
    assert status == 405 and "GET" in headers["Allow"]
    status, headers, _ = await asyncio.to_thread(http, port, "/drain", "GET")
    assert status == 405 and headers["Allow"] == "POST"


async def test_pod_counts_cover_the_acp_front_door_too(sim_pods, make_router, tmp_path):
    pytest.importorskip("acp", reason="the acp extra is not installed")
    from router.acp.config import AcpConfig, AcpPodSpec
    from router.sim.acp_pod import AcpSimPod

    acp_pods = [AcpSimPod(name, "127.0.0.1:0", tmp_path) for name in ("x", "y")]
    for pod in acp_pods:
        await pod.start()
    try:
        acp = AcpConfig(listen="127.0.0.1:0",
                        pods=tuple(AcpPodSpec(pod.name, pod.url) for pod in acp_pods),
                        health_interval_ms=200, connect_timeout_ms=1000)
        router = await make_router(await sim_pods(1), metrics_listen="127.0.0.1:0", acp=acp)

        def counts() -> tuple[float | None, float | None]:
            registry = router.metrics.registry
            return (registry.get_sample_value("macp_router_pods", {"protocol": "acp"}),
                    registry.get_sample_value("macp_router_healthy_pods", {"protocol": "acp"}))

        await eventually(lambda: counts() == (2, 2), what="2 ACP pods, both healthy")
        await acp_pods[1].stop()
        await eventually(lambda: counts() == (2, 1), what="one ACP pod down")
        assert router.metrics.registry.get_sample_value(
            "macp_router_healthy_pods", {"protocol": "macp"}) == 1
    finally:
        for pod in acp_pods:
            await pod.stop()


async def test_exposition_passes_promtool_check_metrics(scraped):
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    _router, text = scraped
    result = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True,
        text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
