"""A real OpenAI-compatible chat-completions server for tests and benchmarks.

Stdlib ``ThreadingHTTPServer`` on 127.0.0.1 at a random port: one thread per request,
Nagle off and a listen backlog of 128 (see NOTES.md: without them the openai client
sees ~45 ms per call and dropped connections). It records every request, checks the
bearer key and the model, answers after ``delay`` seconds, and plays injected faults on
the next requests in arrival order. Bounded: it refuses requests past ``max_requests``
and shuts itself down after ``lifetime`` seconds.

    with FakeLLMServer(delay=0.05) as server:
        server.inject(rate_limited(retry_after="1"), server_error(), malformed())
        ...  # point the client at server.url with api_key=server.api_key
        server.records  # what arrived, in order
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Fault:
    status: int                      # HTTP status to answer with (200 for a malformed body)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None        # raw body; None = a JSON error object
    delay: float = 0.0               # extra seconds before answering


def rate_limited(retry_after: str = "1") -> Fault:
    return Fault(429, {"Retry-After": retry_after})


def server_error(status: int = 500) -> Fault:
    return Fault(status)


def malformed() -> Fault:
    return Fault(200, {"Content-Type": "application/json"}, body=b'{"id": "x", "choices": [')


def empty_answer() -> Fault:
    """A well-formed completion whose content has nothing after the final marker."""
    message = {"role": "assistant", "content": "Step 1: ...\nFINAL DESCRIPTION:"}
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "test-model",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    return Fault(200, body=json.dumps(body).encode())


def slow(delay: float) -> Fault:
    return Fault(0, delay=delay)  # status 0: answer normally, only later


@dataclass
class Record:
    n: int                     # arrival order, from 0
    body: dict
    authorization: str
    started: float
    finished: float = 0.0      # when the answer was written
    status: int = 0
    content: str = ""          # the message content answered (200 only)


class FakeLLMServer:
    def __init__(
        self,
        api_key: str = "sk-test-key",
        models: tuple[str, ...] = ("test-model",),
        delay: float = 0.0,
        max_requests: int = 5000,
        lifetime: float = 300.0,
    ) -> None:
        self.api_key, self.models, self.delay, self.max_requests = api_key, models, delay, max_requests
        self.lifetime = lifetime
        self.records: list[Record] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- control -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def completed(self) -> list[Record]:
        """Requests answered with 200 and a well-formed completion."""
        with self._lock:
            return [r for r in self.records if r.finished and r.status == 200 and r.content]

    def reset_counts(self) -> None:
        with self._lock:
            self.records.clear()
            self.max_in_flight = 0

    def start(self) -> "FakeLLMServer":
        handler = type("Handler", (_Handler,), {"server_state": self, "disable_nagle_algorithm": True})
        server_class = type(
            "Server", (ThreadingHTTPServer,),
            {"request_queue_size": 128, "daemon_threads": True, "handle_error": _quiet_disconnects},
        )
        self._httpd = server_class(("127.0.0.1", 0), handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answering ------------------------------------------------------------------------
    def answer(self, record: Record) -> str:
        """Deterministic CoT-style content naming the arrival number and the prompt."""
        user = record.body["messages"][-1]["content"]
        digest = hashlib.sha256(user.encode()).hexdigest()[:10]
        return (
            f"Step 1: read the question {digest}.\nStep 2: reason about it.\n"
            f"FINAL DESCRIPTION: Answer number {record.n} to prompt {digest} with seed {record.body.get('seed')}."
        )


def _quiet_disconnects(self: ThreadingHTTPServer, request: object, client_address: object) -> None:
    """A client that hangs up (a cancelled run, a killed process) is expected here."""
    import sys

    if not isinstance(sys.exc_info()[1], ConnectionError):
        ThreadingHTTPServer.handle_error(self, request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeLLMServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    @staticmethod
    def _error(status: int, message: str) -> bytes:
        return json.dumps({"error": {"message": message, "type": "test_error", "code": status}}).encode()

    def do_POST(self) -> None:
        state = self.server_state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        with state._lock:
            record = Record(
                n=len(state.records), body=json.loads(raw or b"{}"),
                authorization=self.headers.get("Authorization", ""), started=time.monotonic(),
            )
            state.records.append(record)
            fault = state._faults.popleft() if state._faults else None
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        status = 0
        try:
            time.sleep(state.delay + (fault.delay if fault else 0.0))
            status, headers, body = self._respond(record, fault)
            self._send(status, body, headers)
        finally:
            with state._lock:
                state.in_flight -= 1
                record.status, record.finished = status, time.monotonic()

    def _respond(self, record: Record, fault: Fault | None) -> tuple[int, dict[str, str], bytes]:
        state = self.server_state
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return 404, {}, self._error(404, f"no route {self.path}")
        if record.n >= state.max_requests:
            return 503, {}, self._error(503, "test server request budget spent")
        if record.authorization != f"Bearer {state.api_key}":
            return 401, {}, self._error(401, "Incorrect API key provided")
        if record.body.get("model") not in state.models:
            return 404, {}, self._error(404, f"The model '{record.body.get('model')}' does not exist")
        if fault is not None and fault.status:
            return fault.status, fault.headers, fault.body if fault.body is not None else self._error(fault.status, "injected")
        content = state.answer(record)
        record.content = content
        completion = {
            "id": f"chatcmpl-{record.n}", "object": "chat.completion", "created": int(time.time()),
            "model": record.body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
        }
        return 200, {}, json.dumps(completion).encode()


def main() -> None:
    """Serve from a process of its own (benchmarks: no GIL shared with the client).
    Prints the base URL on the first line of stdout; stops when stdin closes."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--api-key", default="sk-test-key")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    with FakeLLMServer(api_key=args.api_key, models=(args.model,), delay=args.delay, max_requests=10**7, lifetime=args.lifetime) as server:
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
