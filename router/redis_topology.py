"""Which Redis the store talks to: the `--redis-url` spellings, their parsing, and the client.

Three topologies, one `LocationStore` (`router.redis_store`) on top of each:

``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix:///path[?db=N]``
    One standalone Redis (or a proxy in front of several).
``redis+cluster://[[user]:password@]host:port[,host:port...]``, ``rediss+cluster://...``
    Redis Cluster (or Valkey cluster mode): the hosts are seed nodes; the client learns the slot
    map from them, follows MOVED / ASK and re-learns the map after a failover. No database number
    (a cluster has only db 0).
``redis+sentinel://[[user]:password@]host:port[,host:port...]/MASTER_NAME[/db]``,
``rediss+sentinel://...``
    A master/replica group managed by Sentinel: the hosts are sentinels, asked for the current
    master of MASTER_NAME before every new connection, so a failover is followed without a
    restart. The userinfo password is the data nodes'; ``?sentinel_password=...`` (and
    ``sentinel_username``) authenticate to sentinels that require it.

These spellings are a CLI contract (tools outside the repository use them); `parse_url` is the
only place that reads them. Invariants:
- Every error message and every string meant for a log carries the URL through `redact_url`:
  passwords (userinfo and any ``...password=`` query parameter) never appear.
- `parse_url` raises `ValueError` with one line that names the problem and shows the accepted
  spellings; it never raises anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

STANDALONE = "standalone"
CLUSTER = "cluster"
SENTINEL = "sentinel"

SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
URL_HELP = (
    "expected redis://[[user]:password@]host[:port][/db], rediss://... (TLS), "
    "unix:///path/to/redis.sock[?db=N], redis+cluster://host:port[,host:port...] "
    "(rediss+cluster:// for TLS) or redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db] "
    "(rediss+sentinel:// for TLS)"
)
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `--redis-url` (password kept here, never in `repr`)."""

    kind: str
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    """Seed nodes (cluster) or sentinels (sentinel); empty for standalone (redis-py parses it)."""
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***`` (userinfo and ``?...password=``), for logs.

    Never raises: a URL too broken to split is reduced to its scheme.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _password = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if colon else f"{user}@{hostport}"
        query = parts.query
        if query:
            pairs = []
            for pair in query.split("&"):
                name, eq, _value = pair.partition("=")
                secret = name.lower().endswith("password")
                pairs.append(f"{name}=***" if eq and secret else pair)
            query = "&".join(pairs)
        if "://" not in url:
            return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        # Rebuilt by hand: urlunsplit drops the "//" of an empty netloc (unix:///path).
        rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
        rebuilt += f"?{query}" if query else ""
        return rebuilt + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        return f"{scheme}://<unparseable>" if scheme else "<unparseable>"


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` -> (host, port); ValueError naming what is wrong."""
    item = item.strip()
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket:
            raise ValueError(f"unclosed '[' in {item!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after the address in {item!r}")
    else:
        host, colon, port_text = item.rpartition(":")
        if not colon:
            host, port_text = item, ""
    if not host:
        raise ValueError(f"no host in {item!r}")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"port of {item!r} is not a number in 1..65535")
    return host, int(port_text)


def _db(text: str | None) -> int:
    if text is None or text == "":
        return 0
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"database {text!r} is not a non-negative integer")
    return int(text)


def parse_url(url: str) -> RedisTarget:
    """The `RedisTarget` a `--redis-url` names; ValueError (password-free) when it names none."""
    shown = redact_url(url) if isinstance(url, str) else repr(url)

    def bad(reason: str) -> ValueError:
        return ValueError(f"invalid Redis URL {shown!r}: {reason}; {URL_HELP}")

    if not isinstance(url, str) or not url.strip():
        raise bad("empty")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise bad(f"cannot parse ({exc})") from None
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise bad(f"unsupported scheme {scheme!r}")
    query = parse_qs(parts.query)
    first = {name: values[0] for name, values in query.items()}
    netloc = parts.netloc
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        userinfo, hostlist = "", netloc
    user, colon, secret = userinfo.partition(":")
    username = unquote(user) or None
    password = unquote(secret) if colon else None
    try:
        if scheme in ("redis", "rediss", "unix"):
            return _standalone(parts, first, username, password)
        if not hostlist:
            raise ValueError("no host")
        default = DEFAULT_SENTINEL_PORT if scheme.endswith("sentinel") else DEFAULT_PORT
        nodes = tuple(_host_port(item, default) for item in hostlist.split(","))
        tls = scheme.startswith("rediss")
        if scheme.endswith("+cluster"):
            path = parts.path.strip("/")
            if path not in ("", "0") or _db(first.get("db")) != 0:
                raise ValueError("a cluster has only database 0")
            return RedisTarget(CLUSTER, tls, nodes, username=username, password=password)
        segments = [s for s in parts.path.split("/") if s]
        if not segments:
            raise ValueError("no master name (redis+sentinel://host:port/MASTER_NAME[/db])")
        if len(segments) > 2:
            raise ValueError("path must be /MASTER_NAME[/db]")
        db = _db(segments[1] if len(segments) == 2 else first.get("db"))
        return RedisTarget(
            SENTINEL, tls, nodes, master=unquote(segments[0]), db=db, username=username,
            password=password, sentinel_username=first.get("sentinel_username"),
            sentinel_password=first.get("sentinel_password"),
        )
    except ValueError as exc:
        raise bad(str(exc)) from None


def _standalone(
    parts: object, query: dict[str, str], username: str | None, password: str | None
) -> RedisTarget:
    from urllib.parse import SplitResult

    assert isinstance(parts, SplitResult)
    db_text = query.get("db")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("no socket path")
    else:
        if not parts.hostname:
            raise ValueError("no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("port is not a number in 1..65535") from None
        if port is not None and not 0 < port < 65536:
            raise ValueError("port is not a number in 1..65535")
        path = parts.path.strip("/")
        if path and db_text is None:
            db_text = path
    return RedisTarget(
        STANDALONE, parts.scheme == "rediss", db=_db(db_text), username=username,
        password=password,
    )


def validate_url(url: str) -> None:
    """Raise ValueError (password-free message) unless `url` is a usable Redis URL."""
    parse_url(url)
