"""Sinks: Kafka in production, a JSON-lines file or stdout on a machine without Kafka."""

from __future__ import annotations

from gitlab_producer.config import Settings
from gitlab_producer.sinks.base import DeliveryError, Message, Sink
from gitlab_producer.sinks.file import FileSink

__all__ = ["DeliveryError", "FileSink", "Message", "Sink", "open_sink"]


def open_sink(settings: Settings, topic: str | None = None, low_latency: bool = False) -> Sink:
    """Kafka when ``KAFKA_BOOTSTRAP_SERVERS`` is set, else the file sink. ``low_latency``:
    send each message at once instead of lingering to fill batches (webhooks wait on it)."""
    name = topic or settings.kafka_topic
    if settings.kafka_bootstrap_servers:
        from gitlab_producer.sinks.kafka import KafkaSink, kafka_config

        config = kafka_config(settings)
        if low_latency:
            config["linger.ms"] = 0
        return KafkaSink(config, name)
    return FileSink(settings.output_file, name)
