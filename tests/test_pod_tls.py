"""TLS to pods as a v0.6.1 runtime serves it: server-side TLS only (MACP_TLS_CERT_PATH /
MACP_TLS_KEY_PATH; the runtime asks for no client certificate), so `--pod-ca` alone must work.

A simulated pod configured as a production runtime (TLS, token entries, no MACP_ALLOW_INSECURE),
a router dialing it with only the CA, the real macp_sdk client through the router.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from macp_sdk import AuthConfig, DecisionSession, MacpClient

from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec
from router.sim import SimPod
from tests.pod_auth import TOKEN_ENTRIES
from tests.test_security import Pki


async def test_pod_ca_alone_dials_a_server_side_tls_runtime(tmp_path):
    pki = Pki(tmp_path)
    cert, key = pki.leaf("pod")
    server_tls = grpc.ssl_server_credentials([(pki.read(key), pki.read(cert))])  # no client CA
    pod = SimPod("a", "127.0.0.1:0", server_credentials=server_tls, auth_tokens=TOKEN_ENTRIES)
    await pod.start()  # TLS + tokens: starts without allow_insecure, as the runtime does
    router = Router(RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("a", pod.address),),
                                 token="router", health_interval_ms=200, pod_ca=pki.ca_path))
    await router.start()
    try:
        assert await router.wait_ready(10), "feed over server-side TLS did not come up"
        assert router.pods.get("a").healthy  # type: ignore[union-attr]

        def flow() -> tuple[bool, str]:
            client = MacpClient(target=router.address, allow_insecure=True,
                                auth=AuthConfig.for_dev_agent("coordinator"), default_timeout=10)
            try:
                session = DecisionSession(client)
                ack = session.start(intent="tls", participants=["reviewer"], ttl_ms=60_000)
                meta = client.get_session(session.session_id).metadata
                return ack.ok, meta.session_id
            finally:
                client.close()

        ok, sid = await asyncio.to_thread(flow)
        assert ok and sid in pod.sessions
    finally:
        await router.stop(grace=0)
        await pod.stop()


async def test_a_plaintext_router_cannot_reach_a_tls_pod_and_says_so(tmp_path):
    pki = Pki(tmp_path)
    cert, key = pki.leaf("pod")
    server_tls = grpc.ssl_server_credentials([(pki.read(key), pki.read(cert))])
    pod = SimPod("a", "127.0.0.1:0", server_credentials=server_tls, auth_tokens=TOKEN_ENTRIES)
    await pod.start()
    router = Router(RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("a", pod.address),),
                                 token="router", health_interval_ms=200))
    await router.start()
    try:
        assert not await router.wait_ready(1.5)
        assert not router.pods.get("a").healthy  # type: ignore[union-attr]
    finally:
        await router.stop(grace=0)
        await pod.stop()


def test_the_sim_refuses_plaintext_without_allow_insecure():
    with pytest.raises(RuntimeError, match="TLS is required"):
        asyncio.run(SimPod("a", auth_tokens=TOKEN_ENTRIES).start())
