"""Every bad request gets the right 4xx with a machine-readable body naming the field; never a 500."""

from __future__ import annotations

import base64
import io

import httpx
import pytest

pytestmark = pytest.mark.integration

GRID = [[0.0] * 8 for _ in range(8)]


def _grid(**cell):
    g = [row[:] for row in GRID]
    for key, value in cell.items():
        r, c = (int(x) for x in key[1:].split("_"))
        g[r][c] = value
    return g


def _png(width: int, height: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), color=128).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


CASES = [
    # (name, body or raw bytes, headers, status, code, field)
    ("not json", b"{nope", None, 400, "malformed_body", "body"),
    ("json array", b"[1, 2]", None, 400, "malformed_body", "body"),
    ("missing task", {"input": {"text": "x"}}, None, 422, "invalid_input", "task"),
    ("missing input", {"task": "documents"}, None, 422, "invalid_input", "input"),
    ("unknown field", {"task": "documents", "input": {"text": "x"}, "prio": 1}, None, 422,
     "invalid_input", "prio"),
    ("unknown task", {"task": "audio", "input": {"text": "x"}}, None, 422, "unknown_task", "task"),
    ("input not object", {"task": "documents", "input": "hello"}, None, 422, "invalid_input", "input"),
    ("empty text", {"task": "documents", "input": {"text": "   "}}, None, 422, "invalid_input",
     "input.text"),
    ("text not string", {"task": "documents", "input": {"text": 42}}, None, 422, "invalid_input",
     "input.text"),
    ("text missing", {"task": "documents", "input": {"body": "x"}}, None, 422, "invalid_input",
     "input.body"),
    ("image 7 rows", {"task": "vision", "input": {"image": GRID[:7]}}, None, 422, "invalid_input",
     "input.image"),
    ("row of 9", {"task": "vision", "input": {"image": [[0] * 9] + GRID[1:]}}, None, 422,
     "invalid_input", "input.image[0]"),
    ("pixel too big", {"task": "vision", "input": {"image": _grid(p3_4=17)}}, None, 422,
     "invalid_input", "input.image[3][4]"),
    ("pixel negative", {"task": "vision", "input": {"image": _grid(p0_0=-1)}}, None, 422,
     "invalid_input", "input.image[0][0]"),
    ("pixel string", {"task": "vision", "input": {"image": _grid(p7_7="5")}}, None, 422,
     "invalid_input", "input.image[7][7]"),
    ("pixel bool", {"task": "vision", "input": {"image": _grid(p2_2=True)}}, None, 422,
     "invalid_input", "input.image[2][2]"),
    ("image and png", {"task": "vision", "input": {"image": GRID, "png_base64": "x"}}, None, 422,
     "invalid_input", "input"),
    ("bad base64", {"task": "vision", "input": {"png_base64": "***"}}, None, 422, "invalid_input",
     "input.png_base64"),
    ("not a png", {"task": "vision", "input": {"png_base64": base64.b64encode(b"GIF89a....").decode()}},
     None, 422, "invalid_input", "input.png_base64"),
    ("png too large", {"task": "vision", "input": {"png_base64": _png(2000, 10)}}, None, 422,
     "invalid_input", "input.png_base64"),
    ("deadline zero", {"task": "documents", "input": {"text": "x"}, "deadline_ms": 0}, None, 422,
     "invalid_input", "deadline_ms"),
    ("callback not url", {"task": "documents", "input": {"text": "x"}, "callback_url": "ftp://x"},
     None, 422, "invalid_input", "callback_url"),
    ("bad idempotency key", {"task": "documents", "input": {"text": "x"}},
     {"Idempotency-Key": "has spaces in it"}, 422, "invalid_input", "Idempotency-Key"),
    ("hop loop", {"task": "documents", "input": {"text": "x"}}, {"X-Cascade-Hop": "99"}, 400,
     "hop_limit_exceeded", "X-Cascade-Hop"),
    ("hop not int", {"task": "documents", "input": {"text": "x"}}, {"X-Cascade-Hop": "two"}, 422,
     "invalid_input", "X-Cascade-Hop"),
    ("form body", b"task=documents", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type", "Content-Type"),
    ("oversize", {"task": "documents", "input": {"text": "x" * 400_000}}, None, 413,
     "payload_too_large", "body"),
]


@pytest.mark.parametrize(("name", "body", "headers", "status", "code", "field"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_request_gets_a_precise_4xx(running_chain, name, body, headers, status, code, field):
    url = f"{running_chain.entry_url}/v1/infer"
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers=hdrs, timeout=10)
    else:
        r = httpx.post(url, json=body, headers=hdrs, timeout=10)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code
    assert error["field"] == field
    assert error["message"]


def test_chunked_oversize_body_is_refused(running_chain):
    def chunks():
        yield b'{"task": "documents", "input": {"text": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}}'

    r = httpx.post(f"{running_chain.entry_url}/v1/infer", content=chunks(),
                   headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_unknown_route_and_method_are_json(running_chain):
    r = httpx.get(f"{running_chain.entry_url}/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{running_chain.entry_url}/v1/infer")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_valid_png_is_accepted(running_chain):
    r = httpx.post(f"{running_chain.entry_url}/v1/infer",
                   json={"task": "vision", "input": {"png_base64": _png(32, 32)}}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["label"] in [str(d) for d in range(10)]
