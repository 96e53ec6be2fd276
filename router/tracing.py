"""Traces (OpenTelemetry), off unless `serve --otel`: one span per routed call and its steps.

With tracing on, every call through the router is a SERVER span named after the method
(`macp.v1.MACPRuntimeService/GetSession`), continuing the client's W3C `traceparent`, with
child spans for the steps that cost time:
- `locate` (a near-cache miss: `store.get`, then `probe.fanout` when the store does not know,
  with one `probe` CLIENT span per pod asked),
- `store.reserve` (placing a new session),
- `forward` (CLIENT span, attribute `macp.pod`: the pod's name): its context is the
  `traceparent` the pod receives, so the pod's own spans hang under it. A relayed stream
  (StreamSession, Watch*, merged fan-outs) gets `forward.open` instead, one per pod stream:
  the moment it was opened, and the parent the pod sees; the SERVER span covers its life.

The exporter is configured by the standard variables: `OTEL_TRACES_EXPORTER` (`otlp`, the
default, `console` or `none`), `OTEL_EXPORTER_OTLP_ENDPOINT` / `..._TRACES_ENDPOINT`,
`OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` default, `http/protobuf`), `OTEL_SERVICE_NAME`
(default `macp-router`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`,
`OTEL_PROPAGATORS`.

Invariants:
- Tracing off (the default, or the `otel` extra not installed) costs nothing on the hot path:
  `traced_handler` returns the handler unchanged and every other hook is behind the module
  flag `enabled`; opentelemetry is not even imported.
- A span never carries a token or a full session id (ids are shortened as in the logs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from router.logs import short_sid

T = TypeVar("T")

enabled = False
"""True once `configure` ran: the hooks in proxy/locator check this before doing anything."""

SERVICE_NAME = "macp-router"
_tracer: Any = None
_provider: Any = None
_HANDLER_FIELDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def require_otel_extra() -> None:
    """ValueError (one line, what to do) when the `otel` extra is not installed."""
    import importlib.util

    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ValueError("--otel needs OpenTelemetry: pip install 'macp-router[otel]'")


def _exporters() -> list[tuple[Any, bool]]:
    """(exporter, batch?) for each name in OTEL_TRACES_EXPORTER."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    out: list[tuple[Any, bool]] = []
    for name in names:
        if name in ("", "none"):
            continue
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append((ConsoleSpanExporter(), False))
        elif name == "otlp":
            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                    OTLPSpanExporter,
                )
            else:
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported "
                                 "(grpc or http/protobuf)")
            out.append((OTLPSpanExporter(), True))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported "
                             "(otlp, console or none)")
    return out


def configure(*, span_processors: Sequence[Any] | None = None) -> None:
    """Turn tracing on for this process (before the router is built).

    Exporters come from the OTEL_* variables unless `span_processors` are given (tests pass
    a SimpleSpanProcessor over an InMemorySpanExporter).
    """
    global enabled, _tracer, _provider
    require_otel_extra()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))
    if span_processors is None:
        span_processors = [BatchSpanProcessor(e) if batch else SimpleSpanProcessor(e)
                           for e, batch in _exporters()]
    for processor in span_processors:
        provider.add_span_processor(processor)
    _provider = provider
    _tracer = provider.get_tracer("macp_router")
    enabled = True  # the global tracer provider is left alone: the router uses its own


def shutdown() -> None:
    """Flush and stop the exporters; tracing is off afterwards."""
    global enabled, _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    enabled, _tracer, _provider = False, None, None


# -- hooks (each a no-op unless `enabled`) ----------------------------------------------------
def _carrier(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def traced_handler(method: str, handler: Any) -> Any:
    """`handler` (a grpc RpcMethodHandler) whose behaviour runs inside a SERVER span."""
    if not enabled:
        return handler
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from router.routes import SERVICE

    field = next(f for f in _HANDLER_FIELDS if getattr(handler, f, None) is not None)
    behavior = getattr(handler, field)
    name = f"{SERVICE}/{method}"
    attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}

    async def traced(request: Any, context: Any) -> Any:
        parent = propagate.extract(_carrier(context.invocation_metadata()))
        with _tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                           attributes=attributes,
                                           record_exception=False,
                                           set_status_on_exception=False) as span:
            try:
                return await behavior(request, context)
            finally:
                code = context.code() if hasattr(context, "code") else None
                if code is not None and code.name != "OK":
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    span.set_status(Status(StatusCode.ERROR, code.name))
                else:
                    span.set_attribute("rpc.grpc.status_code", 0)

    return handler._replace(**{field: traced})


async def _traced(name: str, awaitable: Awaitable[T], attributes: dict[str, Any]) -> T:
    from opentelemetry.trace import Status, StatusCode

    # Exceptions are not recorded as events: their messages can carry full session ids.
    with _tracer.start_as_current_span(name, attributes=attributes, record_exception=False,
                                       set_status_on_exception=False) as span:
        try:
            result = await awaitable
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        status = getattr(result, "status", None)
        if isinstance(status, str):
            span.set_attribute("macp.locate.status", status)
            pod = getattr(result, "pod", None)
            if pod:
                span.set_attribute("macp.pod", pod)
            source = getattr(result, "source", None)
            if source:
                span.set_attribute("macp.locate.source", source)
        return result


def traced(name: str, awaitable: Awaitable[T], sid: str = "", **attributes: Any) -> Awaitable[T]:
    """`awaitable` inside a span `name` (child of the current one); itself when tracing is off.

    A result with `status` / `pod` / `source` (a `Located`) is recorded on the span.
    """
    if not enabled:
        return awaitable
    if sid:
        attributes["macp.session"] = short_sid(sid)
    return _traced(name, awaitable, attributes)


@contextlib.contextmanager
def forward_span(pod: str, address: str, path: str,
                 metadata: Sequence[tuple[str, str | bytes]],
                 name: str = "forward") -> Iterator[tuple]:
    """A CLIENT span (`forward`, or `probe`) for one call to `pod`; yields `metadata`
    carrying its `traceparent`.

    Only called when `enabled` (the caller checks, so the untraced path pays nothing).
    """
    import grpc
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode

    with _tracer.start_as_current_span(
        name, kind=SpanKind.CLIENT,
        attributes={"macp.pod": pod, "server.address": address, "rpc.system": "grpc",
                    "rpc.method": path.rsplit("/", 1)[-1]},
        record_exception=False, set_status_on_exception=False,  # details name session ids
    ) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        kept = tuple((k, v) for k, v in metadata if k not in carrier)
        try:
            yield kept + tuple(carrier.items())
        except grpc.aio.AioRpcError as exc:
            span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
            span.set_status(Status(StatusCode.ERROR, exc.code().name))
            raise
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        if name != "forward.open":  # a stream's outcome is its SERVER span's
            span.set_attribute("rpc.grpc.status_code", 0)


def stream_metadata(pod: str, address: str, path: str,
                    metadata: Sequence[tuple[str, str | bytes]]) -> Sequence[tuple]:
    """`metadata` for opening a stream to `pod`, carrying a `forward.open` span's context.

    A relayed stream lives as long as the caller's (the SERVER span covers it); this CLIENT
    span marks the moment the pod's stream was opened, names the pod, and is the parent the
    pod sees. `metadata` itself when tracing is off.
    """
    if not enabled:
        return metadata
    with forward_span(pod, address, path, metadata, "forward.open") as carried:
        return carried
