"""The deployment files read correctly: no Docker engine runs here, so they are checked by
reading them against what the service really has (variables, metrics, ports)."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import yaml

from gitlab_producer.config import Settings
from gitlab_producer.metrics import Metrics

ROOT = Path(__file__).parents[2]
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def metric_names() -> set[str]:
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum",
                                                                      "_count")}
    return {metric.name + suffix for metric in Metrics().registry.collect()
            for suffix in suffixes[metric.type]}


def test_compose_wires_kafka_redis_and_the_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "redis", "gitlab-producer"}
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    producer = services["gitlab-producer"]
    assert producer["image"] == "gitlab-producer:latest"
    assert set(producer["environment"]) <= SETTING_NAMES
    assert producer["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert producer["environment"]["REDIS_ADDRESS"] == "redis:6379"
    # Marks and cursors must survive a Redis restart (README: AOF or RDB persistence).
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for dependency in producer["depends_on"].values():
        assert dependency["condition"] == "service_healthy"
    # Two replicas share Redis (issue 15): each needs a host port of its own.
    replicas = producer["deploy"]["replicas"]
    assert replicas == 2
    for mapping in producer["ports"]:
        host = mapping.rpartition(":")[0]
        first, _, last = host.partition("-")
        assert int(last or first) - int(first) + 1 == replicas, mapping


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"^USER app", text, re.M)
    assert re.search(r'^ENTRYPOINT \["gitlab-producer"\]', text, re.M)
    assert "/healthz" in text


def test_gitlab_ci_lints_tests_builds_and_publishes_on_tags() -> None:
    ci = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())
    assert ci["stages"] == ["lint", "test", "build", "publish"]
    scripts = {job: " ".join(body["script"]) for job, body in ci.items()
               if isinstance(body, dict) and "script" in body}
    assert "make lint" in scripts["lint"] and "make test" in scripts["test"]
    assert ci["publish-image"]["rules"] == [{"if": "$CI_COMMIT_TAG"}]


def test_dashboard_and_alerts_use_only_real_metrics() -> None:
    known = metric_names()
    dashboard = orjson.loads((ROOT / "deploy/grafana/gitlab-producer.json").read_bytes())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = {name for expr in exprs for name in re.findall(r"gitlab_producer_[a-z_]+", expr)}
    assert used and used <= known, used - known
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Events fetched vs produced", "Object import (backfill)",
            "Objects fetched vs imported"} <= titles
    alert_names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert {"GitlabProducerRoundStalled", "GitlabProducerBrokerFailing",
            "GitlabProducerSustained429"} <= alert_names
