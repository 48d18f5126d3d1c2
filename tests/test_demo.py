"""`vif demo --quick` end to end: data -> base -> four arms (vif.training.train, in worker processes) ->
scores and maps -> diagnostics -> report. Checks the files a user looks at, the metrics.json schema, and
that a re-run with the same seed reproduces the numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vif.cli import main
from vif.demo import DemoSettings
from vif.demo.pipeline import ARMS

pytestmark = pytest.mark.slow


def _run(out: Path, seed: int = 0, workers: int = 2) -> dict:
    args = ["demo", "--quick", "--output-dir", str(out), "--seed", str(seed), "--no-progress"]
    assert main([*args, "--workers", str(workers)]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, _run(out)


def test_metrics_schema(quick_run: tuple[Path, dict]) -> None:
    out, metrics = quick_run
    settings = DemoSettings.quick()
    assert metrics["seeds"] == list(settings.seeds)
    for arm in ARMS:
        m = metrics[arm]
        assert len(m["accuracy_per_seed"]) == len(settings.seeds)
        assert m["accuracy"] == pytest.approx(sum(m["accuracy_per_seed"]) / len(settings.seeds))
        assert set(m["per_type"]) == set(settings.data.question_types)
        if arm == "control":
            assert "importance_on_target" not in m  # no map in the control arm
        else:
            assert 0.0 <= m["importance_on_target"] <= 1.0
            assert len(m["importance_on_target_per_seed"]) == len(settings.seeds)
            assert m["gain_over_control"] == pytest.approx(m["accuracy"] - metrics["control"]["accuracy"])
    assert metrics["oracle"]["importance_on_target"] == pytest.approx(1.0)  # the map IS the target box
    n_tokens = (settings.image_size // settings.patch_size) ** 2
    for arm in ("control", "vif"):  # the diagnosed arms
        m = metrics[arm]
        assert 0.0 < m["deep_entropy"] <= torch.log(torch.tensor(float(n_tokens))).item() + 1e-6
        assert 0.0 < m["deep_ratio"] <= 1.0 + 1e-6
        assert 0.0 <= m["deep_attention_on_target"] <= 1.0
    assert 0.0 < metrics["on_target_if_uniform"] < 1.0
    assert metrics["steps"] == {
        "base": settings.base_steps,
        "arm": settings.arm_steps,
        "warmup": settings.warmup_steps,
    }
    assert metrics["seconds"] > 0
    assert metrics["n_test"] == settings.data.n_test

    predictions = json.loads((out / "predictions.json").read_text())
    for arm in ARMS:
        for seed, accuracy in zip(settings.seeds, metrics[arm]["accuracy_per_seed"]):
            rows = predictions[f"{arm}/seed{seed}"]
            assert len(rows) == settings.data.n_test
            assert sum(p["correct"] for p in rows) / len(rows) == pytest.approx(accuracy)


def test_every_arm_trained_from_the_base(quick_run: tuple[Path, dict]) -> None:
    out, _ = quick_run
    models = out / "models"
    for arm in ARMS:
        for seed in DemoSettings.quick().seeds:
            folder = models / f"{arm}-seed{seed}"
            recipe = json.loads((folder / "training_recipe.json").read_text())
            assert Path(recipe["model"]) == models / "base"
            assert recipe["schedule"]["max_steps"] == DemoSettings.quick().arm_steps
            assert recipe["seed"] == seed
            assert (folder / "vif" / "vif_module.safetensors").is_file() == (arm != "control")
    paper = json.loads((models / "vif_paper-seed0" / "vif" / "vif_config.json").read_text())
    default = json.loads((models / "vif-seed0" / "vif" / "vif_config.json").read_text())
    assert paper["evidence_weight"] == 0.0 and paper["centers"] == "linear"  # the paper's recipe
    assert (
        json.loads((models / "oracle-seed0" / "vif" / "vif_config.json").read_text())["map_source"] == "boxes"
    )
    assert default["map_source"] == "attender"
    # the project's arm first trained its VIF module alone (LLM frozen), then continued from it
    warmup = models / "vif-seed0-warmup"
    stage = json.loads((warmup / "training_recipe.json").read_text())
    assert stage["trainable"]["mode"] == "vif-only"
    assert stage["schedule"]["max_steps"] == DemoSettings.quick().warmup_steps["vif"]
    second = json.loads((models / "vif-seed0" / "training_recipe.json").read_text())
    assert Path(second["init_adapter"]).parent == warmup and second["vif"] is None
    assert not (models / "vif_paper-seed0-warmup").exists()  # the paper's recipe has no such stage


def test_report_files(quick_run: tuple[Path, dict]) -> None:
    out, metrics = quick_run
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for arm in ARMS:
        assert f"{100 * metrics[arm]['accuracy']:.1f}%" in md
    assert "trained their VIF module alone" in md  # the project's arm's first stage is named
    images_md = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    images_html = re.findall(r"<img src='([^']+)'", page)
    assert images_md == images_html
    assert "diagnostics/entropy.png" in images_md and "diagnostics/attention_ratio.png" in images_md
    heatmaps = [p for p in images_md if "heatmaps/" in p]
    assert heatmaps, "the report shows no heatmap"
    for rel in images_md:
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_rerun_in_one_process_reproduces_numbers(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, metrics = quick_run
    again = _run(tmp_path, workers=1)  # worker processes or not: the same numbers
    for arm in ARMS:
        for key in ("accuracy_per_seed", "train_loss_per_seed", "importance_on_target_per_seed"):
            assert again[arm].get(key) == metrics[arm].get(key), (arm, key)
    for arm in ("control", "vif"):
        assert again[arm]["deep_entropy"] == metrics[arm]["deep_entropy"]
    first = json.loads((out / "predictions.json").read_text())
    assert json.loads((tmp_path / "predictions.json").read_text()) == first


def test_cuda_without_gpu_is_refused_before_work(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="--device cpu"):
        main(["demo", "--quick", "--output-dir", str(tmp_path / "x"), "--device", "cuda"])
    assert not (tmp_path / "x").exists()
