"""``report.md`` and ``report.html``: one list of blocks, rendered twice, so the two never disagree."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

# A block is ("h", text) | ("p", text) | ("table", (header, rows)) | ("img", (path, caption)).
Block = tuple[str, Any]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 14px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 10px; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
.caption { font-size: 13px; color: #555; margin-bottom: 1.5em; }
"""


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def verdict(metrics: dict[str, Any]) -> str:
    """One honest sentence on who won; the margin is compared with the test set's sampling noise."""
    control, vif, n = metrics["control"]["accuracy"], metrics["vif"]["accuracy"], metrics["n_test"]
    # Standard error of a difference of two accuracies on n questions (unpaired, an upper bound).
    noise = ((control * (1 - control) + vif * (1 - vif)) / max(n, 1)) ** 0.5
    diff = vif - control
    if abs(diff) <= 2 * noise:
        outcome = "is within noise of"
    elif diff > 0:
        outcome = "beats"
    else:
        outcome = "does NOT beat (it is below)"
    return (
        f"VIF ({_pct(vif)}) {outcome} the control ({_pct(control)}) on {n} test questions: "
        f"difference {100 * diff:+.1f} points, two standard errors = {200 * noise:.1f} points."
    )


def diagnosis(metrics: dict[str, Any]) -> list[str]:
    """Sentences that say WHY the arms came out as they did, read off the on-target measurements."""
    uniform = metrics["on_target_if_uniform"]
    control, vif = metrics["control"], metrics["vif"]
    lines = []
    c_share = control["deep_attention_on_target"]
    if c_share < 1.5 * uniform:
        lines.append(
            f"The control's deep layers spread their attention over the whole image: {_pct(c_share)} of it "
            f"lands on the target's tokens, where a flat attention puts {_pct(uniform)} (visual attenuation)."
        )
        if tuple(metrics["settings"]["data"]["question_types"]) == ("color",):
            lines.append(
                f"It still answers {_pct(control['accuracy'])} correctly (chance: 20%): in TinyFind the target "
                "is the only saturated object, so its colour can be read off the image as a whole, without "
                "finding where it is. Looking harder at the target is less of an advantage than on a task "
                "where several objects compete."
            )
    else:
        lines.append(
            f"The control's deep layers already focus on the target: {_pct(c_share)} of their visual attention "
            f"lands on its tokens vs {_pct(uniform)} for a flat attention."
        )
    pi_share, variation = vif["importance_on_target"], vif["importance_variation"]
    if pi_share is not None and pi_share >= 2 * uniform:
        lines.append(
            f"VIF's importance map finds the target: {_pct(pi_share)} of its mass is on the target's tokens "
            f"({_pct(uniform)} for a flat map); the VIF arm's deep attention puts "
            f"{_pct(vif['deep_attention_on_target'])} there."
        )
    elif pi_share is not None:
        lines.append(
            f"VIF's importance map does NOT find the target: {_pct(pi_share)} of its mass is on the target's "
            f"tokens, where a flat map would put {_pct(uniform)}. Its lower deep-layer entropy is focus on "
            "the wrong place, not on the target."
        )
    if variation is not None and variation < 0.15:
        lines.append(
            f"The map is almost the same for every image (mean total-variation distance to the average map: "
            f"{_num(variation, 2)}): it collapsed to a fixed place instead of following the target. "
            "docs/demo.md explains this failure and what was tried."
        )
    elif variation is not None:
        lines.append(
            f"The map changes from image to image (mean total-variation distance {_num(variation, 2)})."
        )
    return lines


def blocks(metrics: dict[str, Any], diagnostics: dict[str, Any], heatmaps: list[str]) -> list[Block]:
    settings = metrics["settings"]
    data = settings["data"]
    types = sorted(metrics["control"]["per_type"])
    out: list[Block] = [("h", "VIF demo: TinyFind, control vs VIF")]
    out.append(
        (
            "p",
            f"TinyFind ({data['n_train']} training / {metrics['n_test']} test questions of type "
            f"{', '.join(data['question_types'])}; {settings['image_size']} px images, "
            f"{data['target_size']} px targets, clutter {data['clutter']}). A tiny LLaVA "
            f"({settings['num_layers']} Llama layers, hidden {settings['hidden_size']}, "
            f"{(settings['image_size'] // settings['patch_size']) ** 2} image tokens) was trained "
            f"{metrics['steps']['base']} steps without VIF, then continued {metrics['steps']['arm']} steps "
            "twice from that checkpoint with the same data order and learning rate: without VIF "
            "(control) and with VIF. Scores: greedy generation, exact match. "
            f"Seed {metrics['seed']}, {metrics['seconds']:.0f} s on {metrics['device']}.",
        )
    )
    out.append(("p", "**" + verdict(metrics) + "**"))
    header = [
        "arm",
        "accuracy",
        *types,
        "deep-layer entropy (nats)",
        "deep-layer visual ratio",
        "deep attention on target",
        "VIF map on target",
    ]
    rows = []
    for name, label in (("control", "control (no VIF)"), ("vif", "VIF")):
        m = metrics[name]
        rows.append(
            [label, _pct(m["accuracy"]), *(_pct(m["per_type"].get(t)) for t in types)]
            + [_num(m["deep_entropy"]), _num(m["deep_ratio"])]
            + [_pct(m["deep_attention_on_target"]), _pct(m["importance_on_target"])]
        )
    out.append(("table", (header, rows)))
    max_entropy = diagnostics["control"].get("max_entropy")
    out.append(
        (
            "p",
            "Deep layers = the last half of the decoder layers; entropy of the attention over the image "
            f"tokens (renormalised), averaged over the answer tokens' rows and the samples; uniform = "
            f"{_num(max_entropy)}. Lower = more focused. With VIF the numbers are those of the injected "
            "attention. 'On target' = the share of that attention (or of VIF's importance map) on the image "
            "tokens that overlap the target's box, from the generator's metadata; an attention that ignores "
            f"where the target is puts {_pct(metrics['on_target_if_uniform'])} there.",
        )
    )

    out.append(("h", "Why"))
    for line in diagnosis(metrics):
        out.append(("p", line))

    out.append(("h", "Per-layer attention on the image"))
    out.append(("img", ("diagnostics/attention_ratio.png", "Visual attention ratio per layer.")))
    out.append(("img", ("diagnostics/entropy.png", "Entropy of the visual attention per layer.")))
    c_rows = {r["layer"]: r for r in diagnostics["control"]["per_layer"]}
    v_rows = {r["layer"]: r for r in diagnostics["vif"]["per_layer"]}
    inject = set((diagnostics["vif"].get("vif") or {}).get("injection_layers", []))
    layer_rows = []
    for layer in sorted(c_rows):
        c, v = c_rows[layer], v_rows.get(layer, {})
        layer_rows.append(
            [
                f"{layer}{' (VIF injects)' if layer in inject else ''}",
                _num(c["ratio"]),
                _num(v.get("ratio")),
                _num(c["entropy"]),
                _num(v.get("entropy")),
            ]
        )
    out.append(
        ("table", (["layer", "ratio control", "ratio VIF", "entropy control", "entropy VIF"], layer_rows))
    )

    out.append(("h", "Heatmaps"))
    out.append(
        (
            "p",
            "Each row: a model's attention on the image tokens at a few layers (share x number of image "
            "tokens, 1 = uniform); the VIF row adds its importance map pi under the injection layers.",
        )
    )
    for path in heatmaps:
        out.append(("img", (path, path)))
    out.append(
        (
            "p",
            "More: diagnostics/index.html (violins, full per-layer table), metrics.json, predictions.json, "
            "the trained models under models/.",
        )
    )
    return out


def to_markdown(items: list[Block]) -> str:
    lines: list[str] = []
    first = True
    for kind, value in items:
        if kind == "h":
            lines += [("# " if first else "## ") + value, ""]
            first = False
        elif kind == "p":
            lines += [value, ""]
        elif kind == "table":
            header, rows = value
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            path, caption = value
            lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines)


def to_html(items: list[Block]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>VIF demo</title>"]
    parts.append(f"<style>{STYLE}</style></head><body>")
    first = True
    for kind, value in items:
        if kind == "h":
            tag = "h1" if first else "h2"
            parts.append(f"<{tag}>{html.escape(value)}</{tag}>")
            first = False
        elif kind == "p":
            text = html.escape(value)
            if text.startswith("**") and text.endswith("**"):
                text = f"<b>{text[2:-2]}</b>"
            parts.append(f"<p>{text}</p>")
        elif kind == "table":
            header, rows = value
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
        elif kind == "img":
            path, caption = value
            parts.append(f"<img src='{html.escape(path)}' alt='{html.escape(caption)}'>")
            parts.append(f"<div class='caption'>{html.escape(caption)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: Path, metrics: dict[str, Any], diagnostics: dict[str, Any]) -> tuple[Path, Path]:
    """Writes ``out/report.md`` and ``out/report.html``; figures are referenced by relative path."""
    heatmaps = sorted(str(p.relative_to(out)) for p in (out / "diagnostics" / "heatmaps").glob("*.png"))
    items = blocks(metrics, diagnostics, heatmaps)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(items))
    page.write_text(to_html(items))
    return md, page
