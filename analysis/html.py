"""index.html: one self-contained page (figures referenced relatively, no network)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from trainable.record import MODEL_FREE

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222;
       padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9rem; color: #444; margin-top: 0.3rem; }
.warning { background: #fff3cd; border: 1px solid #e0c36c; padding: 0.6rem; }
.best { background: #fde2e2; }
"""


SAMPLER_TITLES = {"tpe": "Optuna TPE", "gp": "Optuna GP", "qmc": "Optuna QMC (Sobol)",
                  "random": "random"}


def _facts(summary: dict[str, Any]) -> list[tuple[str, str]]:
    best = summary["best_trial"]
    train, pick = best["config"]["train"], best["pick"]
    return [
        ("best trial", best["trial_id"]),
        ("test accuracy", f"{summary['test']['accuracy']:.4f} "
                          f"({summary['test']['images']} images)"),
        ("test loss", f"{summary['test']['loss']:.4f}"),
        (f"best {summary['selected_on']} accuracy, observed",
         f"{best['val_acc']:.4f} (epoch {best['best_epoch']})"),
        (f"{summary['selected_on']} accuracy on a new seed, estimated",
         f"{pick['estimated_val_acc']:.4f} +- {pick['estimated_val_acc_se']:.4f} (seeds "
         f"{', '.join(map(str, pick['seeds'])) or 'none finished'})"),
        ("picked by", f"{pick['rule']} (search.pick: {pick['configured']}); "
                      f"{best['races']} race trials"),
        ("max_lr / peak_epoch", f"{train['max_lr']:.4g} / {train['peak_epoch']}"),
        ("epochs, batch size", f"{train['epochs']}, {train['batch_size']}"),
        ("model", best["config"]["model"]["name"]),
        ("LR range test estimate", f"{summary['lr_range_test']['suggested_lr']:.4g}"),
        ("search wall time", _wall_time(summary["wall_time"])),
        ("trials", ", ".join(f"{n} {s.lower()}" for s, n in
                             summary["trials_by_status"].items())),
        ("sampler", _sampler(summary.get("sampler"))),
    ]


def _said(summary: dict[str, Any]) -> str:
    pick = summary["best_trial"]["pick"]
    note = f" ({pick['note']})" if pick["note"] else ""
    return pick["said"] + note


def _sampler(sampler: dict[str, Any] | None) -> str:
    if sampler is None:
        return "not recorded"
    draws = sampler["trials"]
    if sampler["name"] in MODEL_FREE:
        chosen = f"{draws['startup']} drawn (no model)"
    else:
        chosen = (f"{draws['startup']} random startup draws, {draws['model']} from its model "
                  f"(startup: the first {sampler['startup_trials']} finished)")
    races = f"; {draws['races']} races of the incumbent" if draws["races"] else ""
    return (f"{SAMPLER_TITLES[sampler['name']]}: {draws['first_point']} first point, "
            f"{chosen}{races}")


def _trust(trust: dict[str, Any]) -> str:
    """The edge check's warnings, and the confirmed configs' seed spread with its verdict."""
    esc = html.escape
    edge = trust["edge_check"]
    parts = [f'<p class="warning">warning: {esc(w)}</p>' for w in edge["warnings"]] or [
        f"<p>The best trial lies inside the space searched (max_lr at "
        f"{edge['max_lr_position']:.0%} of its log range).</p>"]
    spread = trust["confirmation"]
    if spread is None:
        parts.append("<p>No confirmation runs (<code>--confirm-seeds</code>): how much a "
                     "second seed changes the ranking is not known.</p>")
        return "".join(parts)
    rows = "".join(
        f"<tr><td>{esc(c['trial_id'])}</td><td>{c['max_lr']:.4g}</td><td>{c['peak_epoch']}</td>"
        f"<td>{esc(', '.join(map(str, c['seeds'])))}</td><td>{_fmt(c['mean'])}</td>"
        f"<td>{_fmt(c['std'])}</td></tr>" for c in spread["configs"])
    parts.append(f"<table><thead><tr><th>config of trial</th><th>max_lr</th><th>peak_epoch</th>"
                 f"<th>seeds</th><th>mean {esc(spread['metric'])}</th><th>std</th></tr>"
                 f"</thead><tbody>{rows}</tbody></table>"
                 f"<p>{esc(spread['verdict'][0].upper() + spread['verdict'][1:])}.</p>")
    return "".join(parts)


def write_index(out: Path, summary: dict[str, Any], table: pd.DataFrame,
                figures: dict[str, tuple[str, str]]) -> None:
    esc = html.escape
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _facts(summary))
    per_class = "".join(f"<tr><td>{esc(c)}</td><td>{a:.3f}</td></tr>"
                        for c, a in summary["per_class_accuracy"].items())
    shown = table.drop(columns=["checkpoint"]).copy()
    trial_rows = []
    for row in shown.itertuples(index=False):
        css = ' class="best"' if row.trial_id == summary["best_trial"]["trial_id"] else ""
        cells = "".join(f"<td>{esc(_fmt(v))}</td>" for v in row)
        trial_rows.append(f"<tr{css}>{cells}</tr>")
    head = "".join(f"<th>{esc(c)}</th>" for c in shown.columns)
    figure_blocks = "".join(
        f'<figure id="{esc(key)}"><img src="{esc(name)}" alt="{esc(key)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
        for key, (name, caption) in figures.items())
    warning = (f'<p class="warning">{esc(summary["selection_note"])}</p>'
               if summary["selected_on"] == "test" else
               f"<p>{esc(summary['selection_note'])}.</p>")
    importance = summary["importances"]
    importance_note = "" if isinstance(importance, dict) else \
        f"<p>Parameter importances: not shown ({esc(importance)}).</p>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>onecycle-study: {esc(summary['experiment'])}</title>
<style>{STYLE}</style></head>
<body>
<h1>onecycle-study report: {esc(summary['experiment'])}</h1>
{warning}
<h2>Summary</h2>
<table>{facts}</table>
<h2>How far to trust the winner</h2>
<p>The winner's {esc(summary['selected_on'])} accuracy: {esc(_said(summary))}.</p>
{_trust(summary["trust"])}
<h2>Trials</h2>
<table><thead><tr>{head}</tr></thead><tbody>{''.join(trial_rows)}</tbody></table>
<h2>Per-class test accuracy</h2>
<table><thead><tr><th>class</th><th>accuracy</th></tr></thead><tbody>{per_class}</tbody></table>
<h2>Figures</h2>
{importance_note}
{figure_blocks}
<script type="application/json" id="summary">{esc(json.dumps(summary))}</script>
</body></html>
"""
    (out / "index.html").write_text(page)


def duration(seconds: float) -> str:
    """45 s, 12 min, 3 h 20 min, 4.2 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{seconds / 86400:.1f} days"


def _wall_time(wall: dict[str, float | None]) -> str:
    took = "not finished" if wall["actual_s"] is None else f"took {duration(wall['actual_s'])}"
    if wall["estimated_s"] is None:
        return took
    return f"{took}; estimated before it started: {duration(wall['estimated_s'])}"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)
