"""``report.md`` and ``report.html``: one list of blocks, rendered twice, so the two never disagree."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .pipeline import ARMS, LABELS

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


def _noise(metrics: dict[str, Any], arm: str) -> float:
    """Two standard errors of the difference between ``arm`` and the control, in accuracy units.

    Test-set sampling noise of each seed's difference (binomial, unpaired: an upper bound), divided by
    sqrt(number of seeds) for the mean over seeds.
    """
    n, seeds = metrics["n_test"], len(metrics["seeds"])
    c, a = metrics["control"]["accuracy"], metrics[arm]["accuracy"]
    return 2 * ((c * (1 - c) + a * (1 - a)) / max(n, 1) / seeds) ** 0.5


def verdict(metrics: dict[str, Any], arm: str = "vif") -> str:
    """One honest sentence on an arm against the control, with the noise beside the difference."""
    m, control = metrics[arm], metrics["control"]
    diff, noise = m["accuracy"] - control["accuracy"], _noise(metrics, arm)
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in m["gain_over_control_per_seed"])
    if abs(diff) <= noise:
        outcome = "is within noise of"
    elif diff > 0:
        outcome = "beats"
    else:
        outcome = "does NOT beat (it is below)"
    return (
        f"{LABELS[arm]}, {_pct(m['accuracy'])}, {outcome} the control, {_pct(control['accuracy'])}: "
        f"{100 * diff:+.1f} points averaged over {len(metrics['seeds'])} seeds (per seed: {per_seed}); "
        f"two standard errors of the mean difference: {100 * noise:.1f} points."
    )


def diagnosis(metrics: dict[str, Any]) -> list[str]:
    """Sentences that say WHY the arms came out as they did, read off the measurements."""
    uniform = metrics["on_target_if_uniform"]
    control = metrics["control"]
    lines = []
    c_share = control.get("deep_attention_on_target")
    if c_share is not None and c_share < 1.5 * uniform:
        lines.append(
            f"The control's deep layers spread their attention over the whole image: {_pct(c_share)} of it "
            f"lands on the target's tokens, where a flat attention puts {_pct(uniform)} (visual attenuation)."
        )
    elif c_share is not None:
        lines.append(
            f"The control's deep layers already focus on the target: {_pct(c_share)} of their visual attention "
            f"lands on its tokens vs {_pct(uniform)} for a flat attention."
        )
    if "oracle" in metrics:
        lines.append(
            f"A correct map is worth {100 * metrics['oracle']['gain_over_control']:+.1f} points here: the "
            f"ground-truth arm scores {_pct(metrics['oracle']['accuracy'])}, the upper bound of what VIF's "
            "map can give on this task."
        )
    for arm in ("vif", "vif_paper"):
        if arm not in metrics:
            continue
        m = metrics[arm]
        share, variation = m["importance_on_target"], m["importance_variation"]
        found = "finds" if share >= 4 * uniform else "does NOT find"
        line = (
            f"{LABELS[arm]}: the map {found} the target, {_pct(share)} of its mass on the target's tokens "
            f"({_pct(uniform)} for a flat map)"
        )
        if variation is not None and variation < 0.15:
            line += (
                f"; it is almost the same for every image (mean total-variation distance to the average map "
                f"{_num(variation, 2)}), so it cannot follow the target"
            )
        by_answer = m.get("importance_on_target_by_answer") or {}
        if by_answer:
            line += "; by answer: " + ", ".join(f"{a} {_pct(v)}" for a, v in by_answer.items())
        lines.append(line + ".")
    if "vif" in metrics and metrics["vif"].get("share_of_oracle_gap") is not None:
        lines.append(
            f"VIF with the project's defaults closes {_pct(metrics['vif']['share_of_oracle_gap'])} of the gap "
            "between the control and the ground-truth map."
        )
    return lines


def _first_stages(metrics: dict[str, Any]) -> str:
    """The sentence naming the arms that trained their VIF module alone first (empty if none)."""
    stages = {arm: n for arm, n in metrics["steps"].get("warmup", {}).items() if n and arm in metrics}
    if not stages:
        return ""
    named = ", ".join(f"{LABELS[arm]}: {n} steps" for arm, n in stages.items())
    return (
        f"Before those steps, these arms trained their VIF module alone, the LLM frozen ({named}); "
        "the LLM's steps are the same in every arm. "
    )


def blocks(metrics: dict[str, Any], diagnostics: dict[str, Any], heatmaps: list[str]) -> list[Block]:
    settings = metrics["settings"]
    data = settings["data"]
    arms = [a for a in ARMS if a in metrics]
    out: list[Block] = [("h", "VIF demo: TinyFind, four arms")]
    out.append(
        (
            "p",
            f"TinyFind ({data['n_train']} training / {metrics['n_test']} test questions of type "
            f"{', '.join(data['question_types'])}; {settings['image_size']} px images, "
            f"{data['target_size']} px targets, clutter {data['clutter']}). A tiny LLaVA "
            f"({settings['num_layers']} Llama layers, hidden {settings['hidden_size']}, "
            f"{(settings['image_size'] // settings['patch_size']) ** 2} image tokens) was trained "
            f"{metrics['steps']['base']} steps without VIF; every arm then continued {metrics['steps']['arm']} "
            f"steps from that checkpoint with the same recipe, once per seed ({metrics['seeds']}: data order "
            "and VIF initialisation). " + _first_stages(metrics) + "Scores: greedy generation, exact match. "
            f"Data and base seed {metrics['seed']}, {metrics['seconds']:.0f} s on {metrics['device']}.",
        )
    )
    for arm in arms:
        if arm != "control":
            out.append(("p", "**" + verdict(metrics, arm) + "**"))
    header = ["arm", "accuracy (mean)", "per seed", "gain over control", "map on target", "map variation"]
    rows = []
    for arm in arms:
        m = metrics[arm]
        rows.append(
            [
                LABELS[arm],
                _pct(m["accuracy"]),
                " / ".join(_pct(a) for a in m["accuracy_per_seed"]),
                "-" if arm == "control" else f"{100 * m['gain_over_control']:+.1f}",
                _pct(m.get("importance_on_target")),
                _num(m.get("importance_variation"), 2),
            ]
        )
    out.append(("table", (header, rows)))
    out.append(
        (
            "p",
            "'Map on target' = the share of the importance map (at inference: the prior, from the question) "
            "on the image tokens that overlap the target's box, from the generator's metadata, averaged over "
            f"the test questions and seeds; a flat map puts {_pct(metrics['on_target_if_uniform'])} there. "
            "'Map variation' = mean total-variation distance of a sample's map to the mean map (0: the same "
            "map for every image).",
        )
    )

    out.append(("h", "Why"))
    for line in diagnosis(metrics):
        out.append(("p", line))

    out.append(("h", "Per-layer attention on the image (first seed: control and VIF)"))
    out.append(("img", ("diagnostics/attention_ratio.png", "Visual attention ratio per layer.")))
    out.append(("img", ("diagnostics/entropy.png", "Entropy of the visual attention per layer.")))
    c_rows = {r["layer"]: r for r in diagnostics["control"]["per_layer"]}
    v_rows = {r["layer"]: r for r in diagnostics.get("vif", {}).get("per_layer", [])}
    inject = set((diagnostics.get("vif", {}).get("vif") or {}).get("injection_layers", []))
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
    max_entropy = diagnostics["control"].get("max_entropy")
    out.append(
        (
            "p",
            "Entropy of the attention over the image tokens (renormalised), averaged over the answer tokens' "
            f"rows and the samples; uniform = {_num(max_entropy)}. With VIF the numbers are those of the "
            "injected attention.",
        )
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
