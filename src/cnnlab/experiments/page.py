"""experiment.html: one self-contained page (figures as data: URIs, nothing fetched) with the results table."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..files import save_atomic
from ..run import Run

__all__ = ["plot_error_curves", "degradation_page", "seeds_page"]

# Okabe-Ito, told apart with any colour vision; one per depth, shallow to deep.
_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")


def plot_error_curves(members: list[dict], title: str = "") -> bytes:
    """He et al. 2016, Fig. 6 style: training error thin and dashed, test error bold, in % against iterations;
    plain nets on the left, ResNets on the right, one colour per depth. Returns PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    depths = sorted({m["depth"] for m in members})
    colour = {d: _COLOURS[i % len(_COLOURS)] for i, d in enumerate(depths)}
    top = 0.0
    panels = ((axes[0], "plain", "plain", "plain nets"), (axes[1], "residual", "ResNet", "ResNets"))
    for ax, kind, label, name in panels:
        for m in sorted((m for m in members if m["kind"] == kind and m.get("curves")), key=lambda m: m["depth"]):
            c = m["curves"]
            train = [100 * e for e in c["train_error"]]
            ax.plot(
                c["iterations"],
                train,
                color=colour[m["depth"]],
                linewidth=1,
                linestyle="--",
                marker="o",
                markersize=3,
                markerfacecolor="none",
            )
            tested = [(i, 100 * e) for i, e in zip(c["iterations"], c["test_error"]) if e is not None]
            if tested:
                ax.plot(
                    *zip(*tested),
                    color=colour[m["depth"]],
                    linewidth=2.5,
                    marker="o",
                    markersize=3,
                    label=f"{label}-{m['depth']}",
                )
            top = max([top, *train, *(e for _, e in tested)])
        ax.set_title(name)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        if handles:
            ax.legend(title="test error (bold)\ntraining error (dashed)", fontsize=8, title_fontsize=8)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, min(100, top * 1.05 + 1))
    if title:
        fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


_STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } pre { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; } .verdict { font-size: 1.05em; background: #eef4fa; padding: 0.6em 0.9em; }
</style>"""

# Records images that failed to decode and script errors in <body> attributes: for a reader, and for the
# headless-browser test.
_CHECK = """<script>
var pageErrors = [];
window.addEventListener('error', function (e) { pageErrors.push(e.message || 'a resource failed to load'); }, true);
window.addEventListener('load', function () {
  var ok = 0;
  for (var i = 0; i < document.images.length; i++) {
    if (document.images[i].complete && document.images[i].naturalWidth > 0) ok++;
  }
  document.body.setAttribute('data-images', ok + '/' + document.images.length);
  document.body.setAttribute('data-errors', String(pageErrors.length));
});
</script>"""


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _seconds(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f}"


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"{_STYLE}{_CHECK}</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def _command(results: dict) -> str:
    return f"<h2>Command</h2><pre>{html.escape(results.get('command') or '')}</pre>"


def degradation_page(results: dict, figure_png: bytes, path: Path) -> Path:
    v = results["verdict"]
    rows = []
    for m in results["members"]:
        paper = "" if m["paper_test_error_percent"] is None else f"{m['paper_test_error_percent']:.2f}"
        report = Run(path.parent / m["run_dir"]).file("report")  # a member trained with --no-report has none
        target = f"{m['run_dir']}/{report.name}" if report.is_file() else f"{m['run_dir']}/"
        link = f'<a href="{html.escape(target)}">{html.escape(m["run_dir"])}/</a>'
        rows.append(
            f"<tr><td>{html.escape(m['name'])}</td><td>{m['kind']}</td><td>{m['depth']}</td>"
            f"<td>{_pct(m['train_error'])}</td><td>{_pct(m['test_error'])}</td><td>{paper}</td>"
            f"<td>{_seconds(m['wall_seconds'])}</td><td>{m['status']}</td><td>{link}</td></tr>"
        )
    image = base64.b64encode(figure_png).decode()
    body = (
        f'<p class="verdict">{html.escape(v["summary"])}</p>'
        "<h2>Training and test error</h2>"
        f'<img alt="training and test error of plain nets and ResNets against iterations" '
        f'src="data:image/png;base64,{image}">'
        '<p class="note">In the style of He et al. 2016, Fig. 6: dashed lines training error (running, on the '
        "augmented batches of each epoch), bold lines test error, at the end of each epoch.</p>"
        "<h2>Results</h2><table><tr><th>member</th><th>kind</th><th>depth</th><th>training error (%)</th>"
        "<th>test error (%)</th><th>paper's test error (%)</th><th>wall time (s)</th><th>status</th>"
        f"<th>run folder</th></tr>{''.join(rows)}</table>"
        f'<p class="note">Paper: {html.escape(results["paper"]["source"])}. The paper\'s figures come from 64k '
        "iterations on all 50,000 training images; a shorter budget gives higher errors.</p>"
        f'<p class="note">Verdict rule: {html.escape(v["criterion"])}; tolerance {v["tolerance"]} '
        "(fraction).</p>"
        + _command(results)
        + f"<h2>Verdict (as in results.json)</h2><pre>{html.escape(json.dumps(v, indent=2))}</pre>"
    )
    save_atomic(_page("Degradation: plain nets against ResNets", body).encode(), path)
    return path


def seeds_page(results: dict, path: Path) -> Path:
    s = results["test_accuracy"]
    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{r['seed']}</td><td>{_pct(r['test_accuracy'])}</td>"
        f"<td>{_seconds(r['wall_seconds'])}</td><td>{r['status']}</td></tr>"
        for r in results["runs"]
    )
    line = (
        f"{s['n']} run(s): test accuracy mean {_pct(s['mean'])}%"
        + (f", sample std {_pct(s['std'])} points" if s["std"] is not None else "")
        + (
            f", {s['at_or_above']} of {s['n']} at or above {_pct(s['threshold'])}%"
            if s["threshold"] is not None
            else ""
        )
    )
    body = (
        f'<p class="verdict">{html.escape(line)}</p><h2>Runs</h2><table><tr><th>run</th><th>seed</th>'
        f"<th>test accuracy (%)</th><th>wall time (s)</th><th>status</th></tr>{rows}</table>" + _command(results)
    )
    save_atomic(_page("Seeds: one recipe, several seeds", body).encode(), path)
    return path
