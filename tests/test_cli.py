"""The `macp-router` command line (a contract for deploy files and tools): help, bad input,
serve/pod lifecycle, admin.

Every command runs as a real subprocess (`python -m router.cli ...`) with a timeout; servers are
waited for by their "ready" log line and always ended (SIGTERM, then SIGKILL) by the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc

from router.v1 import router_pb2, router_pb2_grpc
from tests.macp_calls import METADATA, TIMEOUT, start_envelope
from tests.pod_auth import pod_cli_args
from tests.procs import free_port

CLI = [sys.executable, "-m", "router.cli"]
SUBCOMMANDS = ["serve", "pod", "demo", "status", "pods", "drain", "undrain"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any MACP_ROUTER_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_ROUTER_")}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> (
    subprocess.CompletedProcess[str]
):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


class Server:
    """A long-running `macp-router serve|pod` subprocess with stdout and stderr in files."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict[str, str] | None = None):
        self.name = name
        self.stdout_path = tmp / f"{name}.out"
        self.stderr_path = tmp / f"{name}.err"
        self._out = open(self.stdout_path, "wb")  # closed in stop()
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([*CLI, *args], stdout=self._out, stderr=self._err,
                                     env=env or clean_env())

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, mark: str, timeout: float = 20) -> str:
        """Poll stderr until a line contains `mark`; that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr.splitlines():
                if mark in line:
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.stderr}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {mark!r} within {timeout}s:\n{self.stderr}")

    def terminate(self, timeout: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """One `macp-router pod` (named podA) and one `serve` in front of it: (router, pod) address."""
    tmp = tmp_path_factory.mktemp("cli")
    pod_address = f"127.0.0.1:{free_port()}"
    router_address = f"127.0.0.1:{free_port()}"
    pod = Server(tmp, "pod", "pod", "--listen", pod_address, "--name", "podA",
                 *pod_cli_args(tmp))
    router = None
    try:
        pod.wait_for("ready")
        router = Server(tmp, "router", "serve", "--listen", router_address,
                        "--pods", f"podA={pod_address}", "--token", "router",
                        "--shutdown-grace-s", "2")
        router.wait_for("ready")
        wait_healthy(router_address, ["podA"])
        yield router_address, pod_address
    finally:
        if router is not None:
            router.stop()
        pod.stop()


def wait_healthy(router_address: str, names: list[str], timeout: float = 15) -> None:
    """Poll the router's admin API until every named pod is healthy with its feed up."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(router_address) as channel:
        admin = router_pb2_grpc.RouterAdminStub(channel)
        while True:
            try:
                reply = admin.ListPods(router_pb2.ListPodsRequest(), timeout=2)
                ready = {p.name for p in reply.pods if p.healthy and p.feed_up}
                if set(names) <= ready:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"pods {names} not healthy within {timeout}s"
            time.sleep(0.05)


# -- help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_exits_0_and_mentions_the_environment(command):
    result = run(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: macp-router" in result.stdout
    assert "MACP_ROUTER_" in result.stdout, f"{command} --help does not mention env vars"


def test_console_script_runs():
    script = Path(sys.executable).with_name("macp-router")
    if not script.exists():
        pytest.skip("macp-router console script not installed next to this interpreter")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            timeout=30, env=clean_env())
    assert result.returncode == 0 and result.stdout.startswith("macp-router "), result


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--pods", "a=127.0.0.1:1", "--no-such-flag"], "--no-such-flag"),
        (["serve", "--pods", "a=127.0.0.1:1", "--probe-timeout-ms", "abc"], "'abc'"),
        (["serve", "--pods", "a=127.0.0.1:1", "--placement", "random"], "--placement"),
        (["serve", "--pods", "a=127.0.0.1:1", "--listen", "nowhere"], "'nowhere'"),
        (["serve"], "--pods"),
        (["serve", "--pods", "a=nohost"], "'nohost'"),
        (["serve", "--pods", "a"], "'a'"),
        (["serve", "--pods", "a=127.0.0.1:1,b=127.0.0.1:99999"], "127.0.0.1:99999"),
        (["serve", "--pods", "a=127.0.0.1:1,a=127.0.0.1:2"], "'a' appears twice"),
        (["pod", "--listen", "127.0.0.1:1"], "--name"),
        (["pod", "--listen", "127.0.0.1:1", "--name", "a"], "no authentication configured"),
        (["pod", "--listen", "127.0.0.1:1", "--name", "a", "--auth-tokens-json", "[{}]"],
         "bad token entries"),
        (["pod", "--listen", "127.0.0.1:1", "--name", "a", "--auth-tokens-json",
          '[{"token": "t", "sender": "s"}]'], "--allow-insecure"),
        (["status"], "SESSION_ID"),
        (["no-such-command"], "no-such-command"),
        (["serve", "--pods", "a=127.0.0.1:1", "--redis-url", "notaurl://x"], "'notaurl'"),
        (["serve", "--pods", "a=127.0.0.1:1"], "no router identity"),
        (["serve", "--pods", "a=127.0.0.1:1", "--token-file", "/nonexistent/tok"],
         "--token-file /nonexistent/tok"),
        (["serve", "--pods", "a=127.0.0.1:1", "--redis-url", "redis://:s3cret@h:notaport/0"],
         "Redis URL"),
    ],
    ids=["unknown-flag", "not-a-number", "bad-choice", "bad-listen", "no-pods", "pod-no-port",
         "pod-no-address", "pod-bad-port", "duplicate-pod", "pod-without-name",
         "sim-pod-without-auth", "sim-pod-bad-tokens", "sim-pod-plaintext-without-insecure",
         "status-without-sid", "unknown-command", "bad-redis-scheme", "serve-without-token",
         "serve-unreadable-token-file", "bad-redis-port"],
)
def test_bad_input_exits_2_with_one_clear_line(args, expected):
    result = run(*args)
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("macp-router") and "error:" in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert "--help" in lines[0], lines[0]  # says what to do next
    assert "s3cret" not in result.stderr  # a password in a bad URL is never echoed


def test_bad_pods_in_the_environment_are_named():
    result = run("serve", env=clean_env(MACP_ROUTER_PODS="x=nohost"))
    assert result.returncode == 2, result
    assert "'nohost'" in result.stderr, result.stderr


# -- serve and pod lifecycles ------------------------------------------------------------------
def test_pod_logs_ready_and_exits_0_on_sigterm(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    pod = Server(tmp_path, "pod", "pod", "--listen", address, "--name", "solo",
                 *pod_cli_args(tmp_path))
    try:
        line = pod.wait_for("ready")
        assert "solo" in line and address in line, line
        with grpc.insecure_channel(address) as channel:
            reply = core_pb2_grpc.MACPRuntimeServiceStub(channel).Initialize(
                core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]), timeout=TIMEOUT)
        assert reply.selected_protocol_version == "1.0"
        assert pod.terminate(timeout=10) == 0, pod.stderr
    finally:
        pod.stop()


def test_serve_from_env_logs_ready_and_exits_0_on_sigterm(tmp_path):
    pod_address = f"127.0.0.1:{free_port()}"
    router_address = f"127.0.0.1:{free_port()}"
    pod = Server(tmp_path, "pod", "pod", "--listen", pod_address, "--name", "envpod",
                 *pod_cli_args(tmp_path))
    router = None
    try:
        pod.wait_for("ready")
        router = Server(tmp_path, "router", "serve", env=clean_env(
            MACP_ROUTER_PODS=f"envpod={pod_address}",
            MACP_ROUTER_LISTEN=router_address,
            MACP_ROUTER_TOKEN="router",
            MACP_ROUTER_SHUTDOWN_GRACE_S="2",
        ))
        line = router.wait_for("ready")
        assert router_address in line and "envpod" in line, line
        assert router.stdout_path.read_text() == ""  # logs go to stderr
        wait_healthy(router_address, ["envpod"])
        with grpc.insecure_channel(router_address) as channel:
            reply = core_pb2_grpc.MACPRuntimeServiceStub(channel).Send(
                core_pb2.SendRequest(envelope=start_envelope()), metadata=METADATA,
                timeout=TIMEOUT)
        assert reply.ack.ok, reply

        started = time.monotonic()
        assert router.terminate(timeout=2 + 8) == 0, router.stderr
        assert time.monotonic() - started < 2 + 5
        assert "stopped" in router.stderr, router.stderr
        assert pod.terminate(timeout=10) == 0, pod.stderr
    finally:
        if router is not None:
            router.stop()
        pod.stop()


def test_a_mistyped_variable_is_warned_about_once_naming_the_setting(tmp_path):
    router = Server(tmp_path, "router", "serve", env=clean_env(
        MACP_ROUTER_PODS="a=127.0.0.1:1", MACP_ROUTER_LISTEN=f"127.0.0.1:{free_port()}",
        MACP_ROUTER_TOKEN="router", MACP_ROUTER_PROBE_TIMEOUT="100",
    ))
    try:
        line = router.wait_for("is not a macp-router setting")
        assert "MACP_ROUTER_PROBE_TIMEOUT " in line, line
        assert "did you mean MACP_ROUTER_PROBE_TIMEOUT_MS?" in line, line
        router.wait_for("ready")  # the router still starts; the warning came once, before
        assert router.stderr.count("is not a macp-router setting") == 1, router.stderr
    finally:
        router.stop()


def test_busy_listen_port_exits_nonzero_saying_cannot_listen():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run("serve", "--listen", f"127.0.0.1:{port}", "--pods", "a=127.0.0.1:1",
                     "--token", "router")
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if "cannot listen" in line]
    assert lines and str(port) in lines[0], result.stderr


def test_second_router_on_the_same_port_exits_nonzero(cluster):
    router_address, pod_address = cluster
    result = run("serve", "--listen", router_address, "--pods", f"a={pod_address}",
                 "--token", "router")
    assert result.returncode != 0, result
    assert any("cannot listen" in line and router_address in line
               for line in result.stderr.splitlines()), result.stderr


# -- admin clients -----------------------------------------------------------------------------
def test_pods_prints_the_pod_table(cluster):
    router_address, pod_address = cluster
    result = run("pods", "--router", router_address)
    assert result.returncode == 0, result.stderr
    header, row, *rest = result.stdout.splitlines()
    assert header.split()[:4] == ["POD", "ADDRESS", "HEALTH", "FEED"], result.stdout
    assert row.split()[:4] == ["podA", pod_address, "healthy", "up"], result.stdout
    assert any("store: memory" in line for line in rest), result.stdout


def test_pods_reads_the_router_address_from_env(cluster):
    router_address, _ = cluster
    result = run("pods", env=clean_env(MACP_ROUTER_ROUTER=router_address))
    assert result.returncode == 0 and "podA" in result.stdout, result


def test_status_says_where_a_session_lives(cluster):
    router_address, _ = cluster
    envelope = start_envelope()
    with grpc.insecure_channel(router_address) as channel:
        reply = core_pb2_grpc.MACPRuntimeServiceStub(channel).Send(
            core_pb2.SendRequest(envelope=envelope), metadata=METADATA, timeout=TIMEOUT)
    assert reply.ack.ok, reply

    result = run("status", envelope.session_id, "--router", router_address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{envelope.session_id}: live on pod podA"), result.stdout

    probed = run("status", envelope.session_id, "--router", router_address, "--probe")
    assert probed.returncode == 0 and "live on pod podA (source: probe" in probed.stdout, probed

    missing = str(uuid.uuid4())
    result = run("status", missing, "--router", router_address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{missing}: not_found"), result.stdout


@pytest.mark.parametrize("command", [["status", "some-session"], ["pods"]])
def test_admin_clients_without_a_router_exit_1_with_a_hint(command):
    address = f"127.0.0.1:{free_port()}"
    result = run(*command, "--router", address, timeout=30)
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("macp-router")]
    assert len(lines) == 1, result.stderr
    assert "UNAVAILABLE" in lines[0] and address in lines[0] and "--router" in lines[0], lines[0]
