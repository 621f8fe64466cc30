"""``report.html``: the report as one self-contained page, for a privacy officer.

Self-contained on purpose: it is often opened on machines with no network, attached to e-mails or
archived, so it has no external URL at all (no CDN, no web font, no ``xmlns`` either): CSS is inline and the
charts are inline SVG (``fedllm.report.svg``). A small inline script marks the page as rendered
(``data-rendered="ok"`` and counts on ``<body>``) so a headless-browser test can check it from the page:
every part named in ``<body data-expect>`` must be there, ``data-series`` counts the epsilon series,
``data-rows`` the client rows, ``data-curve`` the points of the accuracy-vs-epsilon curve and
``data-curvewidth`` the width the browser laid that curve out at.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedllm.report.cells import (
    EMPIRICAL_HEAD,
    EMPIRICAL_NOTE,
    cell,
    curve_rows,
    empirical_rows,
    eps_cell,
    never_sampled_text,
    settings_rows,
)
from fedllm.report.svg import CHART_CSS, accuracy_chart, curve_chart, epsilon_chart
from fedllm.run.rundir import RunDir

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; margin: 2rem; color: #222;
       max-width: 1100px; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.verdict { padding: 0.6rem 1rem; border-radius: 4px; font-weight: 600; }
.verdict.ok { background: #e6f4ea; color: #1e6b34; } .verdict.bad { background: #fce8e6; color: #a50e0e; }
.verdict.na { background: #f1f3f4; color: #444; } .verdict.unverified { background: #fef7e0; color: #7a4f01; }
.warn { color: #a50e0e; } .muted { color: #666; } tr.this td { font-weight: 600; }
svg { font-family: inherit; }"""

_SCRIPT = """
window.addEventListener("load", function () {
  var missing = [];
  (document.body.dataset.expect || "").split(" ").forEach(function (id) {
    var part = id ? document.getElementById(id) : null;
    if (id && !(part && (part.tagName === "TABLE" || part.querySelector("svg")))) { missing.push(id); }
  });
  var eps = document.querySelector("#epsilon-chart svg");
  var table = document.querySelector("#clients-table");
  var curve = document.querySelector("#curve-chart svg");
  var line = curve ? curve.querySelector("g.curve") : null;
  document.body.dataset.series = String(eps ? eps.querySelectorAll("g.series").length : 0);
  document.body.dataset.rows = String(table ? table.querySelectorAll("tbody tr").length : 0);
  document.body.dataset.curve = String(curve ? curve.querySelectorAll("g.curve circle").length : 0);
  document.body.dataset.curvewidth = String(line ? Math.round(line.getBBox().width) : 0);
  document.body.dataset.rendered = missing.length ? "missing: " + missing.join(", ") : "ok";
});
"""

_CURVE_NOTE = (
    "One point per run: its final central accuracy (metrics.json) against the largest final epsilon any of its"
    " clients spent, epsilon on a log axis. A non-private run has no epsilon: its accuracy is the dashed line."
)


def _head(title: str, expect: list[str]) -> list[str]:
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}{CHART_CSS}</style></head>",
        f'<body data-expect="{" ".join(expect)}">',
    ]


def _page_end(out: list[str]) -> str:
    out.append(f"<script>{_SCRIPT}</script>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _curve_section(curve: dict[str, Any], lead: str, links: bool = False) -> list[str]:
    """The accuracy-vs-epsilon chart and its table (``#curve-chart``, ``#curve-table``)."""
    e = html.escape
    rows = curve_rows(curve)
    out = [
        "<h2>Accuracy vs epsilon</h2>",
        f'<p class="muted">{e(lead)} ({e(curve["dir"])}). {e(_CURVE_NOTE)}</p>',
        f'<div id="curve-chart">{curve_chart(curve["runs"])}</div>',
        '<table id="curve-table"><thead><tr>',
        *[f'<th class="{"l" if h in ("run", "scenario") else ""}">{e(h)}</th>' for h in rows[0]],
        "</tr></thead><tbody>",
    ]
    run_col = rows[0].index("run")
    for p, row in zip(curve["runs"], rows[1:], strict=True):
        cells = []
        for i, c in enumerate(row):
            text = e(c)
            if i == run_col and links:
                # "./" and percent-encoding: a folder name is a relative path, never a scheme ("javascript:").
                href = "./" + quote(RunDir(Path(p["run"])).report_path("html").as_posix())
                text = f'<a href="{e(href)}">{text}</a>'
            cells.append(f'<td class="{"l" if i <= run_col else ""}">{text}</td>')
        cls = ' class="this"' if p["run"] == curve.get("this_run") else ""
        out.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    if curve.get("skipped"):
        out.append('<ul id="skipped" class="muted">')
        out += [f"<li>not included: {e(s['run'])}: {e(s['reason'])}</li>" for s in curve["skipped"]]
        out.append("</ul>")
    return out


def render_html(report: dict[str, Any]) -> str:
    """The self-contained page; every string from the run (ids, names, findings) goes through html.escape."""
    e = html.escape
    run, dp = report["run"], report["run"]["dp"]
    audit_ = report["audit"]
    # "unverified" (a client's own ledger or key missing) is neither clean nor proof of tampering: its own colour.
    verdict_cls = "na" if audit_["ok"] is None else ("ok" if audit_["ok"] else "bad")
    verdict_cls = "unverified" if audit_.get("status") == "unverified" else verdict_cls
    rounds = [r["round"] for r in report["rounds"]]
    expect = ["epsilon-chart", "accuracy-chart", "clients-table", *(["curve-chart"] if report.get("curve") else [])]
    out = [
        *_head(f"fedllm report: {run['scenario']}", expect),
        f"<h1>Federated run report: {e(run['scenario'])}</h1>",
        f'<p class="muted">Run directory {e(run["dir"])}; generated {e(report["generated_at"])}.</p>',
        f'<p id="verdict" class="verdict {verdict_cls}">Audit: {e(audit_["verdict"])}</p>',
    ]
    if run["stopped_early"]:
        out.append(f'<p class="warn">The run stopped early: {e(run["stopped_early"])}</p>')
    if not dp:
        out.append('<p class="warn">Non-private baseline: no differential privacy; epsilon is infinite.</p>')
    out += ["<h2>Privacy spend</h2>", f'<div id="epsilon-chart">{epsilon_chart(report)}</div>']
    out += ["<h2>Accuracy</h2>", f'<div id="accuracy-chart">{accuracy_chart(report)}</div>']
    if report.get("curve"):
        out += _curve_section(report["curve"], f"This run and the other runs of {run['scenario']} in the same folder")

    out.append("<h2>Clients</h2>")
    head = ["client", "budget ε", "delta", "final ε", "rounds trained", "status per round", "key"]
    out.append('<table id="clients-table"><thead><tr>')
    out += [f'<th class="{"l" if h in ("client", "status per round", "key") else ""}">{e(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for c in report["clients"]:
        statuses = ", ".join(f"{n}: {s or '-'}" for n, s in zip(rounds, c["status_per_round"], strict=False))
        out.append(
            "<tr>"
            f'<td class="l">{e(c["id"])}</td><td>{eps_cell(c["budget_epsilon"], dp)}</td>'
            f"<td>{c['delta']:g}</td><td>{eps_cell(c['final_epsilon'], dp)}</td><td>{c['rounds_trained']}</td>"
            f'<td class="l">{e(statuses)}</td><td class="l">{e(c["key_fingerprint"] or "-")}</td></tr>'
        )
    out.append("</tbody></table>")
    never = never_sampled_text(report)
    if never:
        out.append(f'<p id="never-sampled" class="muted">{e(never)}</p>')

    if dp and rounds:
        out.append('<h3>Epsilon per round</h3><table id="epsilon-table"><thead><tr><th class="l">client</th>')
        out += [f"<th>{n}</th>" for n in rounds]
        out.append("</tr></thead><tbody>")
        for c in report["clients"]:
            cells = "".join(f"<td>{cell(v)}</td>" for v in c["epsilon_per_round"])
            out.append(f'<tr><td class="l">{e(c["id"])}</td>{cells}</tr>')
        out.append("</tbody></table>")

    out.append('<h3>Rounds</h3><table id="rounds-table"><thead><tr>')
    out += ["<th>round</th><th>accuracy</th><th>loss</th><th>updates aggregated</th></tr></thead><tbody>"]
    for r in report["rounds"]:
        out.append(
            f"<tr><td>{r['round']}</td><td>{cell(r['accuracy'])}</td><td>{cell(r['loss'])}</td>"
            f"<td>{cell(r['aggregated'])}</td></tr>"
        )
    out.append("</tbody></table>")

    out.append('<h2>Settings</h2><table id="settings-table"><tbody>')
    out += [f'<tr><th class="l">{e(k)}</th><td class="l">{e(v)}</td></tr>' for k, v in settings_rows(report)]
    out.append("</tbody></table>")

    out.append("<h2>Audit</h2>")
    out.append(
        f"<p>Epsilon recomputed from the ledger's mechanisms with the run's accountant (must agree within"
        f" {audit_.get('same_accountant_rtol', 1e-6):g} relative) and independently with Google dp-accounting's"
        f" PLD accountant (within {audit_['tolerance']:.0%} relative). Hash chains, client signatures, budgets"
        " and the clients' own ledgers are checked too; see docs/audit.md.</p>"
    )
    if audit_["clients"]:
        out.append('<table id="audit-table"><thead><tr><th class="l">client</th><th>reported ε</th>')
        out.append("<th>recomputed ε</th><th>dp-accounting ε</th><th>budget</th><th>ok</th></tr></thead><tbody>")
        for c in audit_["clients"]:
            out.append(
                f'<tr><td class="l">{e(c["client"])}</td><td>{eps_cell(c["reported_epsilon"], c["private"])}</td>'
                f"<td>{cell(c['recomputed_epsilon'])}</td><td>{cell(c['dp_accounting_epsilon'])}</td>"
                f"<td>{eps_cell(c['budget'], c['private'])}</td><td>{cell(c['ok'])}</td></tr>"
            )
        out.append("</tbody></table>")
    if audit_["findings"]:
        out.append('<ul id="findings" class="warn">')
        out += [f"<li>{e(f)}</li>" for f in audit_["findings"]]
        out.append("</ul>")
    if audit_.get("gaps"):
        out.append('<ul id="unverified" class="warn">')
        out += [f"<li>unverified: {e(g)}</li>" for g in audit_["gaps"]]
        out.append("</ul>")
    if audit_["notes"]:
        out.append('<ul id="notes" class="muted">')
        out += [f"<li>{e(n)}</li>" for n in audit_["notes"]]
        out.append("</ul>")
    if report.get("empirical_audit"):
        out.append(f'<h2>Empirical privacy audit</h2><p class="muted">{e(EMPIRICAL_NOTE)}</p>')
        out.append('<table id="empirical-table"><thead><tr>')
        out += [f'<th class="{"l" if h in ("client", "adversary") else ""}">{e(h)}</th>' for h in EMPIRICAL_HEAD]
        out.append("</tr></thead><tbody>")
        for row in empirical_rows(report):
            cls = ' class="warn"' if row[2].endswith("VIOLATION") else ""
            cells = "".join(f'<td class="{"l" if i in (0, 6) else ""}">{e(c)}</td>' for i, c in enumerate(row))
            out.append(f"<tr{cls}>{cells}</tr>")
        out.append("</tbody></table>")
    return _page_end(out)


def render_comparison_html(comparison: dict[str, Any]) -> str:
    """The page of a folder of runs: the curve over all of them, each run linked to its own report."""
    title = f"fedllm comparison: {comparison['dir']}"
    out = _head(title, ["curve-chart", "curve-table"])
    out += [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">Generated {html.escape(comparison["generated_at"])}; each run\'s privacy audit is in'
        " its own report.</p>",
    ]
    out += _curve_section(comparison, "Every run in this folder, one line per scenario", links=True)
    return _page_end(out)
