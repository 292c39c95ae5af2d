"""Every numeric setting has a finite range: a new one without bounds fails here."""

from __future__ import annotations

import math

import pytest
from annotated_types import Ge, Gt, Le, Lt

from gitlab_producer.config import ConfigError, Settings, load_settings

REQUIRED = {"gitlab_base_url": "https://gitlab.test/api/v4", "gitlab_private_token": "t0ken"}
NUMERIC = sorted(name for name, field in Settings.model_fields.items()
                 if field.annotation in (int, float))


def bounds(name: str) -> tuple[float, float]:
    low, high = -math.inf, math.inf
    for rule in Settings.model_fields[name].metadata:
        if isinstance(rule, Ge | Gt):
            low = float(rule.ge if isinstance(rule, Ge) else rule.gt)
        if isinstance(rule, Le | Lt):
            high = float(rule.le if isinstance(rule, Le) else rule.lt)
    return low, high


def test_the_numeric_settings_are_found() -> None:
    assert {"cache_ttl", "gitlab_timeout", "redis_db", "operations_per_second",
            "scheduling_poll_interval", "gitlab_max_body"} <= set(NUMERIC)


@pytest.mark.parametrize("name", NUMERIC)
def test_each_numeric_setting_is_bounded_on_both_sides(name: str) -> None:
    low, high = bounds(name)
    assert math.isfinite(low) and math.isfinite(high), (name, low, high)
    for outside in (low - 1, high * 10 + 1):
        with pytest.raises(ConfigError, match=name.upper()):
            load_settings(None, **REQUIRED, **{name: outside})


@pytest.mark.parametrize("name", [n for n in NUMERIC
                                  if Settings.model_fields[n].annotation is float])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_floats_are_finite(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name.upper()):
        load_settings(None, **REQUIRED, **{name: value})
