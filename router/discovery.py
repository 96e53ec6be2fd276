"""Pod discovery from DNS: a headless Service in front of a StatefulSet (`--pods-dns HOST:PORT`).

Every `interval_s` the name is resolved to its endpoints and each endpoint to its stable pod name
(Kubernetes publishes `<pod>.<service>.<ns>.svc.<zone>` PTR records for StatefulSet pods). A pod
is tracked by that name and dialled by its stable DNS name, never by its IP, so a restarted pod
with a new IP is the same pod.

Invariants:
- A name that appears is added to the pod set (which starts its watch feed; the feed's first
  connect replays the broadcast registry).
- A name that disappears is removed (and its sessions forgotten) only after it has been missing
  for `grace_s` *and* the pod is not answering; a DNS hiccup never drops a live pod.
- A resolution failure keeps the current pod set and is reported (`last_error`, readiness), and
  resolution is retried at the next interval. Start-up never fails because DNS is not ready yet.
- The loop runs as the router supervisor's service `dns`: an unexpected exception is logged with
  its traceback, counted, shown in `last_error` and the loop restarted with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from router.aio import wait_event
from router.pods import PodSet, PodSpec
from router.supervisor import Supervisor

log = logging.getLogger("macp_router.discovery")


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[PodSpec]:
        """The pods behind `host` (raise OSError when the name does not resolve)."""
        ...


class SystemResolver:
    """getaddrinfo for the endpoints, then a PTR lookup per endpoint for its stable name."""

    async def resolve(self, host: str, port: int) -> list[PodSpec]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = sorted({info[4][0] for info in infos})
        specs = []
        for ip in addresses:
            try:
                fqdn, _, _ = await loop.run_in_executor(None, socket.gethostbyaddr, ip)
            except OSError:
                fqdn = ""
            if fqdn and not fqdn.replace(".", "").isdigit():
                name = fqdn.split(".", 1)[0]
                target = fqdn
            else:  # no PTR record: fall back to the IP (stable only as long as the pod is)
                name = ip.replace(":", "-").replace(".", "-")
                target = f"[{ip}]" if ":" in ip else ip
            specs.append(PodSpec(name, f"{target}:{port}"))
        return specs


class DnsDiscovery:
    def __init__(
        self,
        target: str,
        pods: PodSet,
        *,
        supervisor: Supervisor,
        resolver: Resolver | None = None,
        interval_s: float = 5.0,
        grace_s: float = 30.0,
        on_forget: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        host, _, port = target.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.pods = pods
        self.resolver = resolver or SystemResolver()
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.on_forget = on_forget
        self.last_error = ""
        self.resolutions = 0
        self._missing_since: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._supervisor = supervisor
        self.service = "dns"

    def start(self) -> None:
        if not self._supervisor.running(self.service):
            self._supervisor.spawn(self.service, self._run)

    async def aclose(self) -> None:
        await self._supervisor.stop(self.service)

    def refresh_now(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        try:
            while True:
                await self.refresh()
                self._wake.clear()
                await wait_event(self._wake, self.interval_s)
        except Exception as exc:
            self.last_error = (f"DNS discovery of {self.host} crashed ({type(exc).__name__}: "
                               f"{exc}); restarting")
            raise

    async def refresh(self) -> None:
        """Resolve once and reconcile the pod set with the answer."""
        try:
            found = await self.resolver.resolve(self.host, self.port)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            message = f"DNS name {self.host} did not resolve: {exc}; retrying every " \
                      f"{self.interval_s:g}s"
            if message != self.last_error:
                log.warning("%s", message)
            self.last_error = message
            return
        self.last_error = ""
        self.resolutions += 1
        now = time.monotonic()
        wanted = {spec.name: spec for spec in found}
        for name, spec in wanted.items():
            self._missing_since.pop(name, None)
            current = self.pods.get(name)
            if current is None:
                log.info("pod %s (%s) discovered", name, spec.address)
                self.pods.add(spec)
            elif current.address != spec.address:
                log.info("pod %s moved from %s to %s", name, current.address, spec.address)
                await self.pods.remove(name)
                self.pods.add(spec)
        for name in self.pods.names():
            if name in wanted:
                continue
            since = self._missing_since.setdefault(name, now)
            pod = self.pods.get(name)
            if now - since < self.grace_s or (pod is not None and pod.healthy):
                continue
            log.info("pod %s left DNS %.0fs ago and does not answer: removing it", name,
                     now - since)
            self._missing_since.pop(name, None)
            await self.pods.remove(name)
            if self.on_forget is not None:
                await self.on_forget(name)
