"""The lmms-eval plug-in, end to end and offline: `python -m lmms_eval --model vif_llava ...` on a
tiny local task (YAML with `dataset_path: json`), a tiny saved LLaVA and a saved VIF adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is optional: pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3",
)

import vif  # noqa: E402
from vif.eval.generation import generate_answers, user_message  # noqa: E402
from vif.loading import load_model  # noqa: E402
from vif.tiny import build_tiny_llava, build_tiny_qwen2_5_vl  # noqa: E402

pytestmark = [pytest.mark.lmms_eval, pytest.mark.slow]

QUESTIONS = ["what color is the square?", "is there a red circle in the top left corner?", "how many shapes?"]
MAX_NEW_TOKENS = 4

TASK_YAML = f"""\
task: tiny_vif_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/test.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  do_sample: false
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

TASK_UTILS = """\
from pathlib import Path

from PIL import Image

DATA = Path(__file__).parent / "data"


def doc_to_visual(doc):
    return [Image.open(DATA / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""


BUILDERS = {"vif_llava": build_tiny_llava, "vif_qwen2_5_vl": build_tiny_qwen2_5_vl}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = BUILDERS[request.param](root / "model", words=QUESTIONS)
    model, _ = load_model(model_dir, device="cpu", dtype="float32")
    vmodel = vif.attach(model, vif.VIFConfig.preset("paper", model))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in vmodel.vif_module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    adapter_dir = vmodel.save_pretrained(root / "adapter")

    task = root / "task"
    (task / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(len(QUESTIONS)):
        pixels = rng.integers(0, 256, size=(40 + 20 * i, 72, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(task / "data" / f"{i}.png")
        images.append([Image.open(task / "data" / f"{i}.png").convert("RGB")])

    # What vif's own generation answers (one sample at a time): the plug-in must agree.
    vmodel, processor = load_model(model_dir, device="cpu", dtype="float32", adapter=adapter_dir)
    expected = [
        generate_answers(vmodel, processor, [user_message(q)], [imgs], MAX_NEW_TOKENS)[0]
        for q, imgs in zip(QUESTIONS, images)
    ]
    # Two of three references are the model's answers: exact match must be 2/3.
    answers = [expected[0], "zebra", expected[2]]
    lines = [
        json.dumps({"image": f"{i}.png", "question": q, "answer": a})
        for i, (q, a) in enumerate(zip(QUESTIONS, answers))
    ]
    (task / "data" / "test.jsonl").write_text("\n".join(lines) + "\n")
    (task / "tiny_vif_task.yaml").write_text(TASK_YAML)
    (task / "utils.py").write_text(TASK_UTILS)
    return {
        "name": request.param,
        "root": root,
        "model": model_dir,
        "adapter": adapter_dir,
        "task": task,
        "expected": expected,
    }


def run_lmms_eval(root, model_name, model_args, task, out):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf-home"),  # the json dataset cache goes here, not to ~/.cache
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable, "-m", "lmms_eval",
        "--model", model_name,
        "--model_args", model_args,
        "--tasks", "tiny_vif_task",
        "--include_path", str(task),
        "--batch_size", "2",
        "--device", "cpu",
        "--output_path", str(out),
        "--log_samples",
        # lmms-eval 0.7.3 exits 0 after an error unless verbosity is DEBUG.
        "--verbosity", "DEBUG",
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_lmms_eval_cli_with_vif_adapter(setup):
    out = setup["root"] / "out"
    args = f"pretrained={setup['model']},vif={setup['adapter']},dtype=float32"
    result = run_lmms_eval(setup["root"], setup["name"], args, setup["task"], out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results_files = list(out.rglob("*_results.json"))
    assert len(results_files) == 1, result.stdout[-2000:]
    results = json.loads(results_files[0].read_text())
    assert results["results"]["tiny_vif_task"]["exact_match,none"] == pytest.approx(2 / 3)

    samples_files = list(out.rglob("*_samples_tiny_vif_task.jsonl"))
    assert len(samples_files) == 1
    samples = sorted(
        (json.loads(line) for line in samples_files[0].read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    responses = [s["filtered_resps"] for s in samples]
    responses = [r[0] if isinstance(r, list) else r for r in responses]
    # Batched (batch size 2, left-padded) through lmms-eval == vif's own one-at-a-time generation.
    assert responses == setup["expected"]


def test_registry_resolves_the_entry_point_and_checks_arguments(tmp_path):
    from lmms_eval.models import get_model

    from vif.eval.lmms_model import VIFChat, VIFLlava, VIFQwen2_5_VL

    assert get_model("vif_llava") is VIFLlava
    assert get_model("vif_qwen2_5_vl") is VIFQwen2_5_VL
    assert get_model("vif") is VIFChat
    with pytest.raises(ValueError, match=r"unknown --model_args \['vif_dir'\]"):
        VIFLlava(pretrained="unused", vif_dir="x")
    model_dir = str(build_tiny_llava(tmp_path / "model", words=QUESTIONS))
    with pytest.raises(
        ValueError, match="is a 'llava' model but this lmms-eval model name expects qwen2_5_vl"
    ):
        VIFQwen2_5_VL(pretrained=model_dir, dtype="float32")
    # The base model alone (no vif=...) loads as a plain transformers model.
    base = VIFChat(pretrained=model_dir, dtype="float32", device="cpu", batch_size="2")
    assert not isinstance(base.model, vif.VIFModel) and base.batch_size == 2


# The lmms-eval tasks docs/eval.md gives for the paper's tables, and their utility modules.
PAPER_TASKS = (
    "vqav2_val gqa textvqa_val seedbench mme scienceqa_img ai2d hrbench4k hrbench8k vstar_bench "
    "refcoco_bbox_rec_val refcoco_bbox_rec_testA refcoco_bbox_rec_testB"
).split()
PAPER_TASK_MODULES = (
    "vqav2.utils gqa.utils textvqa.utils seedbench.utils mme.utils scienceqa.utils ai2d.utils "
    "hrbench.utils vstar_bench.utils refcoco.utils_rec"
).split()


def test_paper_tasks_exist_and_import_with_the_lmms_extra():
    import importlib

    from lmms_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    assert [task for task in PAPER_TASKS if task not in known] == []
    # Their scoring code imports with the [lmms] extra's packages (no missing dependency).
    for module in PAPER_TASK_MODULES:
        importlib.import_module(f"lmms_eval.tasks.{module}")


def test_generation_kwargs_and_messages_are_checked():
    from vif.eval.lmms_model import cut_at_stop, greedy_settings, messages_and_images

    assert greedy_settings({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0}, "t", 128) == (16, [])
    assert greedy_settings({"until": "ASSISTANT:"}, "t", 128) == (128, ["ASSISTANT:"])
    with pytest.raises(ValueError, match="task 't' asks for sampling"):
        greedy_settings({"temperature": 0.7}, "t", 128)
    with pytest.raises(ValueError, match="asks for sampling"):
        greedy_settings({"do_sample": True}, "t", 128)
    with pytest.raises(ValueError, match="beam search"):
        greedy_settings({"num_beams": 3}, "t", 128)
    assert cut_at_stop("B. a dog\n\nUSER: more", ["\n\n", "USER:"]) == "B. a dog"
    assert cut_at_stop("B", ["\n\n"]) == "B"

    image = Image.new("RGB", (8, 8))
    raw = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": "what?"}]},
    ]
    messages, images = messages_and_images(raw, "t")
    assert messages == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
    ]
    assert images == [image]
    video = [
        {"role": "user", "content": [{"type": "video", "url": "clip.mp4"}, {"type": "text", "text": "?"}]}
    ]
    with pytest.raises(ValueError, match="task 't' sends video input"):
        messages_and_images(video, "t")
