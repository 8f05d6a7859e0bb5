"""The addresses `--address` and $RAY_ADDRESS take, checked before Ray sees them: their form
(`check_address`), then that a Ray answers there (`check_reachable`), so a typo or a dead head is one
line in seconds rather than Ray's ValueError traceback or minutes of silent retries; and which Ray a
run without --address attaches to (`running_instance`, `target`)."""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping

from fedeq_bench.core.errors import BenchError

ADDRESS_FILE = "ray_current_cluster"
"""Where `ray start --head` records its address, in Ray's temp dir ($RAY_TMPDIR, else /tmp, + /ray);
`ray stop` removes it. ray.init() reads the same file."""

GCS_PORT = 6379
"""The port `ray start --head` gives its GCS unless told otherwise (what `HOST:PORT` names)."""

CLIENT_PORT = 10001
"""Ray Client's default port on the head (`ray://HOST` without a port)."""

ADDRESS_FORMS = (f"auto (the Ray running on this machine), local (a new one), HOST:PORT (a head's GCS, port "
                 f"{GCS_PORT} by default) or ray://HOST[:PORT] (Ray Client, port {CLIENT_PORT} by default)")
"""The addresses `--address` and $RAY_ADDRESS take, as every refusal names them."""

# A host name (RFC 1123 labels; `_` too, which some container and cloud names carry) or an IPv4
# address; an IPv6 address goes in brackets and is checked by `ipaddress`.
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")

PROBE_TIMEOUT_S = 5.0
"""How long a head may take to accept a connection and answer as a gRPC server before the address
is refused (Ray itself retries a silent or wrong address for minutes)."""


def _refuse(address: str, source: str, why: str) -> BenchError:
    return BenchError(f"{source} {address!r}: {why}; give {ADDRESS_FORMS}")


def _host_port(hostport: str, default_port: int | None) -> tuple[str, int]:
    """(host, port) of `HOST:PORT`, `[IPv6]:PORT` or, with a default port, `HOST`; ValueError(why)."""
    if hostport.startswith("["):
        host, close, rest = hostport[1:].partition("]")
        if not close:
            raise ValueError("an IPv6 address needs its closing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"{rest!r} after the IPv6 address")
        port = rest[1:] if rest else None
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon:
            host, port = hostport, None
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets: [::1]:6379")
        if not _HOST.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or IP address" if host else "no host before the ':'")
    if port is None:
        if default_port is None:
            raise ValueError(f"no port (a head's GCS listens on {GCS_PORT}: HOST:{GCS_PORT})")
        return host, default_port
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number in 1..65535")
    return host, int(port)


def check_address(address: str, source: str = "--address") -> str | None:
    """Refuse an address Ray would reject with a traceback or misread; returns the `host:port` to
    dial (a Ray Client server or a GCS), or None for `auto` and `local`, which name no host.

    `source` is where the address came from (`--address`, `$RAY_ADDRESS`), for the message.
    """
    if address in ("auto", "local"):
        return None
    if not address:
        raise _refuse(address, source, "empty (omit --address to start a local Ray)")
    scheme, sep, rest = address.partition("://")
    if sep and scheme in ("http", "https"):
        raise BenchError(f"{source} {address!r} is an HTTP address (the dashboard's Jobs API, port 8265), which "
                         f"bench.run does not speak: submit the run with `ray job submit --address {address} "
                         f"-- python -m bench.run ...` (it runs with $RAY_ADDRESS set), or give {ADDRESS_FORMS}")
    if sep and scheme != "ray":
        raise _refuse(address, source, f"unknown scheme {scheme + '://'!r}")
    try:
        host, port = _host_port(rest if sep else address, CLIENT_PORT if sep else None)
    except ValueError as e:
        raise _refuse(address, source, str(e)) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def _tls() -> bool:
    """Whether Ray's gRPC runs over TLS ($RAY_USE_TLS, Ray's own test of it): then a plaintext channel
    cannot tell a gRPC server and only the TCP connection is checked."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _answers_grpc(host: str, port: int, timeout: float) -> bool:
    """Whether a gRPC server (Ray's GCS, Ray Client's server) answers at host:port: grpcio's channel
    becomes READY only once the peer completes HTTP/2's handshake, which another service, or a port
    that accepts and stays silent, never does."""
    import grpc

    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def check_reachable(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, with one line, on an address where no Ray answers: nobody listens there, or what
    listens is no gRPC server (Ray itself retries such an address for minutes).

    The address's form is checked first (`check_address`); `auto` and `local` name no host and are
    not dialled here (`target` resolves `auto`).
    """
    target = check_address(address)
    if target is None:
        return
    host, port = _split(target)
    client = address.startswith("ray://")
    hint = (f"start the head with `ray start --head` (its Ray Client server listens on {CLIENT_PORT})" if client else
            f"start one with `ray up ray_cluster.yaml` (then --address auto on its head node, or HEAD:{GCS_PORT})")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
        if _tls() or _answers_grpc(host, port, timeout):
            return
    except OSError as e:
        raise BenchError(f"cannot reach a Ray cluster at {address!r} ({e.strerror or e}); {hint} "
                         "or omit --address to start a local Ray") from None
    what = f"Ray Client server (port {CLIENT_PORT} by default)" if client else f"Ray GCS (port {GCS_PORT} by default)"
    raise BenchError(f"{address!r} accepts connections but no gRPC server answers there within {timeout:g} s: "
                     f"not a {what}; {hint} or omit --address to start a local Ray")


def _listening(target: str, timeout: float = 0.5) -> bool:
    try:
        check_reachable(target, timeout)
        return True
    except BenchError:
        return False


def running_instance(env: Mapping[str, str] | None = None, temp_dir: str | None = None) -> tuple[str, str] | None:
    """The Ray instance a run without --address attaches to, as (address, why), or None: start one.

    $RAY_ADDRESS first (`ray job submit` sets it for its entrypoint; a user may too; checked like
    --address; `local` there means: start one, `auto`: look further), then the address
    `ray start --head` recorded on the machine running the harness, if its GCS still answers: a file
    left by an instance that died is ignored rather than waited on. This is the order ray.init()
    itself uses.
    """
    env = os.environ if env is None else env
    named = env.get("RAY_ADDRESS")
    if named:
        check_address(named, "$RAY_ADDRESS")
        if named == "local":
            return None
        if named != "auto":  # "auto" there names nothing: look for `ray start --head`'s file below
            return named, "$RAY_ADDRESS"
    if temp_dir is None:
        base = env.get("RAY_TMPDIR") or env.get("TMPDIR") or "/tmp"
        temp_dir = os.path.join(base, "ray")
    try:
        with open(os.path.join(temp_dir, ADDRESS_FILE)) as f:
            address = f.read().strip()
    except OSError:
        return None
    if address and _listening(address):
        return address, "started by `ray start --head`; `ray stop` ends it"
    return None


def target(address: str | None, env: Mapping[str, str] | None = None) -> tuple[str | None, str | None, str]:
    """Where `connect(address)` goes, checked: (the address for ray.init, None to start a local Ray;
    the address to show; why). Raises BenchError, in seconds, for an address of the wrong form, one
    nobody answers at, and `auto` with no Ray to find on the machine running the harness.

    An instance found without an explicit address (or through `auto`) is joined as "auto", which Ray
    resolves to the same instance (same order): Ray turns its token authentication on only for an
    instance it finds itself, never for an explicit address, and `ray start --head` starts one with
    it on.
    """
    if address is not None:
        check_address(address)
    if address == "local":
        return None, None, "a new local Ray"
    if address is None or address == "auto":
        found = running_instance(env)
        if found is None:
            if address == "auto":
                raise BenchError("--address auto: no Ray runs on this machine (no $RAY_ADDRESS, and no live "
                                 "`ray start --head` recorded); start one with `ray start --head`, give "
                                 f"HOST:{GCS_PORT} or ray://HOST:{CLIENT_PORT}, or omit --address to start a local Ray")
            return None, None, "a new local Ray"
        shown, why = found
        check_reachable(shown)
        return "auto", shown, why
    check_reachable(address)
    return address, address, "--address"
