"""RouterConfig refuses a bad setting by its name and value."""

from __future__ import annotations

import pytest

from router.config import RouterConfig


@pytest.mark.parametrize("setting, message", [
    ({"failover_wait_s": -1}, "failover_wait_s must be a number >= 0, got -1"),
    ({"failover_wait_s": "soon"}, "failover_wait_s must be a number >= 0, got 'soon'"),
    ({"failover_wait_s": True}, "failover_wait_s must be a number >= 0, got True"),
    ({"snapshot_interval_s": 0}, "snapshot_interval_s must be > 0, got 0"),
    ({"max_attempts": 0}, "max_attempts must be an integer >= 1, got 0"),
    ({"decider_max_uncached_tokens": -1}, "decider_max_uncached_tokens must be an integer >= 0, got -1"),
])
def test_bad_settings_are_named(setting, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(model="tiny-llama", **setting)


def test_a_failover_wait_of_zero_is_allowed():
    assert RouterConfig(model="tiny-llama", failover_wait_s=0).failover_wait_s == 0
