"""cascade: confidence-gated model tiers from endpoint to cloud, with store-and-forward.

The public API is what ``__all__`` lists; everything else is private to the package.
"""

from cascade.errors import (
    CascadeError,
    ConfigError,
    ModelError,
    PolicyError,
    RequestError,
    ServiceUnavailable,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)

__version__ = "0.1.0"

TIERS: tuple[str, ...] = ("endpoint", "edge-node", "edge-server", "cloud")
"""The default chain, bottom to top."""

__all__ = [
    "TIERS",
    "CascadeError",
    "ConfigError",
    "ModelError",
    "PolicyError",
    "RequestError",
    "ServiceUnavailable",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "__version__",
]
