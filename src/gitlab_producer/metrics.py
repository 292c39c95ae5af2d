"""Every Prometheus metric of the service, in one place (``gitlab_producer_`` prefix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The service's metrics on their own registry (one per service instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.gitlab_requests = Counter(
            "gitlab_producer_gitlab_requests_total", "GitLab API requests by endpoint and status",
            ["endpoint", "status"], registry=r)
        self.gitlab_latency = Histogram(
            "gitlab_producer_gitlab_request_duration_seconds", "GitLab API request latency",
            ["endpoint"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.gitlab_clock_skew = Gauge(
            "gitlab_producer_gitlab_clock_skew_seconds",
            "The host's clock minus GitLab's, from GitLab's Date header (positive: the host is "
            "ahead); cursors and windows use GitLab's time", registry=r)
        self.rate_limit_wait = Counter(
            "gitlab_producer_rate_limit_wait_seconds_total",
            "Time spent waiting for the request budget or a 429 pause", registry=r)
        self.throttled = Counter(
            "gitlab_producer_gitlab_throttled_total", "429 answers from GitLab", registry=r)
        self.retries = Counter(
            "gitlab_producer_gitlab_retries_total", "Retried GitLab requests by reason",
            ["reason"], registry=r)
        self.events_fetched = Counter(
            "gitlab_producer_events_fetched_total", "Events read from GitLab", ["source"],
            registry=r)
        self.events_produced = Counter(
            "gitlab_producer_events_produced_total", "Events acknowledged by the sink", ["kind"],
            registry=r)
        self.events_duplicate = Counter(
            "gitlab_producer_events_skipped_duplicate_total",
            "Events skipped because they were already sent", registry=r)
        self.delivery_failures = Counter(
            "gitlab_producer_delivery_failures_total", "Messages the sink failed to deliver",
            registry=r)
        self.round_duration = Histogram(
            "gitlab_producer_round_duration_seconds", "Duration of sync rounds", ["outcome"],
            registry=r, buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.rounds = Counter(
            "gitlab_producer_rounds_total", "Sync rounds by outcome", ["outcome"], registry=r)
        self.last_success = Gauge(
            "gitlab_producer_last_successful_round_timestamp_seconds",
            "Unix time when the last successful round started", registry=r)
        self.queue_depth = Gauge(
            "gitlab_producer_queue_depth", "Entities waiting to be synced", ["queue"], registry=r)
        self.newest_event_age = Gauge(
            "gitlab_producer_newest_delivered_event_age_seconds",
            "Age of the newest delivered event when it was acknowledged", registry=r)
        self.entities_synced = Counter(
            "gitlab_producer_entities_synced_total", "Projects or users whose events were read",
            ["kind"], registry=r)
        self.webhooks = Counter(
            "gitlab_producer_webhooks_total", "Webhook deliveries by kind and answer",
            ["kind", "status"], registry=r)
        self.webhook_duration = Histogram(
            "gitlab_producer_webhook_duration_seconds",
            "From a webhook request's arrival to its answer (200 only after Kafka's ack)",
            registry=r, buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                 5, 10))
        self.store_state_lost = Counter(
            "gitlab_producer_store_state_lost_total",
            "Times the store was found without the state this process wrote (marks and "
            "cursors lost: e.g. a Redis restarted without persistence)", registry=r)
        self.store_retries = Counter(
            "gitlab_producer_store_retries_total",
            "Start-up steps or rounds retried because the store could not be reached",
            registry=r)
        self.artifact_requests = Counter(
            "gitlab_producer_artifact_requests_total",
            "Artifact hand-back requests (upload, list) by answer", ["kind", "status"],
            registry=r)
        self.artifact_bytes = Counter(
            "gitlab_producer_artifact_bytes_stored_total",
            "Bytes of artifacts handed back and stored (identical repeats not counted)",
            registry=r)
        self.webhook_inflight_bytes = Gauge(
            "gitlab_producer_webhook_inflight_bytes",
            "Bytes of webhook bodies being read, checked or produced (WEBHOOK_MAX_INFLIGHT_BYTES)",
            registry=r)
        self.captures = Counter(
            "gitlab_producer_captures_total",
            "Captures triggered by hooks, by outcome (captured, ignored, failed, abandoned)",
            ["outcome"], registry=r)
        self.captures_pending = Gauge(
            "gitlab_producer_captures_pending", "Captures triggered by hooks still running",
            registry=r)
        self.entity_failures = Counter(
            "gitlab_producer_entity_failures_total", "Projects or users that failed in a round",
            ["kind"], registry=r)
        self.entities_skipped = Counter(
            "gitlab_producer_entities_skipped_total",
            "Projects or users skipped in a round (403 forbidden, 404 not found); retried later",
            ["kind", "reason"], registry=r)
        self.entities_retrying = Gauge(
            "gitlab_producer_entities_retrying", "Skipped or failed entities kept for retry",
            ["kind"], registry=r)
        self.records_skipped = Counter(
            "gitlab_producer_records_skipped_total",
            "Records (events, objects) not produced, by kind and reason (too_large: over "
            "KAFKA_MESSAGE_MAX_BYTES or the topic's max.message.bytes)",
            ["kind", "reason"], registry=r)
        self.malformed_records = Counter(
            "gitlab_producer_malformed_records_total",
            "Records GitLab listed without the fields the sync needs (skipped), by list",
            ["list"], registry=r)
        # -- the object import (gitlab-producer backfill / worker) ------------------------
        self.objects_fetched = Counter(
            "gitlab_producer_objects_fetched_total", "Objects read from GitLab by kind",
            ["kind"], registry=r)
        self.objects_imported = Counter(
            "gitlab_producer_objects_imported_total",
            "Objects in Kafka after a delivery (produced now or before) by kind", ["kind"],
            registry=r)
        self.objects_produced = Counter(
            "gitlab_producer_objects_produced_total",
            "Object versions produced (acknowledged by the sink) by kind", ["kind"], registry=r)
        self.backfill_jobs = Counter(
            "gitlab_producer_backfill_jobs_total",
            "Import jobs by outcome (done, failed, retried, rescheduled, redispatched)",
            ["outcome"], registry=r)
        self.backfill_jobs_running = Gauge(
            "gitlab_producer_backfill_jobs_running", "Import jobs running in this process",
            registry=r)
        self.backfill_stage_duration = Histogram(
            "gitlab_producer_backfill_stage_duration_seconds",
            "Duration of a project's import stage", ["stage"], registry=r,
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))
        self.backfill_projects = Gauge(
            "gitlab_producer_backfill_projects", "Projects of the import by status",
            ["status"], registry=r)
        self.user_lookups = Counter(
            "gitlab_producer_user_lookups_total",
            "User lookups of the import, answered by the cache or by GitLab", ["result"],
            registry=r)
        # The request budget (shared by all instances on one Redis, or this process's own).
        self.budget_limit = Gauge(
            "gitlab_producer_budget_limit_per_second",
            "OPERATIONS_PER_SECOND: the token's request budget across all instances", registry=r)
        self.budget_reserved = Counter(
            "gitlab_producer_budget_reserved_total",
            "Request slots this instance reserved in the shared budget and sent a request in "
            "(sum over instances / limit = the budget's use)", registry=r)
        self.budget_wait = Histogram(
            "gitlab_producer_budget_wait_seconds",
            "How long a request waited for its slot in the shared budget", registry=r,
            buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.budget_missed = Counter(
            "gitlab_producer_budget_missed_total",
            "Slots this instance left unused: its request woke too late for them (it took "
            "another)", registry=r)
        self.budget_fallbacks = Counter(
            "gitlab_producer_budget_fallbacks_total",
            "Requests limited by this process alone because Redis did not answer", registry=r)
        # Claims across instances (Redis store).
        self.claims_held_elsewhere = Counter(
            "gitlab_producer_claims_held_elsewhere_total",
            "Events met while another instance was delivering them (waited for)",
            registry=r)
        self.claims_taken_over = Counter(
            "gitlab_producer_claims_taken_over_total",
            "Events this instance delivered after the instance holding them gave them up or "
            "died (its claim expired)", registry=r)
        # Instances on one Redis (heartbeats: gitlab_producer.instances).
        self.instances_alive = Gauge(
            "gitlab_producer_instances_alive",
            "Instances whose heartbeat in Redis is recent (as this instance last saw it)",
            registry=r)
        # Shared rounds (Redis store: gitlab_producer.sync.shared_rounds).
        self.round_jobs = Counter(
            "gitlab_producer_round_jobs_total",
            "Jobs of the shared rounds this instance finished, by kind (discover, project, "
            "user)", ["kind"], registry=r)
        self.round_jobs_taken_over = Counter(
            "gitlab_producer_round_jobs_taken_over_total",
            "Round jobs this instance ran again after an earlier run stopped (its instance "
            "died or stopped)", registry=r)
        self.round_jobs_requeued = Counter(
            "gitlab_producer_round_jobs_requeued_total",
            "Open round jobs this instance found lost by the queue and enqueued again",
            registry=r)
        self.budget_use = Gauge(
            "gitlab_producer_budget_use_ratio",
            "Requests reserved by all instances over the last seconds / the limit", registry=r)
