"""Security: admin auth and exposure, TLS and mTLS, discovery scoping, secrets kept out of logs."""

from __future__ import annotations

import datetime
import ipaddress
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from macp.v1 import core_pb2

from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec
from router.sim import SimPod
from router.v1 import router_pb2, router_pb2_grpc
from tests import macp_calls
from tests.pod_auth import pod_options
from tests.procs import Process, free_port


# -- certificates made in the test ---------------------------------------------------------------
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool):  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.DNSName("localhost")]),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


class Pki:
    """A throwaway CA and leaf certificates for 127.0.0.1, written to a directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_key = _key()
        self.ca_cert = _cert("test-ca", self.ca_key, None, None, ca=True)
        self.ca_path = self._write("ca.pem", self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def leaf(self, name: str) -> tuple[str, str]:
        key = _key()
        cert = _cert(name, key, self.ca_cert.subject, self.ca_key, ca=False)
        return (self._write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", _pem_key(key)))

    def read(self, path: str) -> bytes:
        return Path(path).read_bytes()


async def _router(pods: list[SimPod], **overrides: object) -> Router:
    settings: dict[str, object] = {
        "listen": "127.0.0.1:0", "token": "router", "health_interval_ms": 200,
        "pods": tuple(PodSpec(p.name, p.address) for p in pods),
    }
    settings.update(overrides)
    router = Router(RouterConfig(**settings))  # type: ignore[arg-type]
    await router.start()
    assert await router.wait_ready(10)
    return router


# -- admin API ---------------------------------------------------------------------------------
async def test_admin_token_guards_reads_and_drain(sim_pods):
    router = await _router(await sim_pods(2), admin_token="adm-secret")
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            admin = router_pb2_grpc.RouterAdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await admin.ListPods(router_pb2.ListPodsRequest(), timeout=5)
            assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "--admin-token" in (denied.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await admin.DrainPod(router_pb2.DrainPodRequest(name="a"), timeout=5,
                                     metadata=(("authorization", "Bearer nope"),))
            assert wrong.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert not router.pods.get("a").draining  # type: ignore[union-attr]
            good = (("authorization", "Bearer adm-secret"),)
            reply = await admin.DrainPod(router_pb2.DrainPodRequest(name="a"), timeout=5,
                                         metadata=good)
            assert reply.pod.draining
            assert len((await admin.ListPods(router_pb2.ListPodsRequest(), timeout=5,
                                             metadata=good)).pods) == 2
    finally:
        await router.stop(grace=0)


async def test_open_reads_still_need_the_token_to_drain(sim_pods):
    router = await _router(await sim_pods(1), admin_token="adm", admin_open_reads=True)
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            admin = router_pb2_grpc.RouterAdminStub(channel)
            assert (await admin.ListPods(router_pb2.ListPodsRequest(), timeout=5)).pods
            status = await admin.SessionStatus(
                router_pb2.SessionStatusRequest(session_id=str(uuid.uuid4())), timeout=5)
            assert status.status == "not_found"
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await admin.DrainPod(router_pb2.DrainPodRequest(name="a"), timeout=5)
            assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await router.stop(grace=0)


async def test_without_admin_token_the_admin_api_stays_off_a_public_port(sim_pods):
    admin_port = free_port()
    router = await _router(await sim_pods(1), listen="0.0.0.0:0",
                           admin_listen=f"127.0.0.1:{admin_port}")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as public:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await router_pb2_grpc.RouterAdminStub(public).ListPods(
                    router_pb2.ListPodsRequest(), timeout=5)
            assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED
            # ... while MACP traffic is served there as usual.
            await macp_calls.start(public)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}") as loopback:
            reply = await router_pb2_grpc.RouterAdminStub(loopback).DrainPod(
                router_pb2.DrainPodRequest(name="a"), timeout=5)
            assert reply.pod.draining
    finally:
        await router.stop(grace=0)


# -- TLS ---------------------------------------------------------------------------------------
async def test_tls_for_clients_and_mtls_to_pods(tmp_path):
    pki = Pki(tmp_path)
    pod_cert, pod_key = pki.leaf("pod")
    router_cert, router_key = pki.leaf("router")
    client_cert, client_key = pki.leaf("router-client")
    pod_credentials = grpc.ssl_server_credentials(
        [(pki.read(pod_key), pki.read(pod_cert))],
        root_certificates=pki.read(pki.ca_path), require_client_auth=True,
    )
    pod = SimPod("a", "127.0.0.1:0", server_credentials=pod_credentials, **pod_options())
    await pod.start()
    router = await _router([pod], tls_cert=router_cert, tls_key=router_key,
                           pod_ca=pki.ca_path, pod_cert=client_cert, pod_key=client_key)
    try:
        assert router.pods.get("a").feed_up  # type: ignore[union-attr]  (mTLS feed works)
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.read(pki.ca_path))
        async with grpc.aio.secure_channel(router.address, credentials) as channel:
            sid = await macp_calls.start(channel)
            assert (await macp_calls.get_session(channel, sid)).metadata.session_id == sid
        assert sid in pod.sessions
        async with grpc.aio.insecure_channel(router.address) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await macp_calls.get_session(plaintext, sid)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await router.stop(grace=0)
        await pod.stop()


def test_tls_flags_are_validated(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("a", "127.0.0.1:1"),),
                     tls_cert=str(tmp_path / "x.pem"))
    with pytest.raises(ValueError, match="no such file"):
        RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("a", "127.0.0.1:1"),),
                     pod_ca=str(tmp_path / "missing.pem"))


# -- discovery scoping -------------------------------------------------------------------------
async def test_scope_discovery_shows_participants_their_sessions_and_observers_all(sim_pods):
    pods = await sim_pods(2)
    router = await _router(pods, scope_discovery=True, observer_tokens=frozenset({"ops"}))
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            ours = [await macp_calls.start(channel) for _ in range(4)]  # coordinator + reviewer
            stub = macp_calls.stub(channel)

            async def listed(token: str) -> set[str]:
                reply = await stub.ListSessions(core_pb2.ListSessionsRequest(), timeout=5,
                                                metadata=(("authorization", f"Bearer {token}"),))
                return {s.session_id for s in reply.sessions}

            assert await listed("reviewer") == set(ours)  # a participant
            assert await listed("coordinator") == set(ours)  # the initiator
            assert await listed("outsider") == set()
            assert await listed("ops") >= set(ours)  # an observer

            watch = stub.WatchSessions(core_pb2.WatchSessionsRequest(), timeout=5,
                                       metadata=(("authorization", "Bearer outsider"),))
            outsider_events = []
            try:
                async for event in watch:
                    outsider_events.append(event)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert outsider_events == []

            watch = stub.WatchSessions(core_pb2.WatchSessionsRequest(), timeout=5,
                                       metadata=(("authorization", "Bearer reviewer"),))
            seen = set()
            async for event in watch:
                seen.add(event.event.session.session_id)
                if seen >= set(ours):
                    break
            watch.cancel()
            assert seen == set(ours)
    finally:
        await router.stop(grace=0)


# -- secrets never logged ----------------------------------------------------------------------
async def test_tokens_and_passwords_never_appear_in_logs(sim_pods, tmp_path):
    pods = await sim_pods(2)
    port = free_port()
    pod_list = ",".join(f"{p.name}={p.address}" for p in pods)
    secrets = ["s3cret-router-tok", "s3cret-admin-tok", "s3cret-redis-pw", "s3cret-client-tok"]
    router = Process(
        ["serve", "--listen", f"127.0.0.1:{port}", "--pods", pod_list,
         "--token", secrets[0], "--admin-token", secrets[1], "--log-level", "debug",
         "--redis-url", f"redis://:{secrets[2]}@127.0.0.1:{free_port()}/0"],
        tmp_path / "router.log",
    )
    router.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = macp_calls.stub(channel)
            metadata = (("authorization", f"Bearer {secrets[3]}"),)
            for request in (core_pb2.GetSessionRequest(session_id=str(uuid.uuid4())),
                            core_pb2.GetSessionRequest(session_id="")):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetSession(request, metadata=metadata, timeout=5)
            admin = router_pb2_grpc.RouterAdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                await admin.DrainPod(router_pb2.DrainPodRequest(name="a"), timeout=5,
                                     metadata=(("authorization", "Bearer wrong"),))
    finally:
        router.terminate()
    log = router.output()
    assert "ready" in log and "redis store unavailable" in log, log
    for secret in secrets:
        assert secret not in log, f"{secret} leaked into the router log"
