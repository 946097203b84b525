"""A shard server on 127.0.0.1 that can fail on demand (fault injection for remote shard reads).

Index and provenance files are always served; `.tar` requests follow `mode`: "ok", "500" (Internal Server
Error), "truncated" (Content-Length of the whole file, half the bytes, then the connection closes), "stall"
(headers, a few bytes, then silence until the client gives up). `stop()` kills the server mid-run (connections
refused from then on); `start()` on the same port brings it back.
"""
from __future__ import annotations

import functools
import http.server
import os
import threading
import time
from pathlib import Path


class _FaultyHandler(http.server.SimpleHTTPRequestHandler):
    server_version = "faultserver"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        fault = self.server.fault
        mode = fault.mode
        if fault.die_after and self.path.endswith(".tar") and _tars(fault.served) >= fault.die_after:
            os._exit(0)  # the server process dies: this request gets no answer, later ones are refused
        if not self.path.endswith(".tar") or mode == "ok":
            self.server.fault.served.append(self.path)
            return super().do_GET()
        self.server.fault.failed.append(self.path)
        if mode == "500":
            self.send_error(500, "Internal Server Error")
            return
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if mode == "truncated":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif mode == "stall":
            self.wfile.write(data[:512])
            self.wfile.flush()
            self.server.fault.release.wait(30)  # bounded: the test ends long before


class FaultServer:
    """`FaultServer(folder)`: serve `folder` on 127.0.0.1; `url` is its base URL."""

    def __init__(self, folder: Path, mode: str = "ok") -> None:
        self.folder, self.mode = Path(folder), mode
        self.die_after = 0  # in a server process of its own (`main`): exit at the shard request after N served
        self.served: list[str] = []
        self.failed: list[str] = []
        self.release = threading.Event()
        self.port = 0
        self.server = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        handler = functools.partial(_FaultyHandler, directory=str(self.folder))
        for _ in range(50):  # the port of a server just stopped can take a moment to be free again
            try:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"port {self.port} did not come free")
        server.daemon_threads = True
        server.fault = self
        self.server, self.port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.release.set()
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            self.release = threading.Event()


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.train.faultserver DIR PORT_FILE [--die-after N]`: a server process (a forked loader worker
    cannot keep its socket open) that writes its port to PORT_FILE and, with --die-after, exits abruptly at the
    `.tar` request after N served: a shard server killed mid-epoch."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("port_file")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=300.0, help="exit after this many seconds whatever happens")
    args = parser.parse_args(argv)
    server = FaultServer(Path(args.folder))
    if args.port:
        server.stop()
        server.port = args.port
        server.start()
    server.die_after = args.die_after
    Path(args.port_file).write_text(str(server.port))
    time.sleep(args.lifetime)  # bounded even if the test that started it goes away
    os._exit(0)


def _tars(paths: list[str]) -> int:
    return sum(1 for path in paths if path.endswith(".tar"))


if __name__ == "__main__":
    main()
