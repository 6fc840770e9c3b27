"""Real servers on loopback for the remote-shard tests: an HTTP file server with Range requests
that can cut a response mid-way (a dropped connection), and moto's S3 server.

Neither is a stand-in for the client side: the loader reads them with the same urllib and s3fs
code paths it uses against a CDN or a bucket.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    """What the HTTP server does wrong: ``cuts[path] = (at, times)``: the next ``times`` responses
    for ``path`` (-1: every one) stop at byte ``at`` of the file and the connection closes;
    ``stalls[path] = (at, seconds)``: the next response for ``path`` goes silent at byte ``at`` for
    that long; ``replace[path] = bytes`` serves other content under that path."""

    cuts: dict[str, tuple[int, int]] = field(default_factory=dict)
    stalls: dict[str, tuple[int, float]] = field(default_factory=dict)  # path: (at byte, seconds), once
    replace: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, int, int]] = field(default_factory=list)  # (path, first byte, bytes sent)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sent_bytes(self) -> int:
        with self.lock:
            return sum(sent for _, _, sent in self.requests)


def _handler(root: Path, faults: Faults):
    class ShardHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
            pass

        def _content(self) -> bytes | None:
            name = self.path.lstrip("/")
            if name in faults.replace:
                return faults.replace[name]
            path = (root / name).resolve()
            if not path.is_relative_to(root.resolve()) or not path.is_file():
                return None
            return path.read_bytes()

        def do_HEAD(self) -> None:
            content = self._content()
            if content is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            content = self._content()
            name = self.path.lstrip("/")
            if content is None:
                self.send_error(404)
                return
            start = 0
            header = self.headers.get("Range")
            if header:
                start = int(header.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            else:
                self.send_response(200)
            body = content[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            with faults.lock:
                after, times = faults.cuts.get(name, (None, 0))
                if times:
                    faults.cuts[name] = (after, times - 1 if times > 0 else times)
                    body = content[start:max(start, after)]
                faults.requests.append((name, start, len(body)))
                stall = faults.stalls.pop(name, None)
            if stall is not None and start < stall[0]:
                self.wfile.write(content[start:stall[0]])
                self.wfile.flush()
                time.sleep(stall[1])  # the client's read times out meanwhile and it re-opens
                body = content[stall[0]:]
            try:
                self.wfile.write(body)
            except OSError:  # the client gave up on this connection
                return
            if times:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the connection drops mid-shard

    return ShardHandler


@contextlib.contextmanager
def http_server(root: Path):
    """Serve ``root`` on loopback; yields (base URL, Faults)."""
    faults = Faults()
    class Server(ThreadingHTTPServer):
        request_queue_size = 64  # the check asks 16 sizes at once; a backlog of 5 drops SYNs (1 s retransmits)

    server = Server(("127.0.0.1", 0), _handler(Path(root), faults))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()


S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(root: Path, bucket: str, prefix: str):
    """moto's S3 server on loopback holding every file under ``root`` as ``s3://bucket/prefix/...``;
    the environment points boto3 (and so s3fs) at it, as a user's would at their endpoint. Yields
    the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in [*S3_ENVIRONMENT, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENVIRONMENT, AWS_ENDPOINT_URL=endpoint)
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
