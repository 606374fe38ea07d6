"""What the build makes: the two model ladders and the held-out splits, as plain data.

Changing anything here changes the build key, so the next ``cascade models build`` rebuilds.
Accuracy must grow with the tier (the integration tests check it on the test split); the
manifest records what each setting achieved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TaskName = Literal["vision", "documents"]
TASKS: tuple[TaskName, ...] = ("vision", "documents")

SPLIT_SEED = 0
CALIBRATION_FRACTION = 0.2
TEST_FRACTION = 0.2
"""Train gets the remaining 60%. Both splits are stratified by label."""

VISION_PIXEL_MAX = 16.0
"""``load_digits`` pixels are counts 0..16; the exported graphs scale by this constant."""

INT8_MAX_ACCURACY_LOSS = 0.005
"""Quantization costing more than half a point of test accuracy is reported loudly."""


@dataclass(frozen=True)
class TierSpec:
    """One rung of a ladder: which estimator, its hyper-parameters, and whether to quantize.

    ``vocabulary_size`` applies to text tasks only (``None`` keeps the whole vocabulary).
    ``svc`` gets its probabilities from a sigmoid calibrated on cross-validated decision values
    (``SVC(probability=True)`` is deprecated since scikit-learn 1.9).
    """

    tier: str
    algorithm: str
    estimator: Literal["mlp", "svc", "logreg"]
    params: dict[str, Any] = field(default_factory=dict)
    vocabulary_size: int | None = None
    quantize: bool = True

    def as_key(self) -> dict[str, Any]:
        """A JSON-able form for the build key."""
        return asdict(self)


_MLP = {"max_iter": 2000, "random_state": 0}

LADDERS: dict[TaskName, tuple[TierSpec, ...]] = {
    "vision": (
        TierSpec("endpoint", "MLP(16)", "mlp", {"hidden_layer_sizes": (16,), **_MLP}),
        TierSpec("edge-node", "MLP(64)", "mlp", {"hidden_layer_sizes": (64,), **_MLP}),
        TierSpec(
            "edge-server",
            "MLP(256,128)",
            "mlp",
            {"hidden_layer_sizes": (256, 128), "alpha": 1e-3, **_MLP},
        ),
        TierSpec("cloud", "SVC(rbf,C=3)", "svc", {"C": 3.0, "kernel": "rbf"}, quantize=False),
    ),
    "documents": (
        TierSpec(
            "endpoint",
            "TFIDF(300)+MLP(8)",
            "mlp",
            {"hidden_layer_sizes": (8,), "max_iter": 500, "random_state": 0},
            vocabulary_size=300,
        ),
        TierSpec(
            "edge-node",
            "TFIDF(1k)+MLP(16)",
            "mlp",
            {"hidden_layer_sizes": (16,), "max_iter": 500, "random_state": 0},
            vocabulary_size=1000,
        ),
        TierSpec(
            "edge-server",
            "TFIDF(3k)+MLP(32)",
            "mlp",
            {"hidden_layer_sizes": (32,), "max_iter": 500, "random_state": 0},
            vocabulary_size=3000,
        ),
        TierSpec(
            "cloud",
            "TFIDF(all)+LR(C=100)",
            "logreg",
            {"C": 100.0, "max_iter": 3000},
            quantize=False,
        ),
    ),
}
