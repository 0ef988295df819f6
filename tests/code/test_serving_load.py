"""The model server under ordinary events and heavy clients, each test with its own server.

SIGTERM under load (a node drain, a rollout): the server must stop taking new connections (a
refused connection is fine: the client retries elsewhere) and answer every request it already
accepted, slow ones included (Grad-CAM explanations here), before it exits. A request whose
connection was accepted and then dropped, or answered with anything but 200, is lost.

A huge JSON body: parsing it must not hold the event loop, so a health probe sent while it is
being parsed is answered first.

The servers run in their own processes on 127.0.0.1 (not the module-wide fixture's of
test_serving: these tests end them or load them). No timing is asserted: the tests count
outcomes and check the order answers arrive in.
"""

from __future__ import annotations

import base64
import fcntl
import http.client
import json
import os
import signal
import socket
import struct
import termios
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.serving import SERVER_LIMITS

MODEL = "brain-tumor"
SLOW_REQUESTS = 12  # explain requests of 16 Grad-CAMs each, all in flight at SIGTERM
FAST_CLIENTS = 6  # threads sending one-image predicts, one connection each, until refused


def _request(port: int, path: str, body: bytes) -> tuple[str, float]:
    """One POST on a fresh connection: ('ok' | 'refused' | what went wrong, when it ended)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        try:
            connection.connect()
        except ConnectionRefusedError:
            return "refused", time.monotonic()
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            text = response.read()
        except (OSError, http.client.HTTPException) as err:  # accepted, then dropped
            return f"dropped: {type(err).__name__}: {err}", time.monotonic()
        if response.status != 200:
            return f"HTTP {response.status}: {text[:200]!r}", time.monotonic()
        return "ok", time.monotonic()
    finally:
        connection.close()


def test_sigterm_under_load_answers_every_accepted_request(tmp_path, serving_bundle, serving_images):
    from brainscan.local import predictor as local

    extra = [str(item) for pair in SERVER_LIMITS.items() for item in pair]
    server = local.start(str(serving_bundle), tmp_path, extra_args=extra, timeout=300)
    images = [base64.b64encode(b).decode() for b in serving_images]
    explain = json.dumps({"instances": [{"b64": images[i % len(images)]} for i in range(16)]}).encode()
    predicts = [json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}).encode()
                for image in images]
    outcomes: list[tuple[str, str, float]] = []  # (kind, outcome, ended at)
    lock = threading.Lock()
    stop = threading.Event()
    fast_done = threading.Semaphore(0)

    def slow():
        outcome, ended = _request(server.http_port, f"/v1/models/{MODEL}:explain", explain)
        with lock:
            outcomes.append(("explain", outcome, ended))

    def fast(index: int):
        while not stop.is_set():
            outcome, ended = _request(server.http_port, f"/v2/models/{MODEL}/infer",
                                      predicts[index % len(predicts)])
            with lock:
                outcomes.append(("predict", outcome, ended))
            fast_done.release()
            if outcome != "ok":
                return  # refused (the server stopped listening) or lost: this client is done
            index += 1

    try:
        threads = [threading.Thread(target=slow) for _ in range(SLOW_REQUESTS)]
        threads += [threading.Thread(target=fast, args=(i,)) for i in range(FAST_CLIENTS)]
        for thread in threads:
            thread.start()
        for _ in range(4 * FAST_CLIENTS):  # the server is busy with both kinds: now stop it
            fast_done.acquire(timeout=600)
        signalled = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=900)
        stop.set()
        exited = False
        for _ in range(600):
            if not local.process_alive(server.pid):
                exited = True
                break
            time.sleep(0.5)
    finally:
        stop.set()
        local.stop(tmp_path)

    counts: dict[tuple[str, str], int] = {}
    for kind, outcome, ended in outcomes:
        key = (kind, f"{outcome} {'after' if ended > signalled else 'before'} SIGTERM")
        counts[key] = counts.get(key, 0) + 1
    print("outcomes:", counts)
    lost = [(kind, outcome) for kind, outcome, ended in outcomes
            if outcome not in ("ok", "refused") or (outcome == "refused" and ended < signalled)]
    assert not lost, f"{len(lost)} accepted request(s) not answered with 200: {lost[:10]}"
    answered_after = sum(1 for kind, outcome, ended in outcomes if outcome == "ok" and ended > signalled)
    assert answered_after >= 1, "nothing was in flight at SIGTERM: the test tested nothing"
    explained = [outcome for kind, outcome, _ in outcomes if kind == "explain"]
    assert explained.count("ok") + explained.count("refused") == SLOW_REQUESTS
    assert exited, "the server did not exit after draining"


def _unread(client: socket.socket, server_port: int) -> int:
    """Bytes the client sent that the server process has not read yet (Linux: the client's send
    queue and the server socket's receive queue in /proc/net/tcp)."""
    unsent = struct.unpack("i", fcntl.ioctl(client.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    client_port = client.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if local == server_port and remote == client_port:
            return unsent + int(fields[4].split(":")[1], 16)
    return unsent


def test_a_health_probe_is_answered_while_a_huge_json_body_is_parsed(tmp_path, serving_bundle):
    """Once the server has read all of a 28 MB JSON body, health probes keep being answered
    while it parses it (FastAPI parsed it on the event loop: for seconds, nothing was answered)."""
    from brainscan.local import predictor as local

    limits = {**SERVER_LIMITS, "--max-request-bytes": 64 * 1024 * 1024}
    extra = [str(item) for pair in limits.items() for item in pair]
    server = local.start(str(serving_bundle), tmp_path, extra_args=extra, timeout=300)
    floats = 7_000_000  # 28 MB of JSON numbers
    body = (b'{"inputs": [{"name": "input", "shape": [%d, 32, 32, 3], "datatype": "FP32", "data": ['
            % (floats // 3072) + b"0.5," * (floats - 1) + b"0.5]}]}")
    sent, answered = threading.Event(), threading.Event()
    infer = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=600)
    infer_answer: list = []

    def send_infer():
        try:
            infer.request("POST", f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
            sent.set()
            response = infer.getresponse()
            infer_answer.append((response.status, response.read()))
        finally:
            sent.set()
            answered.set()

    probes_while_parsing = 0
    try:
        thread = threading.Thread(target=send_infer)
        thread.start()
        sent.wait(600)
        while not answered.is_set() and _unread(infer.sock, server.http_port) > 0:
            time.sleep(0.001)  # until the server has read the whole body: it parses it next
        while not answered.is_set():
            probe = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=600)
            probe.request("GET", "/v2/health/live")
            status = probe.getresponse().status
            probe.close()
            assert status == 200
            probes_while_parsing += not answered.is_set()
        thread.join(600)
    finally:
        infer.close()
        local.stop(tmp_path)
    status, text = infer_answer[0]
    assert status == 400 and b"at most 16" in text, text[:300]  # parsed whole, then refused by the model
    # the event loop parsing it answers at most the probe it took before starting
    print("probes while parsing:", probes_while_parsing)
    assert probes_while_parsing >= 5, f"{probes_while_parsing} probe(s) answered while the body was parsed"
