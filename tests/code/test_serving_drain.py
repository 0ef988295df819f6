"""`brainscan serve` stopped by SIGTERM under load: every request it accepted is answered.

A node drain or a rollout sends the predictor SIGTERM while it serves. The server must stop
taking new connections (a refused connection is fine: the client retries elsewhere) and answer
every request it already accepted, slow ones included (Grad-CAM explanations here), before it
exits. A request whose connection was accepted and then dropped, or answered with anything but
200, is lost.

The server runs in its own process on 127.0.0.1 (its own, not the module-wide fixture's: this
test ends it). No timing is asserted: the test counts outcomes, and checks that requests were
still being answered after the signal (else it would test nothing).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import threading
import time

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
