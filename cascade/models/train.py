"""Training one tier's scikit-learn pipeline, in a form that exports to ONNX faithfully.

Every pipeline takes the raw task input (pixels 0..16, or a text) so the exported graph does
its own preprocessing and serving needs nothing but onnxruntime.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, normalize
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from cascade.models.augment import augment_training_split
from cascade.models.specs import VISION_PIXEL_MAX, TaskName, TierSpec


def _calibrated_svc(**params: Any) -> CalibratedClassifierCV:
    return CalibratedClassifierCV(SVC(**params), method="sigmoid", ensemble=False)


TOKEN_PATTERN = r"(?a)\b\w\w+\b"
r"""scikit-learn's default token pattern in ASCII mode, which is what onnxruntime's tokenizer
(RE2) implements: with Unicode ``\w``, "café" would be one token here and "caf" in ONNX."""

_ESTIMATORS: dict[str, Callable[..., Any]] = {
    "mlp": MLPClassifier,
    "svc": _calibrated_svc,
    "logreg": LogisticRegression,
}


@dataclass(frozen=True)
class TrainedModel:
    """A fitted pipeline plus the scikit-learn reference the ONNX export must reproduce."""

    task: TaskName
    spec: TierSpec
    pipeline: Pipeline
    classes: tuple[str, ...]
    reference_proba: Callable[[npt.NDArray[Any]], npt.NDArray[np.float64]]
    train_samples: int
    """Rows the estimator was fit on: the training split plus its augmented copies."""


def train_tier(
    task: TaskName,
    spec: TierSpec,
    inputs: npt.NDArray[Any],
    labels: npt.NDArray[np.str_],
) -> TrainedModel:
    """Fit ``spec``'s estimator on the training split of ``task`` (plus the corrupted copies
    of it that ``spec.augmentation`` asks for)."""
    classifier = _ESTIMATORS[spec.estimator](**spec.params)
    augmented = augment_training_split(spec.augmentation, inputs, labels)
    if task == "vision":
        return _train_vision(spec, classifier, *augmented)
    return _train_documents(spec, classifier, inputs, *augmented)


def _train_vision(
    spec: TierSpec, classifier: Any, images: npt.NDArray[Any], labels: npt.NDArray[np.str_]
) -> TrainedModel:
    # A fixed 0..16 -> 0..1 scaling (not fitted on the data): the graph's input domain is the
    # documented pixel range, whatever the training split happened to contain.
    width = images.shape[1]
    scaler = MinMaxScaler().fit(np.array([[0.0] * width, [VISION_PIXEL_MAX] * width]))
    steps: list[tuple[str, Any]] = [("scale", scaler)]
    features = scaler.transform(images)
    if spec.components is not None:
        # The main principal components keep the digits' shapes; pixel noise spreads evenly
        # over all 64 directions, so the part of it outside them is dropped before the SVC.
        projection = PCA(n_components=spec.components, random_state=0).fit(features)
        steps.append(("project", projection))
        features = projection.transform(features)
    _fit_quietly(classifier, features, labels)
    pipeline = Pipeline([*steps, ("classify", classifier)])
    return TrainedModel(
        task="vision",
        spec=spec,
        pipeline=pipeline,
        classes=tuple(str(c) for c in classifier.classes_),
        reference_proba=pipeline.predict_proba,
        train_samples=len(labels),
    )


def _train_documents(
    spec: TierSpec,
    classifier: Any,
    clean_texts: npt.NDArray[Any],
    texts: npt.NDArray[Any],
    labels: npt.NDArray[np.str_],
) -> TrainedModel:
    # No stop words: the ONNX converter silently drops them with scikit-learn >= 1.9.
    vectorizer = TfidfVectorizer(
        sublinear_tf=True, max_features=spec.vocabulary_size, token_pattern=TOKEN_PATTERN
    )
    # Vocabulary and IDF from the original texts only: a typo in an augmented copy stays an
    # unknown word, as it is in the field, instead of bloating the vocabulary.
    vectorizer.fit(clean_texts)

    def features(batch: npt.NDArray[Any]) -> sp.csr_matrix:
        return log1p_tfidf(vectorizer, batch)

    _fit_quietly(classifier, features(texts), labels)
    pipeline = Pipeline([("tfidf", vectorizer), ("classify", classifier)])
    return TrainedModel(
        task="documents",
        spec=spec,
        pipeline=pipeline,
        classes=tuple(str(c) for c in classifier.classes_),
        reference_proba=lambda batch: classifier.predict_proba(features(batch)),
        train_samples=len(labels),
    )


def log1p_tfidf(vectorizer: TfidfVectorizer, texts: npt.NDArray[Any]) -> sp.csr_matrix:
    """L2-normalised ``log(1 + tf) * idf``: the sublinear TF-IDF that the ONNX export computes.

    scikit-learn's ``sublinear_tf`` uses ``1 + log(tf)``, but skl2onnx exports it as
    ``log(1 + tf)`` (a probability gap of up to 0.03 per class). The classifiers are trained
    on this function instead, so the exported graph is exactly the trained model; the build's
    agreement check would catch a future converter that changed its formula.
    """
    counts = CountVectorizer.transform(vectorizer, texts).astype(np.float64)
    counts.data = np.log1p(counts.data)
    weighted = sp.csr_matrix(counts.multiply(vectorizer.idf_))
    return normalize(weighted, norm="l2", copy=False)


def _fit_quietly(classifier: ClassifierMixin, features: Any, labels: Any) -> None:
    # One BLAS thread: these matrices are small, so threads mostly spin (a busy 2-core machine
    # trained 4-10x slower with two), and results no longer depend on the core count.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # Small MLPs stop at max_iter on purpose; their accuracy is measured, not assumed.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(features, labels)
