"""``cascade certs`` (the site CA and tier certificates) and ``cascade keys`` (API keys of tier
1's clients). See docs/security.md for rotation."""

from __future__ import annotations

import secrets
from pathlib import Path

import typer

from cascade.cli.common import console, fail, fail_on, print_json
from cascade.errors import CascadeError

certs_app = typer.Typer(help="The site CA and one TLS certificate per tier (mTLS between tiers).",
                        no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the clients of tier 1, and the callback signing key.",
                       no_args_is_help=True)

DEFAULT_CERT_DIR = Path("var/certs")


@certs_app.command("init")
def certs_init(
    directory: Path = typer.Option(DEFAULT_CERT_DIR, "--dir", help="Where the files go."),
    tiers: list[str] = typer.Option(
        None, "--tier", help="Tiers to issue for (repeat; default: endpoint, edge-node, "
        "edge-server, cloud)."),
    names: list[str] = typer.Option(
        None, "--name", help="Extra DNS names or IP addresses every tier certificate is valid "
        "for (repeat), e.g. --name edge-node.site.lan --name 10.0.4.2; 127.0.0.1, ::1, "
        "localhost and the tier's name are always in."),
    days: int = typer.Option(397, help="Validity of tier certificates, in days."),
    ca_days: int = typer.Option(3650, help="Validity of a new CA, in days."),
    renew: bool = typer.Option(False, help="Re-issue every tier certificate (same CA): "
                               "running tiers load the new files by themselves."),
    new_ca: bool = typer.Option(False, help="Make a new CA and re-issue every tier certificate: "
                                "certificates of the old CA are refused once tiers reload."),
) -> None:
    """Create what is missing: the site CA, then a certificate and key per tier (files 0600).

    Run again with --renew to rotate tier certificates, --new-ca to rotate the CA as well;
    running tiers reload changed files (or `kill -HUP <pid>`), no restart.

    Examples:
      cascade certs init
      cascade certs init --name edge-node.site.lan --name 10.0.4.2 --renew
      cascade certs init --dir /etc/cascade/certs --tier edge-node --new-ca
    """
    from cascade.trust.certs import DEFAULT_TIERS, SiteCerts, issue_site

    try:
        written = issue_site(SiteCerts(directory), tiers or DEFAULT_TIERS, names=names or (),
                             days=days, ca_days=ca_days, new_ca=new_ca, renew=renew)
    except CascadeError as exc:
        fail_on(exc)
    if not written:
        console.print(f"nothing to do: {directory} has the CA and every tier's certificate "
                      "(--renew re-issues them, --new-ca rotates the CA)")
        return
    for path in written:
        console.print(f"wrote {path}", highlight=False)


@certs_app.command("show")
def certs_show(
    directory: Path = typer.Option(DEFAULT_CERT_DIR, "--dir", help="Where the files are."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document."),
) -> None:
    """Subject, issuer, serial, validity and names of every certificate (never a key).

    Example: cascade certs show --dir var/certs
    """
    from dataclasses import asdict

    from cascade.trust.certs import describe

    files = sorted(directory.glob("*.pem"))
    if not files:
        fail(f"no certificates in {directory} (`cascade certs init --dir {directory}`)")
    infos = [describe(path) for path in files]
    if as_json:
        print_json([asdict(info) for info in infos])
        return
    for info in infos:
        console.print(f"[bold]{info.file}[/]  {info.subject}  issuer {info.issuer}\n"
                      f"  serial {info.serial}  valid {info.not_before} .. {info.not_after}\n"
                      f"  names {', '.join(info.names) or '-'}", highlight=False)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who gets the key (letters, digits, ._-), e.g. checkout."),
    rate_per_s: float | None = typer.Option(None, help="Sustained requests per second."),
    burst: int | None = typer.Option(None, help="Requests allowed at once above the rate."),
    quota: int | None = typer.Option(None, help="Requests per --quota-period-s."),
    quota_period_s: float = typer.Option(86_400.0, help="The quota's period (default a day)."),
    scopes: list[str] = typer.Option(
        None, "--scope", help="Route groups the key may call (repeat): api, healthz, readyz, "
        "metrics, docs (default: api)."),
) -> None:
    """Make an API key: prints the key once (give it to the client) and the entry for the
    tier's node config, which holds only its hash.

    Example:
      cascade keys create checkout --rate-per-s 20 --burst 40 --quota 100000
      then paste the printed entry under `clients: keys:` in edge_nodes/endpoint.yaml
    """
    import yaml
    from pydantic import ValidationError

    from cascade.trust.keys import ClientKey, hash_key, new_key

    key = new_key()
    entry: dict[str, object] = {"name": name, "sha256": hash_key(key),
                                "scopes": scopes or ["api"]}
    for field, value in (("rate_per_s", rate_per_s), ("burst", burst), ("quota", quota)):
        if value is not None:
            entry[field] = value
    if quota is not None:
        entry["quota_period_s"] = quota_period_s
    try:
        ClientKey.model_validate(entry)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    console.print(f"API key for {name} (shown once; store it in the client's secret store):")
    print(key)
    console.print("\nnode config entry (under clients: keys:):")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())


@keys_app.command("callback-secret")
def keys_callback_secret(
    out: Path = typer.Option(Path("var/secrets/callback-signing.key"), help="Where to write it."),
    force: bool = typer.Option(False, help="Replace an existing key (receivers need the new one)."),
) -> None:
    """Write a random callback signing key (file 0600); point `callbacks.signing_key_file` at
    it and give the same bytes to your callback receivers.

    Example: cascade keys callback-secret --out var/secrets/callback-signing.key
    """
    if out.exists() and not force:
        fail(f"{out} exists (--force replaces it; receivers then need the new key)")
    write_secret(out)
    console.print(f"wrote {out}", highlight=False)


def write_secret(path: Path) -> None:
    """A fresh 32-byte key, hex encoded, readable by its owner only."""
    from cascade.trust.certs import write_private

    write_private(path, secrets.token_hex(32).encode())
