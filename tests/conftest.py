"""Shared fixtures: settings for a fresh SQLite file, a started app, an async client."""

from hypothesis import HealthCheck, settings

# CI machines are shared and small: judge properties, not how fast examples are drawn.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")
