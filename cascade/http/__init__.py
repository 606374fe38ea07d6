"""The HTTP face of a tier: the FastAPI app factory (:mod:`~cascade.http.app`) and the
results/outbox routes (:mod:`~cascade.http.results`)."""
