"""Deciding from a model's output: confidence signals and the gate
(:mod:`~cascade.gating.gate`, pure functions) and the drift alarm (:mod:`~cascade.gating.drift`)."""
