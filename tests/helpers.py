"""Helpers shared by several test modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def picture_base64(formats: tuple[str, ...]) -> Any:
    """A hypothesis strategy of base64 pictures (random pixels, 1..24 per side, grey or RGB)
    in one of ``formats`` (Pillow names: PNG, JPEG): what the OpenAPI document's picture
    formats (``cascade.contract.input_schemas``) stand for."""
    from hypothesis import strategies as st

    @st.composite
    def draw_picture(draw: st.DrawFn) -> str:
        import base64
        import io

        import numpy as np
        from PIL import Image

        height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        mode = draw(st.sampled_from(("L", "RGB")))
        shape = (height, width) if mode == "L" else (height, width, 3)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(
            out, format=draw(st.sampled_from(formats)))
        return base64.b64encode(out.getvalue()).decode()

    return draw_picture()


def children_of(pid: int) -> list[int]:
    """The pids of the live processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids
