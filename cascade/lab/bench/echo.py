"""A bare FastAPI echo endpoint: the baseline the tier service's overhead is measured against.

Run: ``python -m cascade.lab.bench.echo --port 18200``. Same server stack as a tier (uvicorn,
uvloop, httptools, no access log), the idiomatic FastAPI body: parse JSON, return it.
"""

from __future__ import annotations

import argparse
from typing import Any

from fastapi import FastAPI

app = FastAPI()


@app.post("/echo")
async def echo(body: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON body as received."""
    return body


@app.get("/readyz")
async def readyz() -> dict[str, bool]:
    return {"ready": True}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
