"""Records per second of a full read of projects, issues and merge requests: ours against
Airbyte's ``airbyte-source-gitlab`` and singer-io's ``tap-gitlab`` 1.0.1, one after the other
against one simulator in one run, each from process start to exit, with the requests each made.

The peers are installed from PyPI into their own venvs under ``bench/peers/`` (created when
missing). Airbyte takes the simulator's address as its documented ``api_url``
(``http://127.0.0.1:<port>``). tap-gitlab 1.0.1 has no such option (its client reads
``https://gitlab.com/api/v4``), so it runs unchanged behind ``bench/tls_proxy.py``: requests'
``HTTPS_PROXY`` sends its connections to a loopback proxy that answers TLS for gitlab.com with
a self-signed certificate (trusted through ``REQUESTS_CA_BUNDLE``) and passes them to the
simulator. tap-gitlab has no merge request stream: it is compared with our read of projects and
issues. The simulator has no switched-off features here (``--feature-off-share 0``): tap-gitlab
stops its whole sync at the first 403. Airbyte, at about 1.6 s per project, reads only the first
``BENCH_AIRBYTE_PROJECTS`` (200) of the ``BENCH_PEER_PROJECTS`` (2,000) the others read: its
rate is per record, and a full run would take about an hour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.backfill_figures import backfill_env, run_measured
from bench.harness import Simulator, cpu_seconds, simulator, stop

PEERS = Path(__file__).parent / "peers"  # the peers' venvs (gitignored)
TAP = ("tap-gitlab", "tap-gitlab==1.0.1")
AIRBYTE = ("airbyte", "airbyte-source-gitlab")
KINDS = ("projects", "issues", "merge_requests")
START_DATE = "2000-01-01T00:00:00Z"


@dataclass
class Run:
    """One measured read: records per kind, wall and CPU seconds, peak RSS, requests."""

    name: str
    records: Counter[str]
    wall_s: float
    cpu_s: float
    peak_mb: float
    requests: int
    code: int
    routes: dict[str, int] | None = None  # requests per simulator route

    def rate(self, kinds: tuple[str, ...] = KINDS) -> float:
        return sum(self.records[k] for k in kinds) / self.wall_s

    def text(self) -> str:
        counts = ", ".join(f"{k} {self.records[k]}" for k in KINDS if k in self.records)
        routes = f" {self.routes}" if self.routes else ""
        return (f"{self.name}: {counts} in {self.wall_s:.1f} s ({self.cpu_s:.1f} s CPU, "
                f"{self.peak_mb:.0f} MB), {self.requests} requests{routes}, exit {self.code}")


def routes(stats: dict[str, Any]) -> dict[str, int]:
    return {name: sum(by_status.values()) for name, by_status in stats["by_route"].items()}


def venv(name: str, requirement: str) -> Path:
    """The venv of a peer, created with ``python -m venv`` and pip when missing."""
    home = PEERS / name
    python = home / "bin" / "python"
    marker = home / ".installed"
    if not marker.exists() or marker.read_text() != requirement:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], check=True,
                       timeout=1200)
        marker.write_text(requirement)
    return home / "bin"


def project_ids(sim: Simulator) -> list[int]:
    ids: list[int] = []
    page: str | None = "1"
    while page:
        answer = httpx.get(f"{sim.url}/api/v4/projects", params={"per_page": 100, "page": page},
                           headers={"PRIVATE-TOKEN": "sim-token"}, timeout=60)
        ids += [p["id"] for p in answer.json()]
        page = answer.headers.get("X-Next-Page")
    return sorted(ids)


def singer_records(path: Path) -> Counter[str]:
    """RECORD messages per stream in a Singer or Airbyte output."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        message = json.loads(line)
        if message.get("type") == "RECORD":
            record = message.get("record")
            stream = message.get("stream") or (record or {}).get("stream")
            counts[str(stream)] += 1
    return counts


def ours(sim: Simulator, tmp: Path, kinds: tuple[str, ...]) -> Run:
    work = tmp / f"ours-{len(kinds)}"
    work.mkdir()
    env = backfill_env(sim, work, BACKFILL_KINDS=",".join(kinds))
    sim.reset_stats()
    code, wall, cpu, peak = run_measured([sys.executable, "-m", "gitlab_producer", "backfill"],
                                         env)
    stats = sim.stats()
    counts: Counter[str] = Counter(json.loads(line)["topic"].rsplit(".", 1)[1] for line
                                   in (work / "objects.jsonl").read_text().splitlines())
    return Run(f"ours ({', '.join(kinds)})", counts, wall, cpu, peak,
               int(stats["total"]), code, routes(stats))


def peer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def tap_gitlab(sim: Simulator, tmp: Path, ids: list[int]) -> Run:
    bin_dir = venv(*TAP)
    cert, key = tmp / "gitlab.com.pem", tmp / "gitlab.com.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=gitlab.com", "-addext", "subjectAltName=DNS:gitlab.com",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = int(sim.url.rsplit(":", 1)[1])
    proxy = subprocess.Popen([sys.executable, str(Path(__file__).parent / "tls_proxy.py"),
                              str(port), str(cert), str(key)], stdout=subprocess.PIPE)
    try:
        assert proxy.stdout is not None
        proxy_port = int(proxy.stdout.readline().split()[1])
        env = peer_env(HTTPS_PROXY=f"http://127.0.0.1:{proxy_port}",
                       REQUESTS_CA_BUNDLE=str(cert))
        config = tmp / "tap_config.json"
        config.write_text(json.dumps({"private_token": "sim-token", "start_date": START_DATE,
                                      "groups": "", "projects": " ".join(map(str, ids))}))
        found = subprocess.run([str(bin_dir / "tap-gitlab"), "--config", str(config),
                                "--discover"], env=env, capture_output=True, check=True,
                               timeout=300)
        catalog = json.loads(found.stdout)
        for entry in catalog["streams"]:  # every stream stays listed (the tap needs them)
            for meta in entry["metadata"]:
                if meta["breadcrumb"] == []:
                    meta["metadata"]["selected"] = entry["tap_stream_id"] in KINDS
        (tmp / "tap_catalog.json").write_text(json.dumps(catalog))
        out = tmp / "tap_out.jsonl"
        proxy_before = cpu_seconds(proxy.pid)
        sim.reset_stats()
        with out.open("wb") as sink:
            code, wall, cpu, peak = run_measured(
                [str(bin_dir / "tap-gitlab"), "--config", str(config), "--catalog",
                 str(tmp / "tap_catalog.json")], env, sink)
        stats = sim.stats()
        proxy_cpu = cpu_seconds(proxy.pid) - proxy_before
    finally:
        stop(proxy)
    return Run(f"tap-gitlab 1.0.1 (projects, issues; the proxy used {proxy_cpu:.2f} s CPU)",
               singer_records(out), wall, cpu, peak,
               int(stats["total"]), code, routes(stats))


def airbyte(sim: Simulator, tmp: Path, ids: list[int]) -> Run:
    bin_dir = venv(*AIRBYTE)
    env = peer_env()
    config = tmp / "airbyte_config.json"
    config.write_text(json.dumps({
        "credentials": {"auth_type": "access_token", "access_token": "sim-token"},
        "api_url": sim.url, "start_date": START_DATE, "projects_list": [str(i) for i in ids]}))
    found = subprocess.run([str(bin_dir / "source-gitlab"), "discover", "--config",
                            str(config)], env=env, capture_output=True, check=True, timeout=300)
    catalog = next(m["catalog"] for m in map(json.loads, found.stdout.splitlines())
                   if m.get("type") == "CATALOG")
    streams = []
    for entry in catalog["streams"]:
        if entry["name"] in KINDS:
            incremental = "incremental" in entry["supported_sync_modes"]
            streams.append({"stream": entry, "destination_sync_mode": "append",
                            "sync_mode": "incremental" if incremental else "full_refresh",
                            **({"cursor_field": entry["default_cursor_field"]}
                               if incremental else {})})
    (tmp / "airbyte_catalog.json").write_text(json.dumps({"streams": streams}))
    out = tmp / "airbyte_out.jsonl"
    sim.reset_stats()
    with out.open("wb") as sink:
        code, wall, cpu, peak = run_measured(
            [str(bin_dir / "source-gitlab"), "read", "--config", str(config), "--catalog",
             str(tmp / "airbyte_catalog.json")], env, sink)
    stats = sim.stats()
    return Run(f"airbyte-source-gitlab {installed(bin_dir, 'airbyte-source-gitlab')}",
               singer_records(out), wall, cpu, peak,
               int(stats["total"]), code, routes(stats))


def installed(bin_dir: Path, package: str) -> str:
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "show", package],
                          capture_output=True, text=True, check=False)
    return next((line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                 if line.startswith("Version:")), "?")


def backfill_peers() -> list[dict[str, Any]]:
    projects = int(os.environ.get("BENCH_PEER_PROJECTS", "2000"))
    # Airbyte needs ~1.6 s per project here: it reads the first of the same projects.
    airbyte_projects = int(os.environ.get("BENCH_AIRBYTE_PROJECTS", "200"))
    with (simulator(projects, 100, 2000, feature_off_share=0) as sim,
          tempfile.TemporaryDirectory(prefix="gp-peers-") as tmp_name):
        tmp = Path(tmp_name)
        ids = project_ids(sim)
        mine = ours(sim, tmp, KINDS)
        mine_two = ours(sim, tmp, ("projects", "issues"))
        tap = tap_gitlab(sim, tmp, ids)
        print(f"   {mine.text()}\n   {mine_two.text()}\n   {tap.text()}", flush=True)
        if os.environ.get("BENCH_SKIP_AIRBYTE"):  # while working on the figure: not saved
            raise SystemExit("BENCH_SKIP_AIRBYTE set: Airbyte not measured")
        byte = airbyte(sim, tmp, ids[:airbyte_projects])
    two = ("projects", "issues")
    setup = (f"{projects} projects (Airbyte: the first {min(projects, airbyte_projects)} of "
             f"them), simulator without switched-off features, every tool reads its projects "
             f"from their start (no bookmark)")
    return [
        {"figure": "backfill: records/s vs Airbyte", "value": round(mine.rate() / byte.rate(), 1),
         "unit": "x", "limit": ">= 50", "ratio": round(mine.rate() / byte.rate() / 50, 3),
         "detail": f"{setup}; ours {mine.rate():.0f} records/s, Airbyte {byte.rate():.1f} "
                   f"records/s; {mine.text()}; {byte.text()}"},
        {"figure": "backfill: records/s vs tap-gitlab", "value":
         round(mine_two.rate(two) / tap.rate(two), 1), "unit": "x", "limit": ">= 3",
         "ratio": round(mine_two.rate(two) / tap.rate(two) / 3, 3),
         "detail": f"{setup}; on projects and issues (tap-gitlab has no merge requests): ours "
                   f"{mine_two.rate(two):.0f} records/s, tap-gitlab {tap.rate(two):.0f} "
                   f"records/s; {mine_two.text()}; {tap.text()} (through the loopback TLS "
                   f"proxy, bench/tls_proxy.py)"},
    ]
