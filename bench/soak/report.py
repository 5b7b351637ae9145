"""The soak's report: markdown (faults, requests, errors per fault, writes verified,
RSS and descriptors start vs end) and, when asked, a PNG of RSS and descriptors over
the run with the fault windows shaded (matplotlib: the ``bench`` extra)."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run import Result


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False, cwd=Path(__file__).parent)
    return out.stdout.strip() or "?"


def markdown(result: Result, plot: str | None = None) -> str:
    from .run import BYTES_TOLERANCE, FD_SLACK, GRACE, RSS_FLOOR_MB, RSS_SLACK

    s = result.schedule
    t0 = min((w.start for w, _ in result.windows), default=0.0) - (
        min((f.at for f in s.faults), default=0.0))
    kinds = Counter(w.kind for w, _ in result.windows)
    lines = [f"# Soak: seed {s.seed}, {result.elapsed:.0f} s of load",
             "",
             f"Commit {_commit()}; `python -m bench soak --duration {s.duration:.0f} "
             f"--seed {s.seed}`. "
             f"Verdict: **{'PASS' if not result.failures else 'FAIL'}**.",
             "",
             "## Faults and client errors",
             "",
             f"Errors count against a fault when they fall between its start and {GRACE:.0f} s "
             "after its action ended.",
             "",
             "| fault | injected | client errors | warnings logged | longest window (s) |",
             "|---|---:|---:|---:|---:|"]
    for kind in sorted(kinds):
        longest = max(w.end - w.start for w, _ in result.windows if w.kind == kind)
        lines.append(f"| {kind} | {kinds[kind]} | {result.errors_per_fault.get(kind, 0)} | "
                     f"{result.log_per_fault.get(kind, 0)} | {longest:.1f} |")
    applied, refused = result.reloads
    lines += ["", f"Reloads: {applied} valid edits applied, {refused} invalid maps refused "
                  "(no window: a reload may cause no client error).",
              f"Client errors outside every window: {len(result.stray)}.", "",
              "## Requests", "", "| client kind | requests |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(result.requests.items())]
    lines += [f"| total | {sum(result.requests.values()):,} |", "",
              f"Pub/sub: {result.pubsub[0]:,} published, {result.pubsub[1]:,} received.", "",
              "## Acknowledged writes read back", "",
              "| store | keys checked | latest acknowledged value | a later failed write "
              "landed | an earlier failed write landed late | wrong or missing |",
              "|---|---:|---:|---:|---:|---:|"]
    for store, v in result.verdicts.items():
        lines.append(f"| {store} | {v.checked:,} | {v.ok:,} | {v.landed_unacked:,} | "
                     f"{v.landed_late:,} | {len(v.bad)} |")
    if result.forgotten:
        lines += ["", "Not checked: " + ", ".join(
            f"{n:,} {store} keys written before a kill of their node (memcached keeps nothing)"
            for store, n in result.forgotten.items()) + "."]
    (rss0, fd0), (rss1, fd1) = result.base, result.end
    lines += ["", "## cacheport's resources (supervisor + 2 workers, idle)", "",
              "| | start | end | tolerance |", "|---|---:|---:|---|",
              f"| descriptors (sockets, files) | {fd0} | {fd1} | +{FD_SLACK} |",
              f"| RSS (MB) | {rss0:.1f} | {rss1:.1f} | +{RSS_SLACK:.0%} or "
              f"+{RSS_FLOOR_MB:.0f} MB |"]
    if result.samples:
        peak_rss = max(x[1] for x in result.samples)
        peak_fd = max(x[2] for x in result.samples)
        lines.append(f"| peak under load | | RSS {peak_rss:.1f} MB, {peak_fd} descriptors | |")
    lines += ["", f"/metrics against a counted load (bytes within {BYTES_TOLERANCE:.0%}):", ""]
    lines += [f"- {m}" for m in result.metrics]
    lines += ["", f"Log lines at WARNING or above outside every fault window: "
                  f"{len(result.log_lines)} unexplained, "
                  f"{result.log_per_fault.get('explained', 0)} explained (reload refusals, "
                  "the supervisor restarting a killed worker)."]
    if plot:
        lines += ["", f"![RSS and descriptors over the run]({plot})"]
    lines += ["", "## Schedule", "", "| t (s) | fault | took (s) | what happened |",
              "|---:|---|---:|---|"]
    for w, detail in sorted(result.windows, key=lambda x: x[0].start):
        lines.append(f"| {w.start - t0:.1f} | {w.kind} | {w.end - w.start:.1f} | {detail} |")
    if result.failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in result.failures]
    return "\n".join(lines) + "\n"


def plot(result: Result, path: Path) -> None:
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    s = result.schedule
    t0 = min((w.start for w, _ in result.windows), default=0.0) - (
        min((f.at for f in s.faults), default=0.0))
    ts = [x[0] for x in result.samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 5.5))
    top.plot(ts, [x[1] for x in result.samples], color="tab:blue", linewidth=1)
    top.axhline(result.base[0], color="grey", linestyle=":", linewidth=1)
    top.set_ylabel("RSS (MB)")
    bottom.plot(ts, [x[2] for x in result.samples], color="tab:red", linewidth=1)
    bottom.axhline(result.base[1], color="grey", linestyle=":", linewidth=1)
    bottom.set_ylabel("descriptors")
    bottom.set_xlabel("seconds into the load")
    for w, _ in result.windows:
        for ax in (top, bottom):
            ax.axvspan(w.start - t0, w.end - t0, color="orange", alpha=0.15, linewidth=0)
    top.set_title(f"cacheport (supervisor + 2 workers) under the soak, seed {s.seed}; "
                  "shaded: fault windows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: Result, path: Path) -> None:
    png = path.with_suffix(".png")
    try:
        plot(result, png)
    except ImportError:
        print("bench soak: matplotlib is not installed (pip install 'cacheport[bench]'): "
              "no plot")
        path.write_text(markdown(result))
        return
    path.write_text(markdown(result, png.name))
