"""Offline work on the generative task: recorded answers, measurement, the GGUF ladder's build,
and its predictions for calibration, replay and the benchmark."""
