"""`vif demo --quick` end to end: data -> base -> control / VIF arms (vif.training.train) -> scores ->
diagnostics -> report. Checks the files a user looks at, the metrics.json schema, and that a re-run
with the same seed reproduces the numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vif.cli import main
from vif.demo import DemoSettings

pytestmark = pytest.mark.slow


def _run(out: Path, seed: int = 0) -> dict:
    assert main(["demo", "--quick", "--out", str(out), "--seed", str(seed), "--no-progress"]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, _run(out)


def test_metrics_schema(quick_run: tuple[Path, dict]) -> None:
    out, metrics = quick_run
    settings = DemoSettings.quick()
    for arm in ("control", "vif"):
        m = metrics[arm]
        assert 0.0 <= m["accuracy"] <= 1.0
        assert set(m["per_type"]) == set(settings.data.question_types)
        n_tokens = (settings.image_size // settings.patch_size) ** 2
        # entropy of a distribution over the image tokens: between 0 and ln(Nv)
        assert 0.0 < m["deep_entropy"] <= torch.log(torch.tensor(float(n_tokens))).item() + 1e-6
        assert 0.0 < m["deep_ratio"] <= 1.0 + 1e-6
        assert 0.0 <= m["deep_attention_on_target"] <= 1.0
    assert metrics["control"]["importance_on_target"] is None  # no VIF map in the control arm
    assert 0.0 <= metrics["vif"]["importance_on_target"] <= 1.0
    assert 0.0 <= metrics["vif"]["importance_variation"] <= 1.0
    assert 0.0 < metrics["on_target_if_uniform"] < 1.0
    assert metrics["steps"] == {"base": settings.base_steps, "arm": settings.arm_steps}
    assert metrics["seconds"] > 0
    assert metrics["n_test"] == settings.data.n_test

    predictions = json.loads((out / "predictions.json").read_text())
    for arm in ("control", "vif"):
        assert len(predictions[arm]) == settings.data.n_test
        accuracy = sum(p["correct"] for p in predictions[arm]) / len(predictions[arm])
        assert accuracy == pytest.approx(metrics[arm]["accuracy"])


def test_both_arms_trained_from_the_base(quick_run: tuple[Path, dict]) -> None:
    out, _ = quick_run
    models = out / "models"
    assert (models / "vif" / "vif" / "vif_module.safetensors").is_file()
    assert not (models / "control" / "vif").exists()
    for arm in ("control", "vif"):
        recipe = json.loads((models / arm / "training_recipe.json").read_text())
        assert Path(recipe["model"]) == models / "base"
        assert recipe["schedule"]["max_steps"] == DemoSettings.quick().arm_steps
    assert json.loads((models / "control" / "training_recipe.json").read_text())["vif"] is None


def test_report_files(quick_run: tuple[Path, dict]) -> None:
    out, metrics = quick_run
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert f"{100 * metrics['control']['accuracy']:.1f}%" in md
    assert f"{100 * metrics['vif']['accuracy']:.1f}%" in md
    images_md = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    images_html = re.findall(r"<img src='([^']+)'", page)
    assert images_md == images_html
    assert "diagnostics/entropy.png" in images_md and "diagnostics/attention_ratio.png" in images_md
    heatmaps = [p for p in images_md if "heatmaps/" in p]
    assert heatmaps, "the report shows no heatmap"
    for rel in images_md:
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_rerun_reproduces_numbers(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, metrics = quick_run
    again = _run(tmp_path)
    for arm in ("control", "vif"):
        for key in ("accuracy", "deep_entropy", "deep_ratio", "train_loss", "importance_on_target"):
            assert again[arm][key] == metrics[arm][key], (arm, key)
    first = json.loads((out / "predictions.json").read_text())
    assert json.loads((tmp_path / "predictions.json").read_text()) == first


def test_cuda_without_gpu_is_refused_before_work(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="--device cpu"):
        main(["demo", "--quick", "--out", str(tmp_path / "x"), "--device", "cuda"])
    assert not (tmp_path / "x").exists()
