"""Artifact hand-back on the running service: uploads checked against GitLab (the simulator),
streamed into the store and announced on the broker; refusals and cut uploads leave nothing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest

from gitlab_producer.simulator.repository import BRANCHES, branch_commits, members
from gitlab_producer.simulator.server import free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun, consume, wait_for_port

pytestmark = pytest.mark.integration
TOKEN = "upload-token-0123456789"
SPEC = WorldSpec(projects=30, users=40, events=100, seed=31)
RULED, FREE = 3, 4  # project 3 has a capture rule for branch main; project 4 has none
MAX_BYTES = 8 * 1024 * 1024


@dataclass
class Api:
    url: str
    port: int
    env: ServiceRun
    topic: str
    root: Path
    proc: subprocess.Popen[bytes]

    def put(self, project: object, commit: str, path: str, body: object = b"",
            token: str | None = TOKEN, **headers: str) -> httpx.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.put(self.url_of(project, commit, path), content=body,  # type: ignore[arg-type]
                         headers=headers, timeout=60)

    def url_of(self, project: object, commit: str, path: str) -> str:
        encoded = "/".join(quote(s, safe="") for s in path.split("/"))
        return f"{self.url}/artifacts/{quote(str(project), safe='')}/{commit}/{encoded}"

    def files(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.root)): p.read_bytes() for p in self.root.rglob("*")
                if p.is_file()}

    def announced(self, expected: int) -> list[dict[str, object]]:
        return [orjson.loads(m.value())
                for m in consume(self.env.env["KAFKA_BOOTSTRAP_SERVERS"],
                                 f"{self.topic}.artifacts", expected)]


@pytest.fixture
def api(request: pytest.FixtureRequest, service_env: ServiceRun, broker: Broker,
        redis_address: str, redis_prefix: str) -> Iterator[Api]:
    """The service with uploads on; a test may add settings with an indirect parameter."""
    topic = f"uploads-{uuid.uuid4().hex[:8]}"
    port = free_port()
    root = service_env.cwd / "store"
    with running_simulator(SPEC) as sim:
        service_env.env.update({
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": topic,
            "REDIS_ADDRESS": redis_address, "REDIS_KEY_PREFIX": redis_prefix,
            "WEBHOOK_PORT": str(port), "WEBHOOK_SECRET": "hook-secret-123",
            "WEBHOOK_MAX_BODY": "65536", "KAFKA_DELIVERY_TIMEOUT": "3",
            "ARTIFACT_STORE_URL": f"file://{root}", "ARTIFACT_UPLOAD_TOKEN": TOKEN,
            "ARTIFACT_MAX_BYTES": str(MAX_BYTES), "ARTIFACT_IDLE_TIMEOUT": "2",
            "SHUTDOWN_GRACE": "1",
            "CAPTURE_RULES": orjson.dumps([{"project": str(RULED), "branch": "main"}]).decode(),
            "SCHEDULING_POLL_INTERVAL": "30", **getattr(request, "param", {}),
        })
        proc = service_env.start("run")
        try:
            wait_for_port(port)
            yield Api(f"http://127.0.0.1:{port}", port, service_env, topic, root, proc)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
    assert TOKEN not in service_env.all_logs()


def payload(size: int, seed: str) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def user_with(project: int, low: int, high: int = 99) -> str:
    return next(f"user{u}" for u, level in members(project, SPEC.users)
                if low <= level < high and u != 1)


def test_an_upload_is_stored_byte_exact_announced_once_and_listed(api: Api) -> None:
    commit = branch_commits(FREE, BRANCHES[1])[-1]  # any branch: project 4 has no rule
    data = payload(3 * 1024 * 1024 + 17, "jar")
    path = "dist/my app+1%.jar"
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    full_path = f"group{FREE}/project-{FREE}"
    answer = api.put(full_path, commit, path, data, Digest=f"sha-256={digest}")
    assert answer.status_code == 201, answer.text
    record = answer.json()
    assert record == {"project_id": FREE, "commit": commit, "path": path, "size": len(data),
                      "sha256": hashlib.sha256(data).hexdigest(),
                      "url": f"file://{api.root}/{FREE}/{commit}/{path}"}
    stored = api.root / str(FREE) / commit / path
    assert stored.read_bytes() == data
    before = stored.stat()
    again = api.put(FREE, commit, path, data)
    assert again.status_code == 200 and again.json() == record
    assert (stored.stat().st_ino, stored.stat().st_mtime_ns) == (before.st_ino,
                                                                 before.st_mtime_ns)
    assert api.announced(1) == [record]  # once, although uploaded twice
    listed = httpx.get(f"{api.url}/artifacts/{FREE}/{commit}/",
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert listed.status_code == 200
    assert listed.json() == {"project_id": FREE, "commit": commit, "artifacts": [
        {"path": path, "size": len(data), "url": record["url"]}]}
    assert httpx.get(f"{api.url}/artifacts/{FREE}/{commit}/", timeout=30).status_code == 401
    stranger = next(f"user{u}" for u in range(2, SPEC.users + 1)
                    if u not in dict(members(FREE, SPEC.users)))
    hidden = httpx.get(f"{api.url}/artifacts/{FREE}/{commit}/", timeout=30,
                       headers={"Authorization": f"Bearer {TOKEN}", "X-Gitlab-User": stranger})
    assert hidden.status_code == 403


def test_each_refusal_stores_and_announces_nothing(api: Api) -> None:
    main = branch_commits(RULED, BRANCHES[0])
    feature_only = branch_commits(RULED, BRANCHES[1])[-1]
    data = payload(200_000, "refused")
    kept = api.put(RULED, main[2], "app.jar", data)  # the file the 409 case meets
    assert kept.status_code == 201, kept.text
    developer, reporter = user_with(RULED, 30, 40), user_with(RULED, 20, 30)
    stranger = next(f"user{u}" for u in range(2, SPEC.users + 1)
                    if u not in dict(members(RULED, SPEC.users)))
    cases: list[tuple[int, str, dict[str, object]]] = [
        (401, "no token", {"token": None}),
        (401, "wrong token", {"token": "upload-token-wrong-00000"}),
        (400, "dot-dot", {"path": "../../escape.jar"}),
        (400, "encoded dot-dot", {"raw": f"/artifacts/{RULED}/{main[1]}/a/%2E%2E/%2E%2E/x"}),
        (400, "absolute", {"raw": f"/artifacts/{RULED}/{main[1]}/%2Fetc%2Fpasswd"}),
        (400, "backslash", {"path": "dist\\app.jar"}),
        (400, "NUL", {"path": "dist/app\x00.jar"}),
        (400, "short sha", {"commit": main[1][:8]}),
        (404, "unknown project", {"project": 999}),
        (404, "unknown commit", {"commit": "0" * 40}),
        (404, "commit of another project", {"commit": branch_commits(FREE, BRANCHES[1])[-1]}),
        (404, "commit not on the rule's branch", {"commit": feature_only}),
        (403, "reporter", {"X-Gitlab-User": reporter}),
        (403, "stranger", {"X-Gitlab-User": stranger}),
        (403, "developer overwriting", {"X-Gitlab-User": developer, "query": "?overwrite=true"}),
        (403, "overwrite without a user", {"query": "?overwrite=true"}),
        (413, "streamed too large",  # chunked: counted as it arrives; all of it sent
         {"body": iter([payload(1024 * 1024, "c")] * (MAX_BYTES // 2**20) + [b"!"])}),
        (422, "digest mismatch", {"X-Checksum-Sha256": "ab" * 32}),
        (422, "Digest mismatch", {"Digest": "sha-256=" + base64.b64encode(b"x" * 32).decode()}),
        (409, "a different file", {"commit": main[2], "path": "app.jar", "body": data[::-1]}),
    ]
    for status, name, case in cases:
        headers = {k: str(v) for k, v in case.items() if k.startswith("X-") or k == "Digest"}
        body = case.get("body", data)
        if "raw" in case:
            answer = httpx.put(f"{api.url}{case['raw']}", content=data, timeout=60,
                               headers={"Authorization": f"Bearer {TOKEN}"})
        else:
            url = api.url_of(case.get("project", RULED), str(case.get("commit", main[1])),
                             str(case.get("path", "dist/app.jar"))) + str(case.get("query", ""))
            if "token" in case and case["token"] is None:
                auth = {}
            else:
                auth = {"Authorization": f"Bearer {case.get('token', TOKEN)}"}
            answer = httpx.put(url, content=body, headers={**auth, **headers},  # type: ignore[arg-type]
                               timeout=60)
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert answer.json()["reason"], name
    declared = _raw_request(api.port, f"PUT /artifacts/{RULED}/{main[1]}/big.jar HTTP/1.1\r\n"
                                      f"Host: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                      f"Content-Length: {MAX_BYTES + 1}\r\n"
                                      "Expect: 100-continue\r\n\r\n")
    assert _read_head(declared).startswith("HTTP/1.1 413")  # before a byte of the body
    declared.close()
    assert api.files() == {f"{RULED}/{main[2]}/app.jar": data}
    records = api.announced(1)
    assert [r["path"] for r in records] == ["app.jar"]
    assert api.put(RULED, main[1], "dist/app.jar", data,  # a Developer may upload
                   **{"X-Gitlab-User": developer}).status_code == 201


def test_a_maintainer_may_overwrite(api: Api) -> None:
    commit = branch_commits(RULED, BRANCHES[0])[-1]
    maintainer = user_with(RULED, 40)
    assert api.put(RULED, commit, "app.jar", b"first").status_code == 201
    answer = httpx.put(api.url_of(RULED, commit, "app.jar") + "?overwrite=true",
                       content=b"second", timeout=30,
                       headers={"Authorization": f"Bearer {TOKEN}", "X-Gitlab-User": maintainer})
    assert answer.status_code == 201, answer.text
    assert (api.root / str(RULED) / commit / "app.jar").read_bytes() == b"second"
    assert [r["sha256"] for r in api.announced(2)] == [
        hashlib.sha256(b"first").hexdigest(), hashlib.sha256(b"second").hexdigest()]


def _raw_request(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode())
    return sock


def _read_head(sock: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return data.decode(errors="replace")


def test_an_upload_cut_off_midway_leaves_nothing(api: Api) -> None:
    commit = branch_commits(RULED, BRANCHES[0])[5]
    data = payload(6 * 1024 * 1024, "cut")
    sock = _raw_request(api.port, f"PUT /artifacts/{RULED}/{commit}/cut.jar HTTP/1.1\r\n"
                                  f"Host: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                  f"Content-Length: {len(data)}\r\n\r\n")
    sock.sendall(data[:3 * 1024 * 1024])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(api.root.rglob("*.partial")):
        time.sleep(0.05)  # the service is writing its temporary file
    assert any(api.root.rglob("*.partial"))
    sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "artifact_upload_interrupted" not in api.env.all_logs():
        time.sleep(0.1)
    assert "artifact_upload_interrupted" in api.env.all_logs()
    assert api.files() == {}
    assert api.put(RULED, commit, "cut.jar", data).status_code == 201  # a retry succeeds
    assert api.files() == {f"{RULED}/{commit}/cut.jar": data}


def _half_sent(api: Api, commit: str, size: int) -> socket.socket:
    """An upload of ``size`` bytes of which half was sent, once its temporary file exists."""
    sock = _raw_request(api.port, f"PUT /artifacts/{RULED}/{commit}/half.jar HTTP/1.1\r\n"
                                  f"Host: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                  f"Content-Length: {size}\r\n\r\n")
    sock.sendall(payload(size // 2, "half"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(api.root.rglob("*.partial")):
        time.sleep(0.05)
    assert any(api.root.rglob("*.partial"))
    return sock


def test_a_stalled_upload_gets_408_and_leaves_nothing(api: Api) -> None:
    sock = _half_sent(api, branch_commits(RULED, BRANCHES[0])[7], 4 * 1024 * 1024)
    started = time.monotonic()
    head = _read_head(sock)  # ARTIFACT_IDLE_TIMEOUT is 2 s here; the socket's timeout 30 s
    assert head.startswith("HTTP/1.1 408"), head
    assert time.monotonic() - started < 20
    sock.close()
    assert api.files() == {}


@pytest.mark.parametrize("api", [{"ARTIFACT_IDLE_TIMEOUT": "60"}], indirect=True)
def test_sigterm_during_an_upload_stops_promptly_and_leaves_nothing(api: Api) -> None:
    sock = _half_sent(api, branch_commits(RULED, BRANCHES[0])[8], 4 * 1024 * 1024)
    stop = threading.Event()

    def trickle() -> None:  # a slow client, never idle long enough for the 408
        with contextlib.suppress(OSError):
            while not stop.wait(0.2):
                sock.sendall(b"x" * 1024)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        started = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        assert api.proc.wait(10) == 0
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        sender.join(10)
        sock.close()
    assert api.files() == {}


def test_expect_continue_refuses_before_the_body_is_sent(api: Api) -> None:
    commit = branch_commits(RULED, BRANCHES[0])[6]
    head = (f"PUT /artifacts/{RULED}/{commit}/e.jar HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: 5\r\nExpect: 100-continue\r\n")
    refused = _raw_request(api.port, head + "Authorization: Bearer nope-nope-nope-nope\r\n\r\n")
    assert _read_head(refused).startswith("HTTP/1.1 401")
    refused.close()
    accepted = _raw_request(api.port, head + f"Authorization: Bearer {TOKEN}\r\n\r\n")
    assert _read_head(accepted).startswith("HTTP/1.1 100 Continue")
    accepted.sendall(b"hello")
    assert _read_head(accepted).startswith("HTTP/1.1 201")
    accepted.close()
    assert api.files() == {f"{RULED}/{commit}/e.jar": b"hello"}
    other_size = _raw_request(api.port, head.replace("Content-Length: 5", "Content-Length: 6")
                              + f"Authorization: Bearer {TOKEN}\r\n\r\n")
    assert _read_head(other_size).startswith("HTTP/1.1 409")  # known from the length alone
    other_size.close()
    assert api.files() == {f"{RULED}/{commit}/e.jar": b"hello"}


def test_concurrent_uploads_of_different_commits(api: Api) -> None:
    commits = branch_commits(RULED, BRANCHES[0])[:6]
    bodies = {c: payload(1024 * 1024 + i, c) for i, c in enumerate(commits)}
    statuses: dict[str, int] = {}

    def upload(commit: str) -> None:
        statuses[commit] = api.put(RULED, commit, "build/app.jar", bodies[commit]).status_code

    threads = [threading.Thread(target=upload, args=(c,)) for c in commits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses == {c: 201 for c in commits}
    assert api.files() == {f"{RULED}/{c}/build/app.jar": bodies[c] for c in commits}
    records = api.announced(len(commits))
    assert sorted(r["commit"] for r in records) == sorted(commits)
    assert {r["commit"]: r["sha256"] for r in records} == {
        c: hashlib.sha256(b).hexdigest() for c, b in bodies.items()}


def test_broker_down_gives_503_removes_the_file_and_the_retry_lands(api: Api,
                                                                    broker: Broker) -> None:
    commit = branch_commits(RULED, BRANCHES[0])[9]
    data = payload(300_000, "outage")
    broker.pause()
    try:
        refused = api.put(RULED, commit, "app.jar", data)
    finally:
        broker.resume()
    assert refused.status_code == 503, refused.text
    assert api.files() == {}  # stored means announced: the file went again
    deadline = time.monotonic() + 60
    answer = refused
    while time.monotonic() < deadline and answer.status_code != 201:  # the build tool retries
        time.sleep(0.5)
        answer = api.put(RULED, commit, "app.jar", data)
    assert answer.status_code == 201, answer.text
    assert api.files() == {f"{RULED}/{commit}/app.jar": data}
    assert [r["commit"] for r in api.announced(1)] == [commit]
