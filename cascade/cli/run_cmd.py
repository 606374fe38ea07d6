"""``cascade serve``, ``cascade up`` and ``cascade infer``."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cascade.cli.common import (
    console,
    err_console,
    fail,
    fail_on,
    print_json,
    print_table,
    print_whole,
)
from cascade.errors import CascadeError

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.table import Table

    from cascade.deploy.model_server import ModelServer
    from cascade.deploy.restarts import RestartPolicy
    from cascade.deploy.supervisor import Chain
    from cascade.trust.certs import SiteCerts

CONFIG_HELP = "Node config YAML (e.g. edge_nodes/endpoint.yaml); CASCADE_* env vars override it."


def serve(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    port: int | None = typer.Option(None, help="Override the config's port."),
    host: str | None = typer.Option(None, help="Override the config's host."),
) -> None:
    """Serve one tier over HTTP (FastAPI on uvicorn).

    Loads the models named in the config (verifying their sha256 against models/manifest.json),
    the policy, and the upstream client, then serves POST /v1/infer, /healthz, /readyz and /docs.

    Example: cascade serve --config edge_nodes/endpoint.yaml
    """
    from cascade.deploy.process import run_tier

    code = run_tier(config, port=port, host=host)
    if code:
        raise typer.Exit(code)


def up(
    configs: list[Path] = typer.Option(
        None, "--config", "-c", help="Node configs bottom to top (default: the four-tier chain)."
    ),
    base_port: int | None = typer.Option(
        None, help="Put the tiers on consecutive ports from here and rewire their upstreams."
    ),
    log_dir: Path = typer.Option(Path("var/logs"), help="Where each tier's log goes."),
    ready_timeout: float = typer.Option(30.0, help="Seconds to wait for each tier to be ready."),
    trace_dir: Path = typer.Option(
        Path("var/traces"), help="Each tier writes its spans to <dir>/<tier>.jsonl (read them "
        "with `cascade traces`); OTEL_* variables add OTLP export."),
    trace_file: bool = typer.Option(True, help="Write the local trace files (--no-trace-file: don't)."),
    as_json: bool = typer.Option(False, "--json", help="Once ready, print the tiers as one JSON "
                                 "line (tier, url, pid, ready_s, log) instead of the table."),
    ray: bool = typer.Option(False, "--ray", help="Run the top two tiers (edge-server, cloud) "
                             "as Ray Serve applications behind one Serve proxy."),
    ray_address: str | None = typer.Option(
        None, help="--ray: join this Ray cluster (e.g. auto) instead of starting a local one."),
    restart: bool = typer.Option(True, help="Restart a tier that dies while the others keep "
                                 "serving (--no-restart: stop the whole chain instead)."),
    restart_backoff: float = typer.Option(1.0, help="Seconds before a dead tier's first "
                                          "restart; doubled for each further restart."),
    restart_backoff_max: float = typer.Option(30.0, help="Longest wait before a restart."),
    restart_budget: int = typer.Option(5, help="Restarts allowed per tier within "
                                       "--restart-window; past it the tier stays down."),
    restart_window: float = typer.Option(300.0, help="Seconds over which --restart-budget "
                                         "counts restarts."),
    cert_dir: Path = typer.Option(
        Path("var/certs"), help="The site CA and tier certificates (made there if missing, "
        "as `cascade certs init` would)."),
    plain: bool = typer.Option(
        False, "--plain", help="Plain HTTP between tiers, no certificates: local development "
        "only (any local process can call any tier)."),
) -> None:
    """Start the whole local chain (endpoint → edge-node → edge-server → cloud) and keep it up.

    Starts each tier as a child process (top first), waits until it is ready, prints a table
    of tiers and a ready-to-paste curl example, then supervises: a tier that dies is restarted
    (same port and config) after 1, 2, 4... s, at most --restart-budget times per
    --restart-window, and every restart is printed and logged (<log-dir>/supervisor.log). The
    other tiers keep serving meanwhile: below a dead tier, answers are provisional and their
    escalations wait in the outbox until it is back. A tier whose config lists model_servers
    (the cloud, once `cascade models build --generative` built the extraction task) gets its
    local python -m llama_cpp.server started and ready-checked before it. Tiers talk mTLS
    with certificates from --cert-dir (created if missing) and sign callbacks with
    var/secrets/callback-signing.key; --plain turns both off for local development.
    Ctrl-C or SIGTERM stops them all;
    children also die if this process is killed. With --ray the top two tiers run on Ray Serve
    instead (the proxy listens on the edge-server's port; cloud is under /cloud; their model
    servers are started on this machine first).

    Example: cascade up            (then: cascade infer documents "Shares rose after the rate cut")
    """
    from cascade.deploy.supervisor import DEFAULT_CHAIN, Chain

    # An explicit CASCADE_TRACE_DIR in the environment wins (Chain passes os.environ through).
    tracing_env = ({"CASCADE_TRACE_DIR": str(trace_dir)}
                   if trace_file and "CASCADE_TRACE_DIR" not in os.environ else {})
    configs = configs or [Path(config) for config in DEFAULT_CHAIN]
    on_serve = configs[-2:] if ray else []
    configs = configs[:len(configs) - len(on_serve)]
    serve_url: str | None = None
    serve_models: list[ModelServer] = []
    if on_serve:
        port = None if base_port is None else base_port + len(configs)
        serve_url, serve_models = _start_serve_tiers(
            on_serve, port=port, address=ray_address, log_dir=log_dir,
            trace_dir=Path(tracing_env["CASCADE_TRACE_DIR"]) if tracing_env else None)
    if ray and not plain:  # a Serve proxy speaks plain HTTP: so must the tier below it
        err_console.print("[yellow]--ray: the Ray Serve tiers are called over plain HTTP[/]")
        plain = True
    site = _site_trust(cert_dir, configs, tracing_env) if not plain else None
    if plain:
        err_console.print("[bold yellow]warning:[/] plain HTTP: tiers talk with no "
                          "certificates; any local process can call any tier (development only)")
    policy = _restart_policy(restart, restart_backoff, restart_backoff_max, restart_budget,
                             restart_window)
    chain = Chain(configs, base_port=base_port, log_dir=log_dir, top_upstream_url=serve_url,
                  ready_timeout_s=ready_timeout, env=tracing_env, restart=policy,
                  tls=site)
    stopping = {"now": False}

    def _stop(signum: int, _frame: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        with console.status("starting tiers (top first)..."):
            chain.start()
    except (CascadeError, RuntimeError, TimeoutError) as exc:
        _stop_serve_tiers(on_serve, serve_models)
        fail(f"{exc}; see the logs in {log_dir}/", 1)
    if as_json:
        tiers: dict[str, Any] = {"tiers": [
            {"tier": t.tier, "url": t.url, "pid": t.pid,
             "ready_s": round(chain.ready_s[t.tier], 3), "log": str(t.log_path)}
            for t in chain.tiers]}
        if chain.model_servers or serve_models:
            tiers["model_servers"] = [
                {"tier": m.plan.tier, "task": m.plan.task, "url": m.plan.url,
                 "pid": m.process.pid if m.process else None,
                 "ready_s": round(m.ready_s or 0.0, 3), "log": str(m.log_path)}
                for m in [*chain.model_servers, *serve_models]]
        print_json({**tiers, "ray_serve_url": serve_url} if serve_url else tiers)
    else:
        _print_chain(chain, tracing_env, trace_dir, serve_url, serve_models)
    _watch_chain(chain, stopping, err_console if as_json else console, on_serve, serve_models)


def _restart_policy(restart: bool, backoff_s: float, backoff_max_s: float, budget: int,
                    window_s: float) -> RestartPolicy | None:
    """``cascade up``'s restart options as a policy (None: --no-restart); exit 2 naming the
    option when one is out of range."""
    from cascade.deploy.restarts import RestartPolicy

    if not restart:
        return None
    options = {"initial_delay_s": "--restart-backoff", "max_delay_s": "--restart-backoff-max",
               "budget": "--restart-budget", "window_s": "--restart-window"}
    try:
        return RestartPolicy(initial_delay_s=backoff_s, max_delay_s=backoff_max_s,
                             budget=budget, window_s=window_s)
    except CascadeError as exc:
        fail(f"{options.get(exc.field or '', 'restart options')}: {exc.message}", 2)


def _site_trust(cert_dir: Path, configs: list[Path], env: dict[str, str]) -> SiteCerts:
    """The chain's certificates (issued if missing) and callback signing key (``env`` gets
    its path); a tier that cannot read them fails at start, naming the file."""
    import yaml

    from cascade.cli.trust_cmd import write_secret
    from cascade.trust.certs import SiteCerts, issue_site

    site = SiteCerts(cert_dir)
    tiers = [str((yaml.safe_load(c.read_text()) or {}).get("tier") or c.stem) for c in configs]
    try:
        for path in issue_site(site, tiers):
            console.print(f"wrote {path}", highlight=False)
    except CascadeError as exc:
        fail_on(exc)
    secret = Path("var/secrets/callback-signing.key")
    if not secret.exists():
        write_secret(secret)
    env.setdefault("CASCADE_CALLBACKS__SIGNING_KEY_FILE", str(secret))
    return site


def _print_chain(chain: Chain, tracing_env: dict[str, str], trace_dir: Path,
                 serve_url: str | None, serve_models: list[ModelServer]) -> None:
    """The table of tiers (and where the Ray Serve tiers are) and what to try next."""
    if chain.tiers:
        print_whole(console, chain_table(chain))
    if serve_url:
        console.print(f"Ray Serve tiers (edge-server at /, cloud at /cloud): {serve_url}",
                      highlight=False)
    for server in serve_models:
        console.print(f"  model server of Serve tier {server.plan.tier} ({server.plan.task}): "
                      f"{server.plan.url}, log {server.log_path}", highlight=False)
    entry = chain.entry_url if chain.tiers else str(serve_url)
    cacert = f"--cacert {chain.tls.ca_file} " if chain.tls is not None else ""
    console.print("\nTry it (tier 1 answers, or escalates up the chain):", style="bold")
    console.print(
        f"  curl -s {cacert}{entry}/v1/infer -H 'Content-Type: application/json' "
        "-d '{\"task\": \"documents\", \"input\": {\"text\": \"Shares rose after the central "
        "bank cut interest rates\"}}'",
        highlight=False, soft_wrap=True,
    )
    console.print(f"  cascade infer vision --sample 7 --url {entry}", highlight=False)
    console.print(f"  API docs: {entry}/docs   metrics: {entry}/metrics", highlight=False)
    if tracing_env:
        console.print(f"  Traces:   cascade traces {trace_dir}", highlight=False)
    console.print("\nCtrl-C stops every tier.", highlight=False)


def _watch_chain(chain: Chain, stopping: dict[str, bool], out: Console,
                 on_serve: list[Path], serve_models: list[ModelServer]) -> None:
    """Supervise until asked to stop (news of dead and restarted tiers on ``out``), then stop
    every tier, Ray Serve's included. Without a restart policy a dead tier stops the chain."""
    styles = {"exited": "red", "gave_up": "bold red", "restarted": "yellow", "ready": "green"}
    try:
        while not stopping["now"]:
            for event in chain.supervise():
                out.print(f"[{styles.get(event.kind, 'red')}]{event.message}[/]", highlight=False)
                if chain.restart is None:
                    out.print("[red]stopping the chain (--no-restart)[/]")
                    stopping["now"] = True
            time.sleep(0.2)
    finally:
        out.print("stopping tiers...")
        chain.stop()
        _stop_serve_tiers(on_serve, serve_models)
        out.print("all tiers stopped.")


def _start_serve_tiers(configs: list[Path], *, port: int | None, address: str | None,
                       log_dir: Path, trace_dir: Path | None) -> tuple[str, list[ModelServer]]:
    """Deploy ``configs`` (bottom to top) on Ray Serve behind one proxy: its entry URL, and the
    local model servers (``model_servers`` of those configs) started before them, top first,
    as the process chain does. A model server listens on this machine (127.0.0.1), so its Serve
    tier's replicas must run here too: on a multi-node cluster point the tier at a shared
    service instead (``model_options.<task>.base_url``)."""
    from cascade.deploy.model_server import plan_model_servers, start_model_servers
    from cascade.deploy.ray_serve import deploy_chain, start_ray
    from cascade.tier.settings import load_node_settings

    overrides: dict[str, Any] = {} if trace_dir is None else {"trace_dir": trace_dir}
    servers: list[ModelServer] = []
    try:
        settings = [load_node_settings(config, **overrides) for config in configs]
        with console.status("starting the Serve tiers' model servers..."):
            servers = start_model_servers(
                [plan for tier in reversed(settings) for plan in plan_model_servers(tier)],
                log_dir=log_dir)
        with console.status("starting Ray and the Serve tiers (a cold start takes up to a "
                            "minute)..."):
            start_ray(address=address)
            wired = deploy_chain(settings, port=port)
    except CascadeError as exc:
        _stop_model_servers(servers)
        fail(exc.message, 2)
    except (RuntimeError, TimeoutError) as exc:  # a model server that never became ready
        _stop_model_servers(servers)
        fail(f"{exc}; see the logs in {log_dir}/", 1)
    return f"http://{wired[0].host}:{wired[0].port}", servers


def _stop_model_servers(servers: list[ModelServer]) -> None:
    for server in servers:
        server.stop()


def _stop_serve_tiers(configs: list[Path], servers: list[ModelServer]) -> None:
    if configs:
        from cascade.deploy.ray_serve import stop_ray

        stop_ray()
    _stop_model_servers(servers)  # after the tiers: they are its clients


def chain_table(chain: Chain) -> Table:
    """The table ``cascade up`` prints: each tier's URL, pid, start time and log file."""
    from rich.table import Table

    table = Table(title="cascade: local chain is up", title_justify="left")
    for col in ("tier", "url", "pid", "ready in", "log"):
        table.add_column(col, no_wrap=True)
    for t in chain.tiers:
        table.add_row(t.tier, t.url, str(t.pid), f"{chain.ready_s[t.tier]:.2f} s", str(t.log_path))
    for server in chain.model_servers:
        assert server.process is not None
        table.add_row(f"{server.plan.tier} model ({server.plan.task})", server.plan.url,
                      str(server.process.pid), f"{server.ready_s or 0.0:.2f} s",
                      str(server.log_path))
    return table


def infer(
    task: str = typer.Argument(..., help="vision, documents, or a registered task."),
    text: str | None = typer.Argument(None, help="documents: the text to classify."),
    image: str | None = typer.Option(None, help="vision: 8x8 JSON grid of 0..16."),
    png: Path | None = typer.Option(None, help="vision: a PNG file (scaled to 8x8)."),
    sample: int | None = typer.Option(
        None, help="Send test-split sample N from the models dir instead (and show its true label)."
    ),
    url: str | None = typer.Option(
        None, help="Tier to ask (default tier 1: https://127.0.0.1:8101 when var/certs/ca.pem "
        "exists, as `cascade up` makes it, else http://127.0.0.1:8101)."),
    cacert: Path = typer.Option(Path("var/certs/ca.pem"), help="CA of an https tier."),
    api_key: str | None = typer.Option(
        None, envvar="CASCADE_API_KEY", help="API key, if the tier asks for one (better: the "
        "CASCADE_API_KEY variable, which stays out of your shell history)."),
    deadline_ms: int | None = typer.Option(None, help="End-to-end deadline."),
    models_dir: Path = typer.Option(Path("models"), help="For --sample."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON answer."),
) -> None:
    """Send one request from the terminal and print the answer with its hops.

    Examples:
      cascade infer documents "The striker scored twice in the cup final"
      cascade infer vision --sample 3
      cascade infer vision --png digit.png --url http://127.0.0.1:8102
      cascade infer wine --sample 0        (a registered task: its test split)
    """
    import base64

    import httpx
    from rich.table import Table

    truth = None
    payload: dict[str, Any]
    if sample is not None:
        from cascade.models.manifest import load_manifest, load_split

        try:
            inputs, labels = load_split(models_dir, task, "test")
            declared = load_manifest(models_dir).task(task).input
        except (CascadeError, KeyError) as exc:
            fail(f"cannot load the test split of {task!r} from {models_dir}: {exc}")
        if not 0 <= sample < len(labels):
            fail(f"--sample must be between 0 and {len(labels) - 1}")
        truth = labels[sample]
        from cascade.contract.inputs import request_body

        payload = request_body(task, inputs[sample], declared)["input"]
    elif text is not None:
        payload = {"text": text}
    elif image is not None:
        try:
            payload = {"image": json.loads(image)}
        except json.JSONDecodeError as exc:
            fail(f"--image is not JSON: {exc}")
    elif png is not None:
        payload = {"png_base64": base64.b64encode(png.read_bytes()).decode()}
    else:
        fail("give a text, --image, --png or --sample")
    body: dict[str, Any] = {"task": task, "input": payload}
    if deadline_ms:
        body["deadline_ms"] = deadline_ms
    if url is None:
        url = "https://127.0.0.1:8101" if cacert.is_file() else "http://127.0.0.1:8101"
    verify: Any = True
    if url.startswith("https://") and cacert.is_file():
        import ssl

        verify = ssl.create_default_context(cafile=str(cacert))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.post(f"{url}/v1/infer", json=body, timeout=30, verify=verify,
                          headers=headers)
    except httpx.TransportError as exc:
        fail(f"cannot reach {url}: {exc} (is the chain up? `cascade up`)", 1)
    data = resp.json()
    if as_json:
        console.print_json(data=data)
        raise typer.Exit(0 if resp.status_code == 200 else 1)
    if resp.status_code != 200:
        err = data.get("error", {})
        fail(f"{resp.status_code} {err.get('code')}: {err.get('message')}", 1)
    console.print(
        f"[bold]{data['label']}[/] (confidence {data['confidence']:.3f}, {data['status']}, "
        f"answered by {data['answered_by']})" + (f"  true label: {truth}" if truth else "")
    )
    table = Table(show_header=True)
    for col in ("hop", "tier", "model", "label", "confidence", "decision", "ms"):
        table.add_column(col)
    for i, hop in enumerate(data["hops"], 1):
        table.add_row(str(i), hop["tier"], hop["model"], str(hop.get("label")),
                      f"{hop['confidence']:.3f}", hop["decision"], f"{hop['ms']:.2f}")
    print_table(table)
    console.print(f"id {data['id']}  trace {data.get('trace_id')}", style="dim")


def register_run_commands(app: typer.Typer) -> None:
    """Attach serve/up/infer to the root command."""
    app.command()(serve)
    app.command()(up)
    app.command()(infer)
