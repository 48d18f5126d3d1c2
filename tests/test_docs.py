"""The docs' commands, run in order as a new user would: train, then eval and diagnose with the
paths training printed, then reload in Python.

Each command below is a copy of a line of README.md or docs/*.md, and the test first checks
that it still is one, so the docs cannot drift from what runs. They run in a scratch folder
laid out as the docs assume (``data/train.json``, ``data/images/``, ``bench.jsonl``,
``val.json``, ``images/``), with ``llava-hf/llava-1.5-7b-hf`` served offline from a Hugging Face
cache folder that holds a tiny LLaVA under that name. The recipe is docs/training.md's
``my-recipe.yaml``, with its step count and batch size made tiny.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from vif.testing import SQUARE_WORDS, write_colour_squares

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "llava-hf/llava-1.5-7b-hf"

# (doc, command), in the order a user runs them.
TRAIN = [
    ("docs/training.md", "vif train my-recipe.yaml --check"),
    ("docs/training.md", "vif train my-recipe.yaml"),
]
USE = [
    ("README.md", "vif eval --model runs/vif --compare runs/vif/vif --benchmark bench.jsonl --metric vqa"),
    ("docs/eval.md", "vif eval --model llava-hf/llava-1.5-7b-hf --benchmark bench.jsonl --metric vqa --output-dir eval-out/base"),
    ("docs/eval.md", "vif eval --model runs/vif --adapter runs/vif/vif --benchmark bench.jsonl --metric vqa --output-dir eval-out/vif"),
    ("docs/eval.md", "vif eval --model runs/vif --compare runs/vif/vif --benchmark bench.jsonl --metric vqa --output-dir eval-out/bench --batch-size 16"),
    ("README.md", "vif diagnose --model runs/vif --compare runs/vif/vif --data val.json --image-folder images/ --output-dir diag/"),
    ("docs/diagnostics.md", "vif diagnose --model llava-hf/llava-1.5-7b-hf --data val.json --image-folder images/ --output-dir diag-base/"),
    ("docs/diagnostics.md", "vif diagnose --model runs/vif --data val.json --image-folder images/ --adapter runs/vif/vif --output-dir diag-vif/"),
    ("docs/diagnostics.md", "vif diagnose --model runs/vif --data val.json --image-folder images/ --compare runs/vif/vif --output-dir diag-compare/"),
]  # fmt: skip
RELOAD = ("docs/training.md", 'model, processor = load_model("runs/vif", adapter="runs/vif/vif")')


def doc_text(name: str) -> str:
    """A doc with shell line continuations joined and runs of spaces squeezed."""
    text = (REPO / name).read_text().replace("\\\n", " ")
    return re.sub(r"[ \t]+", " ", text)


def in_doc(name: str, line: str) -> bool:
    return re.sub(r"\s+", " ", line) in doc_text(name)


def test_the_commands_are_the_docs():
    # The wrong paths of issue 14 are gone: an adapter is the run's vif/ folder.
    for name in ("README.md", "docs/training.md", "docs/eval.md", "docs/diagnostics.md"):
        text = doc_text(name)
        assert not re.search(r"--(adapter|compare) runs/vif(?!/vif)\b", text), name
        assert 'adapter="runs/vif"' not in text and "runs/vif-llava/adapter" not in text, name
    for name, line in TRAIN + USE + [RELOAD]:
        assert in_doc(name, line), f"{name} no longer has: {line}"


def the_recipe() -> dict:
    text = (REPO / "docs/training.md").read_text()
    block = re.search(r"```yaml\n(# my-recipe.yaml.*?)```", text, re.S).group(1)
    return yaml.safe_load(block)


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A scratch folder laid out as the docs assume, and the hub id served from an offline cache."""
    import huggingface_hub.constants

    from vif.tiny import build_tiny_llava

    words = SQUARE_WORDS
    commit = "1" * 40
    repo = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    # 6 layers: the presets' default layer pairs need 5 or more.
    build_tiny_llava(
        repo / "snapshots" / commit, words, image_size=48, patch_size=12, hidden_size=32, num_layers=6,
        num_heads=2, num_kv_heads=1,
    )  # fmt: skip
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    user = tmp_path / "user"
    for folder in (user / "data" / "images", user / "images"):
        folder.mkdir(parents=True)
    train, _ = write_colour_squares(user / "data" / "images")
    _, bench = write_colour_squares(user / "images", image_prefix="images/")
    val = train[:2]
    (user / "data" / "train.json").write_text(json.dumps(train))
    (user / "val.json").write_text(json.dumps(val))
    (user / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in bench) + "\n")
    recipe = the_recipe()
    recipe["schedule"] = {
        **recipe["schedule"],
        "max_steps": 2,
        "per_device_batch_size": 2,
        "grad_accumulation": 1,
    }
    (user / "my-recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(user)
    return user


@pytest.mark.slow
def test_the_docs_commands_in_order(user_folder, capsys):
    from vif.cli import main

    def run(line: str) -> str:
        argv = shlex.split(line)
        assert argv[0] == "vif"
        code = main(argv[1:] + ["--no-progress"])
        captured = capsys.readouterr()
        assert code == 0, f"{line}\n{captured.err[-3000:]}"
        return captured.out

    check, train = (line for _, line in TRAIN)
    json.loads(run(check))  # the validated recipe
    assert not Path("runs").exists()  # --check writes nothing
    printed = run(train)
    paths = dict(
        line.split(": ", 1) for line in printed.splitlines() if line.startswith(("model:", "adapter:"))
    )
    # What training printed is what the docs' next commands use.
    assert paths == {"model": "runs/vif", "adapter": "runs/vif/vif"}, printed
    # The path the docs used to give (the run's folder, not its adapter) is refused in one line
    # that names the right one.
    old = "vif eval --model runs/vif --adapter runs/vif --benchmark bench.jsonl --metric vqa --output-dir x"
    assert main(shlex.split(old)[1:]) == 2
    assert "its VIF adapter is 'runs/vif/vif'" in capsys.readouterr().err
    for _, line in USE:
        run(line)
    for folder in ("eval-out", "eval-out/base", "eval-out/vif", "eval-out/bench"):
        assert (Path(folder) / "summary.json").is_file(), folder
    compare = json.loads(Path("eval-out/bench/summary.json").read_text())
    assert set(compare["runs"]) == {"base", "vif"} and compare["adapter"] == "runs/vif/vif"
    for folder in ("diag", "diag-base", "diag-vif", "diag-compare"):
        assert (Path(folder) / "index.html").is_file(), folder

    # Reload in Python, as docs/training.md shows: a VIFModel with the trained VIF module.
    from safetensors.torch import load_file

    import vif

    scope: dict = {}
    exec("from vif.loading import load_model\n" + RELOAD[1], scope)
    model = scope["model"]
    assert isinstance(model, vif.VIFModel) and not model.training
    saved = load_file("runs/vif/vif/vif_module.safetensors")
    assert all((v == saved[k]).all() for k, v in model.vif_module.state_dict().items())
    shutil.rmtree("runs")
