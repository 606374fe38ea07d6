"""Ray driver for the multi-node tests (``tests/ray/cluster.py``), run as a subprocess:

    python -m tests.ray.cluster_driver nodes <address>
    python -m tests.ray.cluster_driver deploy <address> <settings.json> <port>

Each prints one JSON line. ``deploy`` leaves the application running (Serve's controller
outlives the driver).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import ray


def nodes() -> Any:
    """The alive nodes: address, id, resources."""
    return [{"ip": n["NodeManagerAddress"], "id": n["NodeID"], "resources": n["Resources"]}
            for n in ray.nodes() if n["Alive"]]


def deploy(settings_file: str, port: str) -> Any:
    """The tier of ``settings_file`` (NodeSettings as JSON) as app ``cloud`` at ``/``, behind
    a Serve proxy on every node at ``port``."""
    from ray import serve

    from cascade.deploy.ray_serve import build_tier_app
    from cascade.tier.settings import NodeSettings

    settings = NodeSettings.model_validate(json.loads(Path(settings_file).read_text()))
    serve.start(http_options={"host": "0.0.0.0", "port": int(port)})
    serve.run(build_tier_app(settings), name="cloud", route_prefix="/")
    return {"deployed": "cloud"}


def main(argv: list[str]) -> None:
    command, address, *args = argv
    ray.init(address=address, log_to_driver=False)
    try:
        out = {"nodes": nodes, "deploy": deploy}[command](*args)
    finally:
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
