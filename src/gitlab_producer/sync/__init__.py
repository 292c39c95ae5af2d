"""Sync rounds: discovery, event reading, exactly-once delivery, completeness windows."""
