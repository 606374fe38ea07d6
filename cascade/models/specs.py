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
class ImageAugmentation:
    """Noisy, partly erased copies of 8x8 images (pixels 0..16).

    Each copy draws its noise sigma (pixel units) uniformly from ``noise_sigma``; with
    probability ``erase_probability`` it also gets a rectangle of height and width drawn from
    ``erase_side`` set to 0, at a uniform position. Pixels are then rounded and clipped to the
    input domain, 0..16, as a sensor's counts are.
    """

    copies: int
    noise_sigma: tuple[float, float]
    erase_probability: float
    erase_side: tuple[int, int]
    seed: int


@dataclass(frozen=True)
class TextAugmentation:
    """Copies of texts with character-level edits, some cut to a random-length prefix.

    Each copy draws an edit rate from ``edit_rate``: that share of its words gets one random
    edit (delete, insert, substitute or transpose a character; inserted and substituted
    characters are random lowercase letters). With probability ``truncate_probability`` a copy
    keeps only its first words, a share drawn from ``keep_fraction`` (at least ``min_words``).
    """

    copies: int
    edit_rate: tuple[float, float]
    truncate_probability: float
    keep_fraction: tuple[float, float]
    min_words: int
    seed: int


Augmentation = ImageAugmentation | TextAugmentation


@dataclass(frozen=True)
class TierSpec:
    """One rung of a ladder: which estimator, its hyper-parameters, and whether to quantize.

    ``vocabulary_size`` applies to text tasks only (``None`` keeps the whole vocabulary);
    ``components`` to images only: a PCA projection to that many dimensions before the estimator.
    ``svc`` gets its probabilities from a sigmoid calibrated on cross-validated decision values
    (``SVC(probability=True)`` is deprecated since scikit-learn 1.9).
    ``augmentation`` adds corrupted copies of the training split (:mod:`cascade.models.augment`).
    """

    tier: str
    algorithm: str
    estimator: Literal["mlp", "svc", "logreg"]
    params: dict[str, Any] = field(default_factory=dict)
    vocabulary_size: int | None = None
    components: int | None = None
    quantize: bool = True
    augmentation: Augmentation | None = None

    def as_key(self) -> dict[str, Any]:
        """A JSON-able form for the build key."""
        return asdict(self)


_MLP = {"max_iter": 2000, "random_state": 0}

FIELD_TEXTS = TextAugmentation(
    copies=4,
    edit_rate=(0.0, 0.2),
    truncate_probability=0.6,
    keep_fraction=(0.1, 1.0),
    min_words=10,
    seed=1,
)
"""Typos and cut-off texts, for the two larger document tiers. Also on the edge-node it bought
nothing; also on the endpoint, whose 300 words cannot learn much from it, it cost the cascade
clean accuracy."""

FIELD_IMAGES = ImageAugmentation(
    copies=4, noise_sigma=(0.0, 3.0), erase_probability=0.5, erase_side=(1, 3), seed=1
)
"""Sensor noise and occlusion. Measured on the cloud, the top two, the top three and all four
vision tiers, and used on none: it cost every tier clean accuracy for little or nothing under
corruption, and the cascade did worse on both. The cloud's PCA projection did a little better
on both (README, "The models")."""

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
        TierSpec(
            "cloud",
            "PCA(40)+SVC(rbf,C=3)",
            "svc",
            {"C": 3.0, "kernel": "rbf"},
            components=40,
            quantize=False,
        ),
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
            augmentation=FIELD_TEXTS,
        ),
        TierSpec(
            "cloud",
            "TFIDF(all)+LR(C=100)",
            "logreg",
            {"C": 100.0, "max_iter": 3000},
            quantize=False,
            augmentation=FIELD_TEXTS,
        ),
    ),
}
