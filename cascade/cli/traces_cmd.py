"""``cascade traces``: recent traces from the tiers' JSON-lines trace files, as waterfalls."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import typer

from cascade.cli.common import console, err_console, fail, print_json_lines, print_table

BAR_WIDTH = 32
TIER_COLOURS = ("cyan", "green", "yellow", "magenta", "blue", "red")


@dataclass
class SpanNode:
    """One span and its children, ordered by start time."""

    record: dict[str, Any]
    children: list[SpanNode] = field(default_factory=list)

    @property
    def start_ns(self) -> int:
        return int(self.record["start_ns"])

    @property
    def duration_ms(self) -> float:
        return (int(self.record["end_ns"]) - self.start_ns) / 1e6


@dataclass
class Trace:
    """All spans of one trace id, from every tier that wrote them."""

    trace_id: str
    spans: list[dict[str, Any]]

    @property
    def start_ns(self) -> int:
        return min(int(s["start_ns"]) for s in self.spans)

    @property
    def duration_ms(self) -> float:
        return (max(int(s["end_ns"]) for s in self.spans) - self.start_ns) / 1e6

    @property
    def escalated(self) -> bool:
        return any(s.get("attrs", {}).get("cascade.decision") == "escalate" for s in self.spans)

    @property
    def tiers(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in sorted(self.spans, key=lambda s: int(s["start_ns"])):
            seen.setdefault(_tier_of(s), None)
        return list(seen)

    def roots(self) -> list[SpanNode]:
        """Span trees; a span whose parent was not recorded (a caller's span) is a root."""
        nodes = {s["span_id"]: SpanNode(s) for s in self.spans}
        roots: list[SpanNode] = []
        for node in nodes.values():
            parent = nodes.get(node.record.get("parent_id") or "")
            (parent.children if parent is not None else roots).append(node)
        for node in nodes.values():
            node.children.sort(key=lambda n: n.start_ns)
        return sorted(roots, key=lambda n: n.start_ns)

    def outcome(self) -> str:
        """How the request ended, from the first tier's SERVER span."""
        for root in self.roots():
            attrs = root.record.get("attrs", {})
            if "cascade.status" in attrs:
                return f"{attrs['cascade.status']}, answered by {attrs.get('cascade.answered_by', '?')}"
            if root.record.get("name") == "cascade.queue.drain":
                return f"queue drain: {attrs.get('cascade.queue.outcome', '?')}"
            code = attrs.get("http.response.status_code")
            if code is not None:
                return f"HTTP {code}"
        return ""


def _tier_of(record: dict[str, Any]) -> str:
    return str(record.get("tier") or record.get("attrs", {}).get("cascade.tier")
               or record.get("service") or "?")


def group_traces(records: list[dict[str, Any]]) -> list[Trace]:
    """Records grouped by trace id, most recent first."""
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for record in records:
        key = (record["trace_id"], record["span_id"])
        if key not in seen:  # the same file read twice (a .1 rotation copy) adds nothing
            seen.add(key)
            by_id[record["trace_id"]].append(record)
    return sorted((Trace(t, s) for t, s in by_id.items()), key=lambda t: t.start_ns, reverse=True)


def select_traces(traces: list[Trace], *, trace_id: str | None = None, slow_ms: float | None = None,
                  escalated: bool = False, limit: int = 10) -> list[Trace]:
    """Apply the command's filters (pure, for tests)."""
    if trace_id:
        wanted = trace_id.lower()
        return [t for t in traces if t.trace_id.startswith(wanted)]
    out = [t for t in traces
           if (slow_ms is None or t.duration_ms >= slow_ms) and (not escalated or t.escalated)]
    return out[:limit]


def _detail(record: dict[str, Any]) -> str:
    a = record.get("attrs", {})
    parts: list[str] = []
    if "cascade.decision" in a:
        conf = a.get("cascade.confidence")
        parts.append(f"{a['cascade.decision']}" + (f" @ {conf:.3f}" if isinstance(conf, float) else ""))
    if record.get("kind") == "SERVER" and "cascade.status" in a:
        parts.append(f"→ {a['cascade.status']} by {a.get('cascade.answered_by', '?')}")
    if "cascade.model" in a and record.get("name") == "cascade.inference":
        parts.append(str(a["cascade.model"]))
    if "http.request.resend_count" in a:
        parts.append(f"attempt {int(a['http.request.resend_count']) + 1}")
    if record.get("kind") == "CLIENT" and "http.response.status_code" in a:
        parts.append(f"HTTP {a['http.response.status_code']}")
    elif record.get("kind") == "CLIENT" and "error.type" in a:
        parts.append(str(a["error.type"]))
    if "cascade.queue.outcome" in a:
        parts.append(str(a["cascade.queue.outcome"]))
    for link in record.get("links", []):
        parts.append(f"linked to trace {link['trace_id'][:12]}…")
    if record.get("status") == "ERROR":
        parts.append("[red]ERROR[/]")
    return "  ".join(parts)


def _bar(start_ns: int, duration_ms: float, t0_ns: int, total_ms: float) -> str:
    total = max(total_ms, 1e-6)
    offset = int((start_ns - t0_ns) / 1e6 / total * BAR_WIDTH)
    length = max(1, round(duration_ms / total * BAR_WIDTH))
    offset = min(offset, BAR_WIDTH - 1)
    length = min(length, BAR_WIDTH - offset)
    return "·" * offset + "█" * length + "·" * (BAR_WIDTH - offset - length)


def trace_header(trace: Trace) -> str:
    """One line: id, start time, total duration, the tiers it crossed, how it ended."""
    from datetime import datetime

    when = datetime.fromtimestamp(trace.start_ns / 1e9, UTC).strftime(
        "%Y-%m-%d %H:%M:%S.%f")[:-3]
    return (f"trace [bold]{trace.trace_id}[/]  {when} UTC  [bold]{trace.duration_ms:.2f} ms[/]  "
            f"{' → '.join(trace.tiers)}  {trace.outcome()}")


def render_trace(trace: Trace) -> Any:
    """A rich Table: one row per span, indented by depth, with a waterfall bar."""
    from rich.table import Table

    t0, total = trace.start_ns, trace.duration_ms
    colours = {tier: TIER_COLOURS[i % len(TIER_COLOURS)] for i, tier in enumerate(trace.tiers)}
    table = Table(show_edge=False, pad_edge=False, expand=False)
    for col, kw in (("span", {}), ("tier", {}), ("ms", {"justify": "right"}),
                    ("waterfall", {"no_wrap": True}), ("detail", {})):
        table.add_column(col, **kw)

    def walk(node: SpanNode, depth: int) -> None:
        r = node.record
        name = r.get("name", "?")
        if r.get("kind") == "CLIENT":
            name = f"{name} → upstream"
        tier = _tier_of(r)
        colour = colours.get(tier, "white")
        table.add_row("  " * depth + name, f"[{colour}]{tier}[/]", f"{node.duration_ms:.2f}",
                      f"[{colour}]{_bar(node.start_ns, node.duration_ms, t0, total)}[/]",
                      _detail(r))
        for child in node.children:
            walk(child, depth + 1)

    for root in trace.roots():
        walk(root, 0)
    return table


def traces(
    path: Path = typer.Argument(
        Path("var/traces"), help="A trace file (<tier>.jsonl) or a directory of them."),
    trace_id: str | None = typer.Option(None, "--trace", help="Show this trace (id or prefix)."),
    slow: float | None = typer.Option(None, "--slow", metavar="MS",
                                         help="Only traces that took at least MS milliseconds."),
    escalated: bool = typer.Option(False, "--escalated", help="Only traces where a tier escalated."),
    limit: int = typer.Option(10, "--limit", "-n", min=1, help="How many recent traces to show."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document per trace (JSON lines): "
                                 "id, duration, tiers, outcome and its span records."),
) -> None:
    """Show recent traces across tiers as waterfall trees, with durations and gate decisions.

    Reads the JSON-lines files the tiers write when CASCADE_TRACE_DIR is set (the default in
    `cascade up`: var/traces/<tier>.jsonl); a Collector's OTLP/JSON file works too.

    Examples:
      cascade traces                      the 10 most recent traces
      cascade traces --escalated -n 3     the 3 most recent that climbed the chain
      cascade traces --slow 50            traces that took 50 ms or more
      cascade traces --trace 4bf92f35     one trace (the trace_id of a response; a prefix will do)
    """
    from cascade.observability.export import TraceFileError, read_span_records

    try:
        records, problems = read_span_records(path)
    except TraceFileError as exc:
        fail(str(exc))
    for problem in problems:
        err_console.print(f"[yellow]warning:[/] {problem}", highlight=False)
    chosen = select_traces(group_traces(records), trace_id=trace_id, slow_ms=slow,
                           escalated=escalated, limit=limit)
    if not chosen:
        if trace_id:
            fail(f"no trace {trace_id!r} in {path}", 1)
        if not as_json:
            console.print(f"no traces in {path} match", highlight=False)
        return
    if as_json:
        print_json_lines({"trace_id": t.trace_id, "duration_ms": round(t.duration_ms, 3),
                          "tiers": t.tiers, "escalated": t.escalated, "outcome": t.outcome(),
                          "spans": sorted(t.spans, key=lambda s: int(s["start_ns"]))}
                         for t in chosen)
        return
    for trace in chosen:
        console.print(trace_header(trace), soft_wrap=True, highlight=False)
        print_table(render_trace(trace))
        console.print()
