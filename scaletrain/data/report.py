"""`report.png` of a prepared text directory: documents left after each stage of the
pipeline (and how many that stage dropped), and the histogram of document lengths in
tokens. Drawn from the manifest alone, so it shows exactly what manifest.json says."""

from __future__ import annotations

from pathlib import Path

# A bare Figure draws with the Agg canvas: no pyplot, so no display backend is looked
# for on a cluster node or in CI, and no global figure state is left behind.
from matplotlib.figure import Figure

REPORT = "report.png"

# Stages that are counts of records read, not of documents removed.
_NOT_DROPS = ("records", "documents")


def stage_flow(stages: dict[str, int]) -> list[tuple[str, int, int]]:
    """[(stage, documents left after it, dropped by it)] from the manifest's stages:
    every count between "records" and "documents" removes documents."""
    left = stages.get("records", 0)
    flow = [("records", left, 0)]
    for name, n in stages.items():
        if name in _NOT_DROPS:
            continue
        left -= n
        flow.append((name, left, n))
    return flow


def draw_report(path: Path, manifest: dict) -> None:
    """Write the two panels to `path` (PNG)."""
    flow = stage_flow({k: manifest["stages"][k] for k in manifest["stage_order"]})
    lengths = manifest.get("lengths", {"lo": [], "documents": []})
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    names = [f[0] for f in flow]
    y = range(len(flow))
    ax1.barh(y, [f[1] for f in flow], color="tab:blue", label="kept")
    ax1.barh(y, [f[2] for f in flow], left=[f[1] for f in flow], color="tab:red",
             label="dropped")
    ax1.set_yticks(list(y), names)
    ax1.invert_yaxis()
    ax1.set_xlabel("documents")
    ax1.set_title("documents kept / dropped per stage")
    ax1.legend(loc="lower right")
    lo, docs = lengths["lo"], lengths["documents"]
    ax2.bar(range(len(lo)), docs, color="tab:green")
    ax2.set_xticks(range(len(lo)), [str(v) for v in lo], rotation=45)
    ax2.set_xlabel("document length in tokens (bin starts; each bin doubles)")
    ax2.set_ylabel("documents")
    ax2.set_title("document lengths")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
