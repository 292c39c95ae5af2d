"""Sinks: Kafka in production, a JSON-lines file or stdout on a machine without Kafka."""

from __future__ import annotations

from gitlab_producer.config import ConfigError, Settings
from gitlab_producer.sinks.base import DeliveryError, Message, MessageTooLarge, Sink
from gitlab_producer.sinks.file import FileSink

__all__ = ["DeliveryError", "FileSink", "Message", "MessageTooLarge", "Sink", "open_sink"]
# Room for a webhook message's key, headers and record framing beyond its body.
HOOK_MESSAGE_MARGIN = 64 * 1024


def open_sink(settings: Settings, topic: str | None = None, low_latency: bool = False) -> Sink:
    """Kafka when ``KAFKA_BOOTSTRAP_SERVERS`` is set, else the file sink. ``low_latency`` (the
    webhook sink): send each message at once instead of lingering to fill batches, give up
    after ``WEBHOOK_DELIVERY_TIMEOUT`` (GitLab waits 10 s), and accept messages as large as
    ``WEBHOOK_MAX_BODY`` (librdkafka's default ``message.max.bytes`` is 1 MB). An
    ``OUTPUT_FILE`` that cannot be opened is a :class:`ConfigError`."""
    name = topic or settings.kafka_topic
    if settings.kafka_bootstrap_servers:
        from gitlab_producer.sinks.kafka import KafkaSink, kafka_config

        config = kafka_config(settings)
        if low_latency:
            config["linger.ms"] = 0
            config["message.timeout.ms"] = int(settings.webhook_delivery_timeout * 1000)
            config["message.max.bytes"] = max(config.get("message.max.bytes", 1_000_000),
                                              settings.webhook_max_body + HOOK_MESSAGE_MARGIN)
        return KafkaSink(config, name)
    try:
        return FileSink(settings.output_file, name)
    except OSError as exc:
        raise ConfigError(f"OUTPUT_FILE: {settings.output_file} cannot be opened: "
                          f"{exc.strerror or exc}") from None
