"""Integration tests that need single tiers with per-test configs use the fault suite's
fixtures (real processes on 127.0.0.1, stopped at the end of each test)."""

from tests.fault.conftest import callbacks, hard_images, proxy_to, tiers

__all__ = ["callbacks", "hard_images", "proxy_to", "tiers"]  # fixtures, found by name
