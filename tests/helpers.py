"""Helpers shared by several test modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

BUILD_MODULES = ("sklearn", "skl2onnx", "onnx", "scipy")


def build_modules_imported_by(script: str, *, timeout_s: float = 120) -> list[str]:
    """Run ``script`` in a fresh interpreter; which build-only packages did it import?

    The script must succeed; the answer is the sorted subset of :data:`BUILD_MODULES` found in
    ``sys.modules`` afterwards (serving code must import none of them).
    """
    probe = f"{script}\nimport sys\nprint(sorted(m for m in {BUILD_MODULES!r} if m in sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout_s, check=False,
    )
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])
