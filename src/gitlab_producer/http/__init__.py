"""HTTP endpoints of the service: operations (metrics, health, log level) and webhooks."""
