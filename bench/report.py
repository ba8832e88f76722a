"""The scale report: docs/bench/report.md, its PNG plots (matplotlib) and the README's excerpt, from
the results `python -m bench` collected (docs/bench/results.json). Rendering only: no measuring here.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

MB = 1e6
MIB = 1 << 20
README_START = "<!-- bench:start (written by python -m bench) -->"
README_END = "<!-- bench:end -->"


def _done(bursts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in bursts if "afsd" in b]


def _ok(timings: list[dict[str, Any]], phase: str) -> list[float]:
    return sorted(t[phase] for t in timings if not t["error"])


def first_provider_share(burst: dict[str, Any]) -> tuple[str, float, float]:
    """(the node that served peers most, its share of all bytes served to peers, total bytes)."""
    final = burst["afsd"]["served"][-1][1] if burst["afsd"]["served"] else {}
    total = sum(final.values())
    if not total:
        return "", 0.0, 0.0
    first = max(final, key=final.get)
    return first, final[first] / total, total


def registry_gets_per_blob(burst: dict[str, Any]) -> str:
    counts = sorted(set(burst["afsd"]["registry_gets"].values()))
    return "/".join(str(c) for c in counts)


def _p(summary: dict[str, Any], phase: str) -> tuple[float, float]:
    numbers = summary.get(phase) or {}
    return numbers.get("p50", float("nan")), numbers.get("p99", float("nan"))


def burst_rows(bursts: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for b in bursts:
        if "afsd" not in b:
            rows.append([str(b["nodes"]), b.get("skipped", "not run")] + [""] * 9)
            continue
        a, base = b["afsd"]["summary"], b.get("baseline", {}).get("summary", {})
        failed = f"{len(a['failed'])} / {len(base.get('failed', []))}"
        cells = [str(b["nodes"]), failed, registry_gets_per_blob(b)]
        for phase in ("first_byte", "task_started", "whole_image"):
            ap, bp = _p(a, phase), _p(base, phase)
            cells.append(f"{ap[0]:.1f} / {ap[1]:.1f}")
            cells.append(f"{bp[0]:.1f} / {bp[1]:.1f} (×{ap[0] / bp[0]:.2f})" if bp[0] == bp[0] else "—")
        _, share, total = first_provider_share(b)
        cells.append(f"{share:.2f} of {total / MB:,.0f} MB")
        peak = max(b["afsd"]["peak_memory"].values(), key=lambda m: m["pss"])
        cells.append(f"{peak['pss'] / MIB:.0f} ({peak['rss'] / MIB:.0f})")
        rows.append(cells)
    return rows


BURST_HEADERS = ["M", "nodes failed: afsd / registry pull", "registry GETs per blob", "afsd first byte p50 / p99 s", "registry pull first byte (ratio)",
                 "afsd task start p50 / p99 s", "registry pull task start (ratio)", "afsd whole image p50 / p99 s",
                 "registry pull whole image (ratio)", "served by the first provider ÷ all served to peers",
                 "peak PSS (RSS) per node, MiB"]


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _save(figure: Any, axes: Any, path: Path) -> None:
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_cdf(burst: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for source, style in (("afsd", "-"), ("baseline", "--")):
        if source not in burst:
            continue
        label = "afsd" if source == "afsd" else "registry pull + unpack"
        for phase, colour in (("first_byte", "tab:blue"), ("whole_image", "tab:orange")):
            values = _ok(burst[source]["timings"], phase)
            if values:  # over every node: a node whose mount failed never gets there
                ys = [(i + 1) / len(burst[source]["timings"]) for i in range(len(values))]
                axes.step(values, ys, where="post", linestyle=style, color=colour,
                          label=f"{label}: {phase.replace('_', ' ')}")
    axes.set_xlabel("seconds from the burst's start")
    axes.set_ylabel("fraction of nodes")
    failed = len(burst["afsd"]["summary"]["failed"])
    axes.set_title(f"Burst of one new image onto {burst['nodes']} nodes"
                   + (f" ({failed} afsd mounts failed)" if failed else ""))
    axes.legend(fontsize=8, loc="lower right")
    _save(figure, axes, path)


def plot_served(burst: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    series = burst["afsd"]["served"]
    nodes = sorted(series[-1][1], key=lambda n: -series[-1][1][n]) if series else []
    times = [t for t, _ in series]
    for node in nodes:
        values = [counts.get(node, 0.0) / MB for _, counts in series]
        if values and values[-1] > 0:
            axes.plot(times, values, label=node)
    axes.set_xlabel("seconds from the burst's start")
    axes.set_ylabel("MB served to other nodes (cumulative)")
    axes.set_title(f"Bytes each layerstore served its peers ({burst['nodes']} nodes)")
    if nodes:
        axes.legend(fontsize=7, ncol=2)
    _save(figure, axes, path)


def plot_discovery(discovery: list[dict[str, Any]], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    sizes = [d["nodes"] for d in discovery]
    for name, colour in (("FindProvider(popular layer)", "tab:blue"), ("FindProvider(any layer)", "tab:green"),
                         ("FindImage(image)", "tab:orange")):
        axes.plot(sizes, [d["queries"][name]["p50_ms"] for d in discovery], "o-", color=colour, label=f"{name} p50")
        axes.plot(sizes, [d["queries"][name]["p99_ms"] for d in discovery], "o--", color=colour, label=f"{name} p99")
    axes.set_xscale("log")
    axes.set_xlabel("simulated layerstores (100 layers each)")
    axes.set_ylabel("latency, ms")
    axes.set_title("Discovery latency vs nodes (heartbeats every 10 s meanwhile)")
    axes.legend(fontsize=7)
    _save(figure, axes, path)


def plot_memory(bursts: list[dict[str, Any]], path: Path) -> None:
    done = _done(bursts)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    sizes = [b["nodes"] for b in done]
    for key, label, style in (("pss", "PSS", "o-"), ("rss", "RSS", "s--")):
        axes.plot(sizes, [max(m[key] for m in b["afsd"]["peak_memory"].values()) / MIB for b in done], style,
                  label=f"peak {label} per node (largest)")
        axes.plot(sizes, [sum(m[key] for m in b["afsd"]["peak_memory"].values()) / len(b["afsd"]["peak_memory"])
                          / MIB for b in done], style, alpha=0.5, label=f"peak {label} per node (mean)")
    axes.set_xlabel("simulated nodes M")
    axes.set_ylabel("MiB per node")
    axes.set_title("Memory per simulated node during the burst")
    axes.legend(fontsize=8)
    _save(figure, axes, path)


def discovery_rows(discovery: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for d in discovery:
        q = d["queries"]
        rows.append([str(d["nodes"]), f"{d['heartbeat']['cpu_ms_per_heartbeat']:.2f}",
                     *(f"{q[name]['p50_ms']:.1f} / {q[name]['p99_ms']:.1f} ({q[name]['answer_bytes']:,} B)"
                       for name in ("FindProvider(popular layer)", "FindProvider(any layer)",
                                    "FindImageProvider(image)", "FindImage(image)", "FindProvider(\"\") endpoints")),
                     f"{d['before']['answer_bytes']:,} B" + (" (> 4 MiB)" if d["before"]["over_4_mib"] else "")])
    return rows


DISCOVERY_HEADERS = ["nodes", "CPU ms per heartbeat", "FindProvider(popular layer) p50 / p99 ms (answer)",
                     "FindProvider(any layer)", "FindImageProvider(image)", "FindImage(image)",
                     "FindProvider(\"\"), endpoints view", "before: FindProvider(popular layer) as whole records"]


def memory_rows(bursts: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for b in bursts:
        if "afsd" not in b:
            rows.append([str(b["nodes"]), "", "", "", b.get("skipped", "")])
            continue
        idle = b["idle_memory"].values()
        peaks = b["afsd"]["peak_memory"].values()
        rows.append([str(b["nodes"]), f"{sum(m['pss'] for m in idle) / len(idle) / MIB:.0f}",
                     f"{sum(m['pss'] for m in peaks) / len(peaks) / MIB:.0f}",
                     f"{max(m['pss'] for m in peaks) / MIB:.0f} ({max(m['rss'] for m in peaks) / MIB:.0f})",
                     b["memory_check"]])
    return rows


def process_rows(burst: dict[str, Any]) -> list[list[str]]:
    rows = []
    for command, memory in burst["afsd"].get("first_node_processes", []):
        words = command.split()
        name = next((w for w in words if w.startswith("afsd.") or w in ("layerstore", "node")), words[0])
        rows.append([name, f"{memory['pss'] / MIB:.0f}", f"{memory['rss'] / MIB:.0f}"])
    return rows


def write_report(results: dict[str, Any], out: Path) -> Path:
    """report.md and the plots into `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    bursts, discovery, facts = results["bursts"], results["discovery"], results["machine"]
    done = _done(bursts)
    largest = max(done, key=lambda b: b["nodes"]) if done else None
    plots = []
    if largest:
        plot_cdf(largest, out / "burst_cdf.png")
        plot_served(largest, out / "served_by_provider.png")
        plot_memory(bursts, out / "memory_per_node.png")
        plots += ["burst_cdf.png", "served_by_provider.png", "memory_per_node.png"]
    if discovery:
        plot_discovery(discovery, out / "discovery_latency.png")
        plots.append("discovery_latency.png")
    text = [f"# afsd at scale: burst, discovery, memory ({results['date']})", "",
            f"Machine: {facts['cpus']} cores, {facts.get('memory_gib', '?')} GiB, kernel {facts['kernel']}, Python "
            f"{facts['python']}; shared with other work (load average at the start "
            f"{', '.join(str(x) for x in facts['load_average_1_5_15'])}). Commit {results.get('commit', '?')}. "
            f"Command: `{results['command']}` ({results['seconds'] / 60:.0f} minutes).", "",
            "Every number below comes from this one run; ratios compare afsd with the baseline measured on the same "
            "simulated network right after it. Absolute seconds depend on the host's load: read the ratios.", ""]
    if done:
        first = done[0]
        image = first["image"]
        text += ["## Burst: M nodes mount one never-seen image at once", "",
                 f"Image: Debian bookworm + Python 3 + an application, {len(image['layers'])} layers, "
                 f"{image['compressed_bytes'] / MB:.0f} MB compressed, "
                 f"{first['afsd']['timings'][0]['bytes_read'] / MB:.0f} MB in "
                 f"{first['afsd']['timings'][0]['files_read']:,} files unpacked. Each node: its own network "
                 f"namespace, a {results['rate_mbit']:g} Mbit/s link each way (tbf), a layerstore and a node "
                 "daemon (fanotify backend, 1 fetch worker). First byte: `afsd mount` plus one byte of "
                 "/usr/bin/python3; task start: `python3 /app/main.py` in the rootfs (chroot); whole image: every "
                 "file read to its end. Baseline: each node downloads all layer blobs from the registry at once "
                 "(curl) and unpacks them (tar), then runs the same task. Times in seconds from the common start "
                 "(p50 / p99 over nodes); ratio = afsd p50 ÷ baseline p50.", "",
                 table(BURST_HEADERS, burst_rows(bursts)), ""]
        for b in done:
            reasons = Counter(re.sub(r"sha256:([0-9a-f]{8})[0-9a-f]{56}", r"sha256:\1…", line.split(": ", 1)[1])[:240]
                              for line in b["afsd"]["summary"]["failed"])
            if reasons:
                text += [f"Failed afsd mounts at M={b['nodes']} (p50/p99 above are over the nodes that "
                         "succeeded; the CDF counts every node):", ""]
                text += [f"- {count} × `{reason}`" for reason, count in reasons.most_common()] + [""]
        if largest:
            text += [f"![CDF of first byte and whole image, {largest['nodes']} nodes](burst_cdf.png)", "",
                     f"![Bytes served per provider over time, {largest['nodes']} nodes](served_by_provider.png)", ""]
            rpcs = largest["afsd"]["discovery_rpcs"]
            text += [f"Discovery during the {largest['nodes']}-node burst ({largest['afsd']['duration']:.0f} s): "
                     + ", ".join(f"{m} {c:.0f} ({c / largest['afsd']['duration']:.1f}/s)" for m, c in rpcs.items())
                     + f". Simulated link round trip (TCP connect, node to node): {largest.get('rtt_ms', 0):.3f} ms.",
                     ""]
    if discovery:
        text += ["## Discovery with simulated layerstores of 100 layers each", "",
                 "A real `afsd discovery` process; every simulated layerstore heartbeats it (3 rounds measured for "
                 "CPU), then keeps heartbeating every 10 s while clients ask (4 at a time). Cells: p50 / p99 ms "
                 "(median answer size). The last column is what the reference's whole-record answer to the same "
                 "question weighs: past 4 MiB a default gRPC client cannot receive it.", "",
                 table(DISCOVERY_HEADERS, discovery_rows(discovery)), "", "![Discovery latency vs nodes]"
                 "(discovery_latency.png)", ""]
    if done:
        fitting = max(b["nodes"] for b in done)
        text += ["## Memory per simulated node", "",
                 "PSS divides shared pages among the processes sharing them (what a node really costs the host); "
                 "RSS counts them in every process. Idle: after start, before the first mount (layerstore + node "
                 "daemon); peak: the largest sample during the burst (plus the fanotify supervisor, its keeper and "
                 "one fetch worker).", "",
                 table(["M", "idle PSS MiB (mean)", "peak PSS MiB (mean)", "peak PSS (RSS) MiB, largest node",
                        "memory check before the run"], memory_rows(bursts)), "",
                 f"Largest M in this run: **{fitting}** (whether a size fits this host: the memory check column). ![Memory per node](memory_per_node.png)", "",
                 "The first node's processes at the end of its reads (MiB):", "",
                 table(["process", "PSS", "RSS"], process_rows(done[0])), ""]
    variants = [v for v in results.get("memory_variants", []) if "afsd" in v]
    if variants:
        text += ["### Shrinking a node, one step at a time", "",
                 "Each row: a 2-node burst of the same image (no baseline), the largest node's peak during it.", "",
                 table(["node configuration", "peak PSS MiB", "peak RSS MiB", "whole image p50 s"],
                       [[v["variant"], f"{max(m['pss'] for m in v['afsd']['peak_memory'].values()) / MIB:.0f}",
                         f"{max(m['rss'] for m in v['afsd']['peak_memory'].values()) / MIB:.0f}",
                         f"{_p(v['afsd']['summary'], 'whole_image')[0]:.1f}"] for v in variants]), ""]
    text += ["## What this host cannot simulate", "",
             "This kernel has tbf/htb but neither netem nor fq/etf (the qdiscs that honour a BPF-set departure "
             "time), so links are rate-limited but no latency or loss is added: the only delay is the veth "
             "pair's own (the round trip above). All members share the host's 2 cores, so CPU, not the "
             "simulated links, bounds most phases.", ""]
    (out / "report.md").write_text("\n".join(text))
    return out / "report.md"


def readme_excerpt(results: dict[str, Any]) -> str:
    done = _done(results["bursts"])
    lines = [README_START, "",
             f"Latest `{results.get('command', 'python -m bench')}` run ({results['date']}; {results['machine']['cpus']} cores, "
             f"{results['machine'].get('memory_gib', '?')} GiB, shared host, load "
             f"{results['machine']['load_average_1_5_15'][0]}): [docs/bench/report.md](docs/bench/report.md).", ""]
    if done:
        lines += [table(BURST_HEADERS[:5] + BURST_HEADERS[7:10],
                        [row[:5] + row[7:10] for row in burst_rows(results["bursts"]) if row[2]]), "",
                  "![CDF of first byte and whole image](docs/bench/burst_cdf.png)", ""]
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme: Path, results: dict[str, Any]) -> None:
    text = readme.read_text()
    excerpt = readme_excerpt(results)
    if README_START in text and README_END in text:
        before, rest = text.split(README_START, 1)
        after = rest.split(README_END, 1)[1]
        text = before + excerpt + after
    else:
        text = text.rstrip("\n") + "\n\n## Scale (simulated cluster)\n\n" + excerpt + "\n"
    readme.write_text(text)
