"""`vif eval` and `vif.eval.evaluate` end to end on tiny saved checkpoints and real PNG files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vif
from vif.cli import main as vif_main
from vif.eval import aggregate, evaluate, format_summary
from vif.eval.benchmark import (
    BOX_PROMPT,
    LETTER_ANSWER,
    SHORT_ANSWER,
    BenchmarkError,
    build_question,
    read_benchmark,
)
from vif.eval.generation import (
    encode_prompts,
    generate_answers,
    prepare_image,
    render_prompt,
    user_message,
)
from vif.eval.runner import predict
from vif.loading import load_model
from vif.tiny import build_tiny_llava, build_tiny_qwen2_5_vl

WORDS = [
    "what color is the square",
    "is there a red circle in the top left corner of this picture",
    "how many shapes",
    "red green blue yes no",
    "answer the question using a single word or phrase",
]
# Different lengths, so that batches are really left-padded.
QUESTIONS = [
    "what color is the square?",
    "is there a red circle in the top left corner of this picture?",
    "how many shapes?",
    "what color is the square in the top left corner?",
    "is there a red circle?",
    "how many shapes are in this picture?",
]
MAX_NEW_TOKENS = 5


def write_images(folder, count, seed=0):
    """Real PNG files of different sizes (the processors resize / crop them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(48 + 16 * i, 64 + 8 * (i % 3), 3), dtype=np.uint8)
        name = f"img_{i}.png"
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def make_adapter(model_dir, adapter_dir, seed=0):
    """A saved VIF adapter with non-trivial random weights (a fresh one barely changes the output)."""
    model, _ = load_model(model_dir, device="cpu", dtype="float32")
    # Our attender: its LayerNorms keep these large random weights from saturating every
    # spread (with attender="released" this seed gives flat maps that change no answer).
    vmodel = vif.attach(model, vif.VIFConfig.preset("paper", model, attender="vif"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in vmodel.vif_module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    vmodel.save_pretrained(adapter_dir)
    return adapter_dir


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_eval")
    model_dir = build_tiny_llava(root / "model", words=WORDS)
    adapter_dir = make_adapter(model_dir, root / "adapter")
    images = write_images(root / "images", len(QUESTIONS))
    records = [
        {"id": f"q{i}", "image": f"images/{name}", "question": question, "answer": "red"}
        for i, (name, question) in enumerate(zip(images, QUESTIONS))
    ]
    bench = write_jsonl(root / "bench.jsonl", records)
    return {"root": root, "model": model_dir, "adapter": adapter_dir, "bench": bench, "records": records}


@pytest.fixture(scope="module")
def llava_vif(llava):
    return load_model(llava["model"], device="cpu", dtype="float32", adapter=llava["adapter"])


# -------------------------------------------------------------------------------------
# Generation: batched left-padded == one at a time == a hand-written greedy loop
# -------------------------------------------------------------------------------------


def answers(model, processor, samples, batch_size):
    return predict(
        model, processor, samples, "exact_match", batch_size, max_new_tokens=MAX_NEW_TOKENS, progress=False
    )


def manual_greedy(model, processor, question, image, max_new_tokens):
    """Reference: one sample, full forward pass per step (no KV cache), argmax, stop at EOS."""
    prompt = render_prompt(processor, user_message(question))
    inputs = encode_prompts(processor, [prompt], [[prepare_image(image, processor, "pad")]])
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    eos = processor.tokenizer.eos_token_id
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_prepare_image(llava_vif):
    _, processor = llava_vif
    image = Image.fromarray(np.full((10, 20, 3), 7, dtype=np.uint8))  # 20 wide, 10 high
    padded = np.asarray(prepare_image(image, processor, "pad"))
    mean = [int(m * 255) for m in processor.image_processor.image_mean]
    assert padded.shape == (20, 20, 3)
    assert (padded[5:15] == 7).all()  # the image, centred
    assert (padded[:5] == mean).all() and (padded[15:] == mean).all()  # mean-colour borders
    assert prepare_image(image, processor, "resize").size == (20, 20)
    assert prepare_image(image, processor, "keep").size == (20, 10)
    with pytest.raises(ValueError, match="image_aspect must be one of"):
        prepare_image(image, processor, "crop")


@pytest.fixture(scope="module")
def one_at_a_time(llava, llava_vif):
    """Predictions of every sample of the benchmark, generated with batch size 1 (no padding)."""
    vmodel, processor = llava_vif
    samples = read_benchmark(llava["bench"], "exact_match")
    with vmodel.disabled():
        base = answers(vmodel, processor, samples, batch_size=1)
    return {"samples": samples, "base": base, "vif": answers(vmodel, processor, samples, batch_size=1)}


def test_generation_matches_manual_greedy_loop(llava_vif, one_at_a_time):
    vmodel, processor = llava_vif
    with vmodel.disabled():
        for sample, prediction in list(zip(one_at_a_time["samples"], one_at_a_time["base"]))[:3]:
            image = Image.open(sample.image_path).convert("RGB")
            question = build_question(sample, "exact_match")
            assert prediction == manual_greedy(vmodel, processor, question, image, MAX_NEW_TOKENS)
    assert all(one_at_a_time["base"])  # something was generated


def test_batched_left_padded_equals_batch_size_one(llava_vif, one_at_a_time):
    vmodel, processor = llava_vif
    samples = one_at_a_time["samples"]
    # The batch really is padded: the prompts have different token lengths.
    prompts = [render_prompt(processor, user_message(build_question(s, "exact_match"))) for s in samples]
    lengths = {len(processor.tokenizer(prompt)["input_ids"]) for prompt in prompts}
    assert len(lengths) > 1
    assert answers(vmodel, processor, samples, batch_size=len(samples)) == one_at_a_time["vif"]
    with vmodel.disabled():
        assert answers(vmodel, processor, samples, batch_size=len(samples)) == one_at_a_time["base"]
    # (The end-to-end test below checks batch size 4, i.e. a full and a partial batch.)


def test_qwen2_5_vl_batched_equals_batch_size_one(tmp_path):
    model_dir = build_tiny_qwen2_5_vl(tmp_path / "qwen", words=WORDS)
    adapter_dir = make_adapter(model_dir, tmp_path / "adapter")
    vmodel, processor = load_model(model_dir, device="cpu", dtype="float32", adapter=adapter_dir)
    names = write_images(tmp_path / "images", 4, seed=1)
    images = [[Image.open(tmp_path / "images" / name).convert("RGB")] for name in names]
    conversations = [user_message(q) for q in QUESTIONS[:4]]
    # Qwen's template: the image sits inside <|vision_start|> ... <|vision_end|> in a user turn.
    assert "<|vision_start|><|image_pad|><|vision_end|>" in render_prompt(processor, conversations[0])
    batched = generate_answers(vmodel, processor, conversations, images, MAX_NEW_TOKENS)
    single = [
        generate_answers(vmodel, processor, [c], [i], MAX_NEW_TOKENS)[0]
        for c, i in zip(conversations, images)
    ]
    assert batched == single
    with vmodel.disabled():
        base = generate_answers(vmodel, processor, conversations, images, MAX_NEW_TOKENS)
    assert base != batched  # the adapter changes answers, and disabled() really turns it off


# -------------------------------------------------------------------------------------
# End to end: `vif eval --compare`
# -------------------------------------------------------------------------------------


def test_vif_eval_cli_compare_end_to_end(llava, one_at_a_time, tmp_path, capsys):
    base_predictions, vif_predictions = one_at_a_time["base"], one_at_a_time["vif"]
    assert base_predictions != vif_predictions  # otherwise this test could not tell the runs apart

    # Half of the references are the base model's own answers: base accuracy is exactly 0.5.
    records = [
        {**record, "answer": base_predictions[i] if i % 2 == 0 else "zebra"}
        for i, record in enumerate(llava["records"])
    ]
    bench = write_jsonl(llava["root"] / "bench_compare.jsonl", records)
    out = tmp_path / "out"
    code = vif_main(
        [
            "eval",
            "--model", str(llava["model"]),
            "--compare", str(llava["adapter"]),
            "--benchmark", str(bench),
            "--metric", "exact_match",
            "--output-dir", str(out),
            "--batch-size", "4",
            "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--dtype", "float32",
            "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "vif" in printed and "delta" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "exact_match" and summary["num_samples"] == len(records)
    assert summary["model"] == str(llava["model"]) and summary["adapter"] == str(llava["adapter"])
    assert set(summary["runs"]) == {"base", "vif"}
    for run, expected in (("base", base_predictions), ("vif", vif_predictions)):
        info = summary["runs"][run]
        assert info["predictions_file"] == f"predictions_{run}.jsonl"
        rows = [json.loads(line) for line in (out / info["predictions_file"]).read_text().splitlines()]
        assert [row["id"] for row in rows] == [r["id"] for r in records]
        assert [row["prediction"] for row in rows] == expected  # batch 4 == batch 1
        for row, record in zip(rows, records):
            assert set(row) == {"id", "image", "question", "prompt", "prediction", "scores", "answer"}
            assert row["answer"] == record["answer"] and row["image"] == record["image"]
            assert row["prompt"] == f"{record['question']}\n{SHORT_ANSWER}"
            assert row["scores"] == {
                "accuracy": float(vif.eval.metrics.exact_match(row["prediction"], record["answer"]))
            }
        assert info["scores"]["accuracy"] == pytest.approx(
            np.mean([row["scores"]["accuracy"] for row in rows])
        )
        assert info["scores"]["num_samples"] == len(records)
    assert summary["runs"]["base"]["scores"]["accuracy"] == pytest.approx(0.5)
    delta = summary["runs"]["vif"]["scores"]["accuracy"] - summary["runs"]["base"]["scores"]["accuracy"]
    assert summary["delta"]["accuracy"] == pytest.approx(delta)


def test_evaluate_api_single_runs_and_no_output(llava, llava_vif):
    vmodel, processor = llava_vif
    summary = evaluate(
        vmodel, processor, llava["bench"], "vqa", batch_size=3, max_new_tokens=2, limit=2, progress=False
    )
    assert list(summary["runs"]) == ["vif"] and summary["runs"]["vif"]["predictions_file"] is None
    assert summary["num_samples"] == 2 and "delta" not in summary
    base_model = vmodel.base_model
    with vmodel.disabled():
        summary = evaluate(
            base_model, processor, llava["bench"], "vqa", max_new_tokens=2, limit=2, progress=False
        )
    assert list(summary["runs"]) == ["base"]
    with pytest.raises(ValueError, match="needs a VIFModel"):
        evaluate(base_model, processor, llava["bench"], "vqa", compare=True)
    with pytest.raises(
        ValueError,
        match="unknown metric 'bleu'; known metrics: exact_match, lmms_gqa, lmms_mme, lmms_textvqa, multiple_choice",
    ):
        evaluate(vmodel, processor, llava["bench"], "bleu")


def test_evaluate_multiple_choice_and_refcoco_outputs(llava, llava_vif, tmp_path):
    vmodel, processor = llava_vif
    image = llava["records"][0]["image"]
    mc = [
        {"id": "m0", "image": image, "question": "which color?", "options": ["red", "green"], "answer": "A"},
        {"id": "m1", "image": image, "question": "how many shapes?", "options": ["1", "2", "3"], "answer": 2},
    ]
    ref = [
        {
            "id": "r0",
            "image": image,
            "question": "the square",
            "bbox": [10, 10, 40, 40],
            "image_size": [64, 48],
        }
    ]
    for metric, records, keys in (
        ("multiple_choice", mc, {"num_samples", "accuracy", "unparsed"}),
        ("refcoco", ref, {"num_samples", "accuracy", "iou", "unparsed"}),
    ):
        bench = write_jsonl(llava["root"] / f"{metric}.jsonl", records)
        out = tmp_path / metric
        summary = evaluate(vmodel, processor, bench, metric, out, max_new_tokens=3, progress=False)
        assert set(summary["runs"]["vif"]["scores"]) == keys
        rows = [json.loads(line) for line in (out / "predictions_vif.jsonl").read_text().splitlines()]
        assert [row["id"] for row in rows] == [r["id"] for r in records]
        for row, record in zip(rows, records):
            assert set(row["scores"]) == keys - {"num_samples"}
            assert row["scores"] == vif.eval.metrics.METRICS[metric](row["prediction"], record)
    assert rows[0]["bbox"] == [10, 10, 40, 40] and rows[0]["prompt"].endswith("the square")


def test_format_summary_lists_runs_delta_and_mme():
    records = [
        {"question_id": "i1", "category": "color", "answer": "yes"},
        {"question_id": "i1", "category": "color", "answer": "no"},
    ]
    base = aggregate(
        "yes_no", [{"accuracy": 1.0, "unparsed": 0.0}, {"accuracy": 0.0, "unparsed": 1.0}], records
    )
    vif_scores = aggregate("yes_no", [{"accuracy": 1.0, "unparsed": 0.0}] * 2, records)
    summary = {
        "metric": "yes_no",
        "benchmark": "mme.jsonl",
        "num_samples": 2,
        "runs": {"base": {"scores": base, "seconds": 1.0}, "vif": {"scores": vif_scores, "seconds": 2.0}},
        "delta": {"accuracy": 0.5, "unparsed": -0.5},
    }
    lines = format_summary(summary).splitlines()
    assert lines[0] == "yes_no on mme.jsonl (2 samples)"
    assert lines[1].split() == ["run", "accuracy", "unparsed", "seconds"]
    assert lines[2].split() == ["base", "0.5000", "0.5000", "1.0"]
    assert lines[3].split() == ["vif", "1.0000", "0.0000", "2.0"]
    assert lines[4].split() == ["delta", "+0.5000", "-0.5000"]
    assert lines[5] == "base MME: total 50.0, acc 50.0, acc+ 0.0"
    assert lines[6] == "vif MME: total 200.0, acc 100.0, acc+ 100.0"


# -------------------------------------------------------------------------------------
# Benchmark files: prompts and clear errors before any model runs
# -------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    write_images(tmp_path / "images", 2)
    return tmp_path


def test_prompts_per_metric(folder):
    mc = write_jsonl(
        folder / "mc.json.jsonl",
        [{"image": "images/img_0.png", "question": "Which?", "options": ["cat", "dog"], "answer": "B"}],
    )
    sample = read_benchmark(mc, "multiple_choice")[0]
    assert sample.id == "1"  # no id: the position
    assert build_question(sample, "multiple_choice") == f"Which?\nA. cat\nB. dog\n{LETTER_ANSWER}"
    assert build_question(sample, "multiple_choice", instruction="") == "Which?\nA. cat\nB. dog"
    ref = folder / "ref.json"  # a JSON list, with LLaVA's "text" and "question_id" keys
    ref.write_text(
        json.dumps([{"question_id": 7, "image": "images/img_1.png", "text": "the cat", "bbox": [0, 0, 1, 1]}])
    )
    sample = read_benchmark(ref, "refcoco")[0]
    assert sample.id == "7" and sample.question == "the cat"
    assert build_question(sample, "refcoco") == BOX_PROMPT + "the cat"


def test_image_folder_option(folder):
    (folder / "sub").mkdir()
    bench = write_jsonl(folder / "sub" / "b.jsonl", [{"image": "img_0.png", "question": "q", "answer": "a"}])
    with pytest.raises(BenchmarkError, match="image_folder"):
        read_benchmark(bench, "exact_match")
    assert read_benchmark(bench, "exact_match", image_folder=folder / "images")[0].image_path.is_file()


@pytest.mark.parametrize(
    ("lines", "metric", "message"),
    [
        (['{"image": "images/img_0.png", "question": "q", "answer": "a"}', "{not json"], "vqa", r"b\.jsonl line 2: invalid JSON"),
        (['{"id": "x", "image": "images/img_0.png", "answer": "a"}'], "vqa", r"line 1 \(sample 'x'\): no 'question' field"),
        (['{"id": "x", "image": "images/img_0.png", "question": "", "answer": "a"}'], "vqa", r"sample 'x'\): field 'question' must be a non-empty string"),
        (['{"id": "x", "question": "q", "answer": "a"}'], "vqa", r"sample 'x'\): field 'image'"),
        (['{"id": "x", "image": "images/img_0.png", "question": "q"}'], "vqa", r"sample 'x'\): not a valid 'vqa' record: .*record\['answer'\]"),
        (['{"id": "x", "image": "images/img_0.png", "question": "q", "answer": "maybe"}'], "yes_no", r"sample 'x'\).*'maybe' is not 'yes' or 'no'"),
        (['{"id": "x", "image": "images/img_0.png", "question": "q", "options": ["a", "b"], "answer": "E"}'], "multiple_choice", r"sample 'x'\).*out of range"),
        (['{"id": "x", "image": "images/img_0.png", "question": "q", "options": "a, b", "answer": "A"}'], "multiple_choice", r"sample 'x'\): field 'options' must be a list"),
        (['{"id": "x", "image": "images/img_0.png", "question": "q", "bbox": [1, 2, 3]}'], "refcoco", r"sample 'x'\): field 'bbox' must be a list of 4 numbers"),
        (['{"image": "images/img_0.png", "question": "q", "answer": "a"}', '"q2"'], "vqa", r"line 2: expected a JSON object, got str"),
        (['[{"image": "images/img_0.png", "question": "q", "answer": "a"}, 3]'], "vqa", r"b\.jsonl item 2: expected a JSON object, got int"),
        ([""], "vqa", "no records"),
    ],
)  # fmt: skip
def test_malformed_benchmark_names_line_sample_and_field(folder, lines, metric, message):
    bench = folder / "b.jsonl"
    bench.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkError, match=message):
        read_benchmark(bench, metric)


def test_limit(folder):
    records = [{"id": f"q{i}", "image": "images/img_0.png", "question": "q", "answer": "a"} for i in range(3)]
    bench = write_jsonl(folder / "b.jsonl", records)
    assert [s.id for s in read_benchmark(bench, "vqa", limit=2)] == ["q0", "q1"]
    with pytest.raises(BenchmarkError, match="limit must be a positive"):
        read_benchmark(bench, "vqa", limit=0)


def test_missing_and_corrupt_images_are_all_listed(folder):
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    bench = write_jsonl(
        folder / "b.jsonl",
        [
            {"id": "ok", "image": "images/img_0.png", "question": "q", "answer": "a"},
            {"id": "gone", "image": "images/nope.png", "question": "q", "answer": "a"},
            {"id": "bad", "image": "images/broken.png", "question": "q", "answer": "a"},
        ],
    )
    with pytest.raises(BenchmarkError) as info:
        read_benchmark(bench, "exact_match")
    message = str(info.value)
    assert "2 of 3 images cannot be read" in message
    assert "line 2 (sample 'gone')" in message and "nope.png" in message and "file not found" in message
    assert "line 3 (sample 'bad')" in message and "broken.png" in message
    assert "--image-folder" in message


def test_cli_errors_before_loading_the_model(folder, capsys):
    bench = write_jsonl(
        folder / "b.jsonl", [{"id": "gone", "image": "images/nope.png", "question": "q", "answer": "a"}]
    )
    missing_model = str(folder / "no-model-here")  # never loaded: the errors come first
    assert vif_main(["eval", "--model", missing_model, "--benchmark", str(bench), "--metric", "bleu"]) == 2
    assert (
        "unknown metric 'bleu'; known metrics: exact_match, lmms_gqa, lmms_mme, lmms_textvqa, multiple_choice, refcoco, vqa, yes_no"
        in capsys.readouterr().err
    )
    assert vif_main(["eval", "--model", missing_model, "--benchmark", str(bench), "--metric", "vqa"]) == 2
    err = capsys.readouterr().err
    assert "sample 'gone'" in err and "nope.png" in err
    with pytest.raises(SystemExit):  # --adapter and --compare exclude each other
        vif_main(["eval", "--model", "m", "--benchmark", "b", "--metric", "vqa", "--adapter", "a", "--compare", "a"])  # fmt: skip
