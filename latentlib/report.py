"""The pipeline's reports: each executed notebook rendered to a self-contained HTML page,
and ``index.html`` linking every notebook, table and figure of a run.

What a reader should see in a rendered notebook is what JupyterLab shows after the run:

- **progress bars as one final line.** In a kernel with ipywidgets, ``tqdm.auto`` draws a
  widget, which JupyterLab animates and papermill records as a display output plus the
  widget's last state in ``metadata.widgets``; :class:`ProgressWidgetsAsText` writes each
  bar as its final line of text (``name: 100%|██████████| 50/50 [00:04<00:00, ...]``).
  Bars written to a stream (plain ``tqdm``) are redrawn with carriage returns: nbconvert's
  ``CoalesceStreamsPreprocessor`` merges a cell's consecutive stream outputs and keeps
  what a terminal would show after the last ``\\r`` of each line.
- **no request leaves the page.** nbconvert's lab template loads require.js and MathJax
  from a CDN (and the widget manager when a notebook holds widget state). The notebooks
  use no LaTeX and the widgets are written as text, so :data:`TEMPLATE` drops those
  scripts: a report opens offline, without console errors.

Nothing here hides a warning: a warning a cell printed is in its report.
"""

from __future__ import annotations

import html
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

__all__ = ["render_html", "write_index", "ProgressWidgetsAsText", "HEADLINE_FIGURES", "MAIN_TABLES"]

# the lab template without the scripts it would fetch from a CDN (see the module docstring)
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<link rel="icon" href="data:,">{%- endblock extra_css -%}
"""
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MAIN_TABLES = ("main", "base")  # the table on top of index.html: 04's main table, else 00's base table
# the figure under it: 04's accuracy against what each method writes, else the first that exists
HEADLINE_FIGURES = ("accuracy_vs_visible_tokens", "qthink_accuracy_vs_tokens", "switch_phases_accuracy_vs_tokens")


def _preprocessor_base():
    from nbconvert.preprocessors import Preprocessor

    return Preprocessor


class ProgressWidgetsAsText(_preprocessor_base()):
    """Replaces each tqdm widget output by the bar's final line, read from the widget
    state papermill stored in the notebook, and drops that state (the page then needs no
    widget manager). Consecutive bars of a cell become one block of lines. A widget that
    is not a tqdm bar keeps the text its kernel gave as a fallback."""

    def preprocess(self, nb, resources):
        store = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        self._state = {k: v.get("state", {}) for k, v in store.items()}
        for cell in nb.cells:
            if cell.get("outputs"):
                cell.outputs = self._outputs(cell.outputs)
        nb.metadata.pop("widgets", None)
        return nb, resources

    def _outputs(self, outputs):
        from nbformat.v4 import new_output

        out = []
        for o in outputs:
            data = o.get("data", {}) if o.get("output_type") in ("display_data", "execute_result") else {}
            if WIDGET_VIEW not in data:
                out.append(o)
                continue
            line = self.bar_line(data[WIDGET_VIEW].get("model_id"))
            if line is None:
                fallback = {k: v for k, v in data.items() if k != WIDGET_VIEW}
                if fallback:
                    o.data = fallback
                    out.append(o)
                continue
            prev = out[-1] if out else None
            if prev is not None and prev.get("metadata", {}).get("latentlib") == "progress":
                prev.data["text/plain"] += "\n" + line
            else:
                out.append(new_output("display_data", data={"text/plain": line}, metadata={"latentlib": "progress"}))
        return out

    def bar_line(self, model_id) -> str | None:
        """The text of a tqdm bar (an HBox of description, progress, numbers) in its last state."""
        box = self._state.get(model_id)
        if not box or box.get("_model_name") != "HBoxModel":
            return None
        kids = [self._state.get(str(c).removeprefix("IPY_MODEL_"), {}) for c in box.get("children", [])]
        names = [k.get("_model_name") for k in kids]
        if len(kids) != 3 or names[0] != "HTMLModel" or names[2] != "HTMLModel" or \
                names[1] not in ("FloatProgressModel", "IntProgressModel"):
            return None
        left, bar, right = kids

        def text(w):
            return html.unescape(str(w.get("value", ""))).replace("\u2007", " ").strip()

        total, n = bar.get("max") or 0, bar.get("value") or 0
        if total and total > 0:
            filled = max(0, min(10, int(10 * n / total)))
            meter = "|" + "█" * filled + " " * (10 - filled) + "|"
        else:
            meter = ""
        line = f"{text(left)}{meter} {text(right)}".strip()
        return line if line else None


def _exporter():
    import jinja2
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config({"CoalesceStreamsPreprocessor": {"enabled": True}})
    exporter = HTMLExporter(config=config, extra_loaders=[jinja2.DictLoader({"latentlib.html.j2": TEMPLATE})],
                            template_file="latentlib.html.j2")
    exporter.register_preprocessor(ProgressWidgetsAsText, enabled=True)
    return exporter


def render_html(executed: Path) -> Path:
    """``executed`` (an executed ``.ipynb``) as HTML beside it; returns the HTML's path."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    body, _ = _exporter().from_notebook_node(nb, resources={"metadata": {"name": Path(executed).stem}})
    out = Path(executed).with_suffix(".html")
    out.write_text(body)
    return out


# ------------------------------------------------------------------------------------------------- index.html


def _commit(cwd: Path | None) -> str:
    """The checkout's commit (with ``+changes`` when the tree differs from it), else ''."""
    if cwd is None:
        return ""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _made_by(report: Path, stages: list[str]) -> dict[str, str]:
    """Which notebook saved each table or figure: the executed notebook whose code names it."""
    sources = {}
    for stage in stages:
        path = report / f"{stage}.ipynb"
        if path.exists():
            try:
                cells = json.loads(path.read_text()).get("cells", [])
            except json.JSONDecodeError:
                continue
            sources[stage] = "\n".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code")
    out = {}
    for p in list((report / "tables").glob("*.csv")) + list((report / "figures").glob("*.png")):
        pat = re.compile(rf"""["']{re.escape(p.stem)}(\.{p.suffix[1:]})?["']""")
        out.setdefault(p.stem, "")
        for stage, src in sources.items():
            if pat.search(src):
                out[p.stem] = stage
                break
    return out


def _table_html(path: Path, float_format=None) -> str:
    import pandas as pd

    df = pd.read_csv(path)
    return df.to_html(index=False, border=0, na_rep="", float_format=float_format, classes="data")


def _threads(report: Path, stages: list[str]) -> str:
    """The ``threads`` parameter the executed notebooks ran with (papermill records it)."""
    seen = []
    for stage in stages:
        path = report / f"{stage}.ipynb"
        try:
            value = json.loads(path.read_text())["metadata"]["papermill"]["parameters"].get("threads")
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            continue
        if value is not None and str(value) not in seen:
            seen.append(str(value))
    return "/".join(seen)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("latentlib", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_index(report: Path, run: str, preset: str, results: list[dict], *, project: Path | None = None) -> Path:
    """``report/index.html``: the main table and the headline figure on top, then every
    notebook (HTML and .ipynb), every table (CSV and Markdown) and every figure. Also
    ``report/run_info.json``: the date, commit and thread count of the run (what
    ``latentlib.readme`` quotes)."""
    q = html.escape
    report = Path(report)
    tables = report / "tables"
    figures = report / "figures"
    csvs = sorted(tables.glob("*.csv"))
    pngs = sorted(figures.glob("*.png"))
    stages = [r["stage"] for r in results]
    made_by = _made_by(report, stages)
    main = next((tables / f"{n}.csv" for n in MAIN_TABLES if (tables / f"{n}.csv").exists()), None)
    probes = tables / "probes_summary.csv"
    headline = next((figures / f"{n}.png" for n in HEADLINE_FIGURES if (figures / f"{n}.png").exists()),
                    pngs[0] if pngs else None)

    total = sum(r.get("seconds", 0) for r in results)
    ok = sum(r["status"] == "ok" for r in results)
    commit = _commit(project)
    threads = _threads(report, stages)
    meta = [f"written {time.strftime('%Y-%m-%d %H:%M')}", f"{ok} of {len(results)} notebooks ran",
            f"{total:.0f} s ({total / 60:.1f} min)"]
    if commit:
        meta.append(f"commit <code>{q(commit)}</code>")
    if threads:
        meta.append(f"{q(threads)} threads")
    parts = [f"<h1>latentlib report: run <code>{q(run)}</code> (preset <code>{q(preset)}</code>)</h1>",
             f"<p class='meta'>{' · '.join(meta)}</p>",
             "<nav><a href='#results'>results</a> · <a href='#notebooks'>notebooks</a> · "
             "<a href='#tables'>tables</a> · <a href='#figures'>figures</a></nav>"]
    failed = [r["stage"] for r in results if r["status"] == "failed"]
    if failed:
        parts.append(f"<p class='failed'>failed: {', '.join(q(s) for s in failed)} (its report shows the error)</p>")

    top = ["<section id='results'>"]
    if main is not None:
        top.append(f"<h2>Results <small>(<a href='tables/{main.name}'>{main.name}</a>"
                   + (f", from {q(made_by[main.stem])}" if made_by.get(main.stem) else "") + ")</small></h2>")
        top.append(_table_html(main))
    else:
        top.append("<h2>Results</h2><p>no main table yet: notebook 04_evaluation writes <code>tables/main.csv</code>"
                   "</p>")
    if headline is not None:
        top.append(f"<figure class='headline'><a href='figures/{headline.name}'><img src='figures/{headline.name}' "
                   f"alt='{q(headline.stem)}'></a><figcaption>{q(headline.stem)}"
                   + (f" ({q(made_by[headline.stem])})" if made_by.get(headline.stem) else "") + "</figcaption></figure>")
    if probes.exists():
        top.append(f"<h2>Probes <small>(<a href='tables/{probes.name}'>{probes.name}</a>)</small></h2>"
                   + _table_html(probes, float_format=lambda v: f"{v:.3f}"))
    top.append("</section>")
    parts += top

    rows = []
    for r in results:
        stage, status = r["stage"], r["status"]
        links = []
        if (report / f"{stage}.html").exists():
            links.append(f"<a href='{stage}.html'>report</a>")
        if (report / f"{stage}.ipynb").exists():
            links.append(f"<a href='{stage}.ipynb'>notebook</a>")
        made = [n for n, s in made_by.items() if s == stage]
        n_fig = sum((figures / f"{n}.png").exists() for n in made)
        n_tab = sum((tables / f"{n}.csv").exists() for n in made)
        secs = f"{r['seconds']:.0f}" if "seconds" in r else ""
        rows.append(f"<tr><td>{q(stage)}</td><td class='{q(status.split()[0])}'>{q(status)}</td><td>{secs}</td>"
                    f"<td>{' · '.join(links)}</td><td>{n_tab}</td><td>{n_fig}</td></tr>")
    rows.append(f"<tr><th>total</th><th></th><th>{total:.0f} ({total / 60:.1f} min)</th><th></th><th>{len(csvs)}</th>"
                f"<th>{len(pngs)}</th></tr>")
    parts.append("<h2 id='notebooks'>Notebooks</h2><table><tr><th>notebook</th><th>status</th><th>seconds</th>"
                 "<th>open</th><th>tables</th><th>figures</th></tr>" + "".join(rows) + "</table>")

    def stage_of(p):
        return made_by.get(p.stem) or "other"

    items = []
    for p in sorted(csvs, key=lambda p: (stage_of(p), p.name)):
        md = p.with_suffix(".md")
        items.append(f"<tr><td><a href='tables/{p.name}'>{q(p.stem)}</a></td><td>{q(stage_of(p))}</td>"
                     f"<td><a href='tables/{p.name}'>csv</a>"
                     + (f" · <a href='tables/{md.name}'>markdown</a>" if md.exists() else "") + "</td></tr>")
    parts.append("<h2 id='tables'>Tables</h2>" + ("<table><tr><th>table</th><th>notebook</th><th>files</th></tr>"
                                                   + "".join(items) + "</table>" if items else "<p>none</p>"))
    figs = [f"<figure><a href='figures/{p.name}'><img src='figures/{p.name}' alt='{q(p.stem)}' loading='lazy'></a>"
            f"<figcaption><a href='figures/{p.name}'>{q(p.stem)}</a> ({q(stage_of(p))})</figcaption></figure>"
            for p in sorted(pngs, key=lambda p: (stage_of(p), p.name))]
    parts.append("<h2 id='figures'>Figures</h2>" + (f"<div class='grid'>{''.join(figs)}</div>" if figs else "<p>none</p>"))

    style = ("<style>body{font-family:system-ui,sans-serif;max-width:1280px;margin:2em auto;padding:0 1em;color:#222}"
             "h2 small{font-weight:normal;font-size:60%}.meta{color:#555}nav{margin-bottom:1em}"
             "table{border-collapse:collapse;margin:.5em 0;display:block;overflow-x:auto;max-width:100%}"
             "td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
             "text-align:right;white-space:nowrap}td:first-child,th:first-child{text-align:left}"
             "table.data td:nth-child(-n+2),table.data th:nth-child(-n+2){text-align:left}th{background:#f4f4f4}"
             ".failed,td.failed{color:#b00020}td.ok{color:#1b5e20}"
             "figure.headline img{max-width:100%;width:760px}.grid{display:grid;"
             "grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:12px}.grid img{width:100%}"
             "figure{margin:0 0 1em 0}figcaption{font-size:90%;color:#444}</style>")
    info = {"run": run, "preset": preset, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit or None,
            "threads": int(threads) if threads.isdigit() else (threads or None), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "versions": _versions()}
    (report / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
    index = report / "index.html"
    index.write_text(f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>latentlib {q(run)}</title>"
                     "<link rel='icon' href='data:,'>"
                     f"{style}</head><body>{''.join(parts)}</body></html>")
    return index
