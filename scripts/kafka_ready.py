#!/usr/bin/env python3
"""Exit 0 once a Kafka broker answers a Metadata request listing at least one broker.

Standard library only: scripts/stack.sh runs this before any virtualenv exists.

It speaks the Kafka wire protocol directly, using Metadata v1 because it is a
non-flexible ("classic") version: no tagged fields or compact encodings, so the
request and the start of the response are a handful of fixed-width fields.
A TCP connect alone is not enough: the broker accepts connections before its
KRaft controller has elected itself and registered the broker, and until then
Metadata answers with an empty broker list.

    python3 scripts/kafka_ready.py 127.0.0.1:9092 --timeout 90
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time

METADATA_API_KEY = 3
METADATA_VERSION = 1
CLIENT_ID = b"fraudscore-kafka-ready"


class ProtocolError(Exception):
    """The broker sent something that is not a well-formed Metadata v1 response."""


def build_metadata_request(correlation_id: int) -> bytes:
    # Request header v1: api_key, api_version, correlation_id, client_id (nullable string).
    header = (
        struct.pack(">hhih", METADATA_API_KEY, METADATA_VERSION, correlation_id, len(CLIENT_ID))
        + CLIENT_ID
    )
    # Metadata v1 body: topics array; length -1 (null) means "all topics".
    body = struct.pack(">i", -1)
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ProtocolError("connection closed mid-response")
        chunks += chunk
    return bytes(chunks)


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ProtocolError("response truncated")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self, nullable: bool = False) -> str | None:
        length = self.take(">h")
        if length == -1 and nullable:
            return None
        if length < 0 or self.pos + length > len(self.data):
            raise ProtocolError("bad string length")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", "replace")


def query_brokers(host: str, port: int, timeout: float) -> list[tuple[int, str, int]]:
    """Send one Metadata v1 request; return the (node_id, host, port) brokers listed."""
    correlation_id = int(time.monotonic() * 1000) & 0x7FFFFFFF
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(build_metadata_request(correlation_id))
        (size,) = struct.unpack(">i", recv_exact(sock, 4))
        if size < 8 or size > 64 * 1024 * 1024:
            raise ProtocolError(f"implausible response size {size}")
        reader = Reader(recv_exact(sock, size))

    # Response header v0: correlation_id. Body starts with the brokers array.
    if reader.take(">i") != correlation_id:
        raise ProtocolError("correlation id mismatch")
    count = reader.take(">i")
    if count < 0 or count > 10_000:
        raise ProtocolError(f"bad broker count {count}")
    brokers = []
    for _ in range(count):
        node_id = reader.take(">i")
        broker_host = reader.string() or ""
        broker_port = reader.take(">i")
        reader.string(nullable=True)  # rack
        brokers.append((node_id, broker_host, broker_port))
    return brokers


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", type=parse_address, help="broker HOST:PORT")
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="keep retrying for this many seconds (default: one attempt)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    host, port = args.address

    deadline = time.monotonic() + args.timeout
    last_error = "no attempt made"
    while True:
        try:
            brokers = query_brokers(host, port, timeout=5.0)
            if brokers:
                if not args.quiet:
                    listed = ", ".join(f"{n}@{h}:{p}" for n, h, p in brokers)
                    print(f"kafka ready at {host}:{port}: brokers {listed}", file=sys.stderr)
                return 0
            last_error = "metadata response lists no brokers yet"
        except (OSError, ProtocolError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            print(f"kafka not ready at {host}:{port}: {last_error}", file=sys.stderr)
            return 1
        time.sleep(0.25)


if __name__ == "__main__":
    sys.exit(main())
