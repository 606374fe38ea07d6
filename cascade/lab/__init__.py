"""Offline work over models and data: evaluation on held-out splits, policy calibration
(:mod:`~cascade.lab.fit`), replay, and the benchmark (:mod:`cascade.lab.bench`)."""
