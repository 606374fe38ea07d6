"""Escalation to the next tier: the HTTP client (httpx + tenacity) and its circuit breaker."""
