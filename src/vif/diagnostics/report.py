"""``index.html``: the figures, the per-layer table and the heatmaps on one page (relative paths)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
tr.inject td { background: #fdf0e6; }
img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
.caption { font-size: 13px; color: #555; margin-bottom: 1.5em; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def _fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _token_range(counts: dict[str, Any]) -> str:
    low, high = counts["min"], counts["max"]
    return str(low) if low == high else f"{low}-{high}"


def _headline(summaries: list[dict[str, Any]], diff: dict[str, Any] | None) -> str:
    first = summaries[0]
    deep = first["deep_layers"]
    lines = [
        f"<p>{first['n_samples']} samples with images ({first['n_skipped_without_image']} without images skipped); "
        f"query rows: <code>{html.escape(first['rows'])}</code> (mean {_fmt(first['mean_rows_per_sample'], 1)} "
        f"per sample); route: <code>{first['route']}</code>; image tokens per sample: "
        f"{_token_range(first['n_image_tokens'])}.</p>",
        "<table><tr><th></th><th>deep-layer entropy (nats)</th><th>deep-layer visual ratio</th></tr>",
    ]
    for s in summaries:
        lines.append(
            f"<tr><td>{html.escape(s['label'])}</td><td>{_fmt(s['deep_entropy'])}</td><td>{_fmt(s['deep_ratio'])}</td></tr>"
        )
    if diff is not None:
        lines.append(
            f"<tr><td>difference</td><td>{_fmt(diff['deep_entropy'], signed=True)}</td>"
            f"<td>{_fmt(diff['deep_ratio'], signed=True)}</td></tr>"
        )
    lines.append(
        f"<tr><td>maximum (uniform)</td><td>{_fmt(first['max_entropy'])}</td><td>1</td></tr></table>"
        f"<p class='caption'>Deep layers = the last half of the {first['num_layers']} decoder layers "
        f"({deep[0] if deep else '-'}..{deep[-1] if deep else '-'}); deep-layer entropy = mean over those layers "
        "of the per-layer mean entropy. The paper reports 5.36 (LLaVA-1.5-7B) vs 3.23 (VIF), "
        "maximum ln 576 = 6.36.</p>"
    )
    for s in summaries:
        if s["vif"]:
            maps = ", ".join(f"layer {d}: {_fmt(h)}" for d, h in s["vif"]["importance_entropy"].items())
            lines.append(
                f"<p><b>{html.escape(s['label'])}</b>: alpha = {s['vif']['alpha']}, injection layers "
                f"{s['vif']['injection_layers']}; entropy of VIF's importance map pi (nats, mean over "
                f"samples): {maps}.</p>"
            )
    return "\n".join(lines)


def _layer_table(summaries: list[dict[str, Any]], diff: dict[str, Any] | None) -> str:
    inject = {d for s in summaries if s["vif"] for d in s["vif"]["injection_layers"]}
    head = "<tr><th>layer</th>"
    for s in summaries:
        label = html.escape(s["label"])
        head += f"<th>ratio {label}</th><th>entropy {label}</th><th>median p {label}</th>"
    if diff is not None:
        head += "<th>&Delta; ratio</th><th>&Delta; entropy</th>"
    rows = [head + "</tr>"]
    by_layer = [{row["layer"]: row for row in s["per_layer"]} for s in summaries]
    diff_rows = {row["layer"]: row for row in diff["per_layer"]} if diff is not None else {}
    for layer in summaries[0]["layers"]:
        cls = " class='inject'" if layer in inject else ""
        cells = f"<td>{layer}{' *' if layer in inject else ''}</td>"
        for table in by_layer:
            row = table.get(layer)
            if row is None:
                cells += "<td>-</td>" * 3
                continue
            cells += (
                f"<td>{_fmt(row['ratio'])} &plusmn; {_fmt(row['ratio_std'])}</td>"
                f"<td>{_fmt(row['entropy'])} &plusmn; {_fmt(row['entropy_std'])}</td>"
                f"<td>{_fmt(row['quantiles'].get('0.5'), 5)}</td>"
            )
        if diff is not None:
            d = diff_rows.get(layer, {})
            cells += (
                f"<td>{_fmt(d.get('ratio'), signed=True)}</td><td>{_fmt(d.get('entropy'), signed=True)}</td>"
            )
        rows.append(f"<tr{cls}>{cells}</tr>")
    note = (
        "<p class='caption'>* VIF injection layer. Mean &plusmn; standard deviation over samples.</p>"
        if inject
        else ""
    )
    return "<table>" + "\n".join(rows) + "</table>" + note


def _heatmap_section(heatmaps: list[dict[str, Any]]) -> str:
    if not heatmaps:
        return "<p>No heatmaps (no pictures kept).</p>"
    parts = []
    for item in heatmaps:
        meta = item["meta"]
        text = [f"sample <b>{html.escape(str(meta.get('id', item['sample'])))}</b>"]
        for key in ("question", "answer"):
            if meta.get(key):
                text.append(f"{key}: {html.escape(meta[key])}")
        for run in item["runs"]:
            if run.get("generated") is not None:
                text.append(f"generated ({html.escape(run['label'])}): {html.escape(run['generated'])}")
        parts.append(
            f"<div><img src='heatmaps/{item['path']}' alt='heatmap'><div class='caption'>{' &middot; '.join(text)}</div></div>"
        )
    return "\n".join(parts)


def write_html(
    path: Path,
    summaries: list[dict[str, Any]],
    figures: dict[str, str],
    heatmaps: list[dict[str, Any]],
    diff: dict[str, Any] | None = None,
) -> Path:
    """Writes the report; ``figures`` maps a caption to a path relative to ``path``'s folder."""
    title = "Visual attention diagnostics: " + " vs ".join(html.escape(s["label"]) for s in summaries)
    body = [
        f"<h1>{title}</h1>",
        _headline(summaries, diff),
        "<h2>Per layer</h2>",
        _layer_table(summaries, diff),
    ]
    body.append("<h2>Figures</h2>")
    for caption, rel in figures.items():
        body.append(
            f"<div><img src='{rel}' alt='{html.escape(caption)}'><div class='caption'>{html.escape(caption)}</div></div>"
        )
    body.append("<h2>Heatmaps</h2>")
    body.append(
        "<p class='caption'>The renormalised visual attention of the query rows (mean over heads and rows) on the "
        "image token grid, bilinearly interpolated between patch centres over the image the model saw "
        "(after the processor's padding / cropping). Values are the share of each token times the number of "
        "image tokens (1 = uniform); one square-root colour scale per figure, from 0 to its largest value. With VIF, "
        "the last row shows its importance map pi. H: entropy (nats), r: visual attention ratio.</p>"
    )
    body.append(_heatmap_section(heatmaps))
    body.append("<p class='caption'>Numbers: <a href='summary.json'>summary.json</a>.</p>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
