"""``cascade models keygen | pack | pull | rollback | status``: signed model bundles.

Keys and packing work on files; pull, rollback and status talk to a running tier over its API
(``/v1/models/...``), so they work the same for a tier on this machine or across the site.
See docs/model-updates.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cascade.cli.common import console, fail, fail_on, print_json
from cascade.errors import CascadeError

TIER_URL = typer.Option("http://127.0.0.1:8101", "--url", "-u",
                        help="Base URL of the tier to act on (default: the local endpoint).")
JSON_OUT = typer.Option(False, "--json", help="Print the tier's JSON answer as it is.")


def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the key pair.")] = Path(
        "keys"),
    name: Annotated[str, typer.Option(help="File stem: NAME.key (private), NAME.pub.")] = "models",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Make an ed25519 key pair to sign model bundles.

    Writes OUT/NAME.key (private, mode 0600: keep it where bundles are packed, never on a
    tier) and OUT/NAME.pub (list it in every tier's bundles.trusted_keys).

    Example: cascade models keygen --out keys --name fleet-2026
    """
    from cascade.models.signing import generate_keypair

    try:
        key_id = generate_keypair(out / f"{name}.key", out / f"{name}.pub", overwrite=force)
    except CascadeError as exc:
        fail_on(exc)
    console.print(f"key {key_id}: private {out / f'{name}.key'} (0600), public "
                  f"{out / f'{name}.pub'}", highlight=False)


def pack(
    task: Annotated[str, typer.Argument(help="Task whose model to pack, e.g. vision.")],
    tier: Annotated[str, typer.Option("--tier", "-t", help="Which model of the ladder "
                                      "(the tiers' `tasks:` value), e.g. endpoint.")],
    key: Annotated[Path, typer.Option("--key", "-k", help="Private key (cascade models "
                                      "keygen).")] = Path("keys/models.key"),
    models: Annotated[Path, typer.Option("--models", help="Built models directory to pack "
                                         "from.")] = Path("models"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder (or file) to write; a tier "
                                      "whose bundles.source is this folder pulls it.")] = Path(
        "bundles"),
    version: Annotated[str | None, typer.Option(help="Version label (default: UTC time and the "
                                                "model's sha256 prefix).")] = None,
    probe_size: Annotated[int, typer.Option(min=1, max=100_000, help="Labelled probe samples "
                                            "drawn from the task's held-out test split.")] = 200,
) -> None:
    """Pack one model into a signed bundle: model file, manifest entry, probe set, signature.

    Example: cascade models pack vision --tier endpoint --key keys/models.key --out bundles
    """
    from cascade.models.bundle import pack_bundle
    from cascade.models.signing import load_private_key

    try:
        if not out.suffix:
            out.mkdir(parents=True, exist_ok=True)
        path = pack_bundle(models, task, tier, key=load_private_key(key), out=out,
                           version=version, probe_size=probe_size)
    except CascadeError as exc:
        fail_on(exc)
    console.print(f"packed {path} ({path.stat().st_size} bytes)", highlight=False)


def pull(
    url: str = TIER_URL,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Send this bundle to the "
                                              "tier instead of letting it pull its source.")
                    ] = None,
    as_json: bool = JSON_OUT,
) -> None:
    """Make a tier pull bundles from its source now (or install the one given with --file).

    Each result says installed as canary, promoted, up to date, or refused and why.

    Examples: cascade models pull --url http://127.0.0.1:8101
              cascade models pull --url http://127.0.0.1:8101 --file bundles/x.bundle
    """
    if file is not None:
        if not file.is_file():
            fail(f"{file}: no such bundle file")
        body = _call("POST", f"{url}/v1/models/pull", content=file.read_bytes(),
                     headers={"Content-Type": "application/octet-stream",
                              "X-Cascade-Bundle-Name": file.name})
    else:
        body = _call("POST", f"{url}/v1/models/pull")
    if as_json:
        print_json(body)
        return
    for result in body["results"] or [{"outcome": "nothing offered for this tier's tasks"}]:
        console.print(" ".join(f"{k}={v}" for k, v in result.items() if k != "probe"),
                      highlight=False)


def rollback(
    task: Annotated[str, typer.Argument(help="Task to roll back.")],
    version: Annotated[str | None, typer.Option(help="Version to serve (default: stop the "
                                                "canary, else the previous version).")] = None,
    url: str = TIER_URL,
    as_json: bool = JSON_OUT,
) -> None:
    """Stop a task's canary, or serve its previous (or a named) installed version again.

    Example: cascade models rollback vision --url http://127.0.0.1:8101
    """
    body = _call("POST", f"{url}/v1/models/rollback",
                 json={"task": task, **({"version": version} if version else {})})
    if as_json:
        print_json(body)
        return
    console.print(" ".join(f"{k}={v}" for k, v in body.items()), highlight=False)


def status(url: str = TIER_URL, as_json: bool = JSON_OUT) -> None:
    """Per task: the serving version, the canary and its numbers, previous versions.

    Example: cascade models status --url http://127.0.0.1:8101
    """
    body = _call("GET", f"{url}/v1/models/status")
    if as_json:
        print_json(body)
        return
    for task, view in body["tasks"].items():
        canary = view["canary"]
        line = f"{task}: {view['version']} ({view['model']})"
        if canary:
            line += (f"; canary {canary['version']} at {canary['share']:.0%}: "
                     f"{canary['canary']['calls']} requests, {canary['reason']}")
        line += f"; previous: {', '.join(view['previous']) or '-'}"
        console.print(line, highlight=False)


def _call(method: str, url: str, **kwargs: Any) -> Any:
    import httpx

    try:
        response = httpx.request(method, url, timeout=300, **kwargs)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the tier at {url}: {exc}", 1)
    try:
        body = response.json()
    except ValueError:
        fail(f"{url} answered {response.status_code} without JSON", 1)
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        fail(f"{error.get('code', response.status_code)}: {error.get('message', body)}", 1)
    return body


def register_bundle_commands(app: typer.Typer) -> None:
    """Add keygen, pack, pull, rollback and status to ``cascade models``."""
    for name, command in (("keygen", keygen), ("pack", pack), ("pull", pull),
                          ("rollback", rollback), ("status", status)):
        app.command(name)(command)
