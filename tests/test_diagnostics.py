"""Visual-attention diagnostics: the fast rows-only probe equals eager output_attentions.

Every equivalence test runs the same saved checkpoint twice - once loaded with SDPA and
measured by the probe inside the attention function, once loaded with eager attention
and measured from ``output_attentions=True`` (with VIF attached, the eager injected
layers return the injected ``A'``) - and holds the per-sample, per-layer, per-image-token
numbers and the summary (ratio, entropy, violin quantiles) equal at fp32 tolerance.

The tiny checkpoints get their query / key projections scaled up (and the images are
textured PNGs), so attention is far from uniform and a wrong row, head or column would
change the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

import vif
from vif.backbones import get_backbone
from vif.diagnostics import AttentionProbe, collect, compare, diagnose, probing, select_rows, summarise
from vif.diagnostics.collect import _generated_lengths
from vif.diagnostics.inputs import iter_batches
from vif.injection import PROBE_ATTRIBUTE
from vif.loading import load_model
from vif.tiny import build_tiny_llava, build_tiny_qwen2_5_vl

QA = [
    ("What colour is the square?", "A red square."),
    ("Where is the circle?", "In the top left corner of the picture."),
    ("What is in the picture?", "A blue circle and a green bar."),
    ("Is there a square?", "Yes"),
    ("Describe the image.", "Coloured blocks."),
]
WORDS = [text for pair in QA for text in pair]
SHARPEN = 16.0  # q and k scaled by this: attention logits x 256, far from uniform
# Probe vs output_attentions of the same eager model: identical q and k, only the order of
# float operations differs. SDPA vs eager: the hidden states themselves differ by fp32
# rounding, amplified by the sharpened attention through 8 layers.
EXACT = dict(atol=1e-6, rtol=1e-6)
FP32 = dict(atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- fixtures
def sharpen(path: Path) -> None:
    """Rewrites the checkpoint at ``path`` with its LLM's q_proj / k_proj weights scaled by SHARPEN."""
    model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(SHARPEN)
            layer.self_attn.k_proj.weight.mul_(SHARPEN)
    model.save_pretrained(path)


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` textured RGB PNGs of different sizes (8-px colour blocks), so patches differ."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        height, width = 80 + 16 * i, 96 + 8 * (i % 2)
        blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((8, 8, 1), np.uint8))[:height, :width]
        paths.append(folder / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def write_data(path: Path, images: list[Path]) -> Path:
    records = [
        {
            "id": f"s{i}",
            "image": f"{image.parent.name}/{image.name}",  # relative to the data file's folder
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        }
        for i, (image, (question, answer)) in enumerate(zip(images, QA))
    ]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A sharpened tiny LLaVA checkpoint, a VIF adapter saved for it, PNGs and a LLaVA-format file."""
    root = tmp_path_factory.mktemp("diag_llava")
    model_dir = build_tiny_llava(root / "model", WORDS)
    sharpen(model_dir)
    images = write_images(root / "images", len(QA))
    data = write_data(root / "data.json", images)
    model, _ = load_model(model_dir, "cpu", "float32", "sdpa")
    torch.manual_seed(0)
    vmodel = vif.attach(model, vif.VIFConfig.preset("compact", model))
    adapter = vmodel.save_pretrained(root / "adapter")
    vmodel.detach()
    return {"root": root, "model": model_dir, "adapter": adapter, "data": data, "images": root}


def load_pair(model_dir: Path, adapter: Path | None = None):
    """The checkpoint on SDPA and on eager attention (+ the same VIF adapter on both)."""
    fast, processor = load_model(model_dir, "cpu", "float32", "sdpa", adapter=adapter)
    slow, _ = load_model(model_dir, "cpu", "float32", "eager", adapter=adapter)
    return fast, slow, processor


def run(model, processor, data, images, route, rows, batch_size=3, **kwargs):
    batches = iter_batches(str(data), processor, images, batch_size)
    return collect(model, batches, rows=rows, route=route, progress=False, **kwargs)


def assert_same(fast, slow, tol):
    """Two collections hold the same records and summaries (within ``tol``)."""
    assert len(fast.records) == len(slow.records) > 0
    for a, b in zip(fast.records, slow.records):
        assert a.n_rows == b.n_rows and a.grids == b.grids
        np.testing.assert_allclose(a.visual, b.visual, **tol)
        assert a.importance.keys() == b.importance.keys()
        for d in a.importance:
            np.testing.assert_allclose(a.importance[d], b.importance[d], **tol)
    sa, sb = summarise(fast), summarise(slow)
    for ra, rb in zip(sa["per_layer"], sb["per_layer"]):
        assert ra["layer"] == rb["layer"]
        for key in ("ratio", "entropy", "ratio_std"):
            assert ra[key] == pytest.approx(rb[key], abs=tol["atol"] * 10, rel=tol["rtol"]), (
                ra["layer"],
                key,
            )
        assert ra["quantiles"].keys() == rb["quantiles"].keys()
        for q in ra["quantiles"]:
            assert ra["quantiles"][q] == pytest.approx(rb["quantiles"][q], abs=tol["atol"], rel=tol["rtol"])
    assert sa["deep_entropy"] == pytest.approx(sb["deep_entropy"], abs=tol["atol"] * 10)
    return sa


# --------------------------------------------------------------------------- row selection
def test_select_rows_answer_last_auto():
    # sample 0: left-padded, image at 2..4, answer at 7..8; sample 1: no answer tokens.
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    image = torch.zeros(2, 9, dtype=torch.bool)
    image[0, 2:5] = image[1, 1:4] = True
    labels = torch.full((2, 9), -100)
    labels[0, 7:9] = 5
    answer = select_rows(mask, image, labels, "auto")
    assert answer.positions[0, : answer.counts[0]].tolist() == [7, 8]
    assert answer.positions[1, : answer.counts[1]].tolist() == [8]  # no answer: last prompt token
    last = select_rows(mask, image, labels, "last")
    assert last.counts.tolist() == [1, 1]
    assert last.positions[:, 0].tolist() == [6, 8]  # the token before the first answer token
    with pytest.raises(ValueError, match="no 'answer' row"):
        select_rows(mask, image, labels, "answer")  # sample 1 has no answer
    with pytest.raises(ValueError, match="needs labels"):
        select_rows(mask, image, None, "answer")


def test_generated_rows_stop_at_the_first_eos():
    new_tokens = torch.tensor([[5, 3, 0, 0], [5, 6, 7, 8], [3, 9, 3, 0]])
    assert _generated_lengths(new_tokens, {3}).tolist() == [2, 4, 1]  # the EOS row is included
    assert _generated_lengths(new_tokens, {3, 7}).tolist() == [2, 3, 1]


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("rows", ["answer", "last", "generated"])
def test_probe_equals_eager_output_attentions(llava, rows):
    fast, slow, processor = load_pair(llava["model"])
    kwargs = dict(max_new_tokens=3, tokenizer=processor.tokenizer)
    a = run(fast, processor, llava["data"], llava["images"], "probe", rows, **kwargs)
    b = run(slow, processor, llava["data"], llava["images"], "attentions", rows, **kwargs)
    c = run(slow, processor, llava["data"], llava["images"], "probe", rows, **kwargs)
    assert_same(c, b, EXACT)  # the probe's math, on identical queries and keys
    summary = assert_same(a, b, FP32)  # the fast path on SDPA
    # Attention is far from uniform and on the image (the test can tell rows and columns apart).
    assert summary["deep_entropy"] < summary["max_entropy"] - 0.5
    n_answer = [len(processor.tokenizer(ans, add_special_tokens=False).input_ids) + 1 for _, ans in QA]
    counts = [r.n_rows for r in a.records]
    if rows == "answer":
        assert counts == n_answer  # the answer's words + the closing </s>
    elif rows == "last":
        assert counts == [1] * len(QA)
    else:
        assert all(1 <= c <= 3 for c in counts)
        assert all(r.meta["generated"] is not None for r in a.records)
    # The model was switched to the probe's backend only inside collect.
    assert fast.config.text_config._attn_implementation == "sdpa"
    assert not any(hasattr(m, PROBE_ATTRIBUTE) for m in fast.modules())


def test_probe_leaves_the_model_outputs_bit_identical(llava):
    model, processor = load_model(llava["model"], "cpu", "float32", "sdpa")
    batch, _ = next(iter_batches(str(llava["data"]), processor, llava["root"], 3))
    layout = get_backbone(model).vision_layout(batch)
    selection = select_rows(batch["attention_mask"], layout.token_mask(), batch["labels"], "answer")
    probe = AttentionProbe()
    with torch.no_grad():
        plain = model(**batch).logits
        with probing(model, probe):
            probe.expect(layout, selection)
            probed = model(**batch).logits
    assert torch.equal(plain, probed)
    assert sorted(probe.sums) == list(range(8))  # and the probe did see every layer


@pytest.mark.parametrize(
    "rows, injection", [("auto", "fused"), ("auto", "materialised"), ("generated", "fused")]
)
def test_probe_equals_eager_output_attentions_with_vif(llava, rows, injection):
    fast, slow, processor = load_pair(llava["model"], llava["adapter"])
    fast.config_vif.injection = injection
    a = run(fast, processor, llava["data"], llava["images"], "probe", rows, max_new_tokens=3)
    b = run(slow, processor, llava["data"], llava["images"], "attentions", rows, max_new_tokens=3)
    if injection == "fused":  # an eager base always injects materialised: one check covers both
        c = run(slow, processor, llava["data"], llava["images"], "probe", rows, max_new_tokens=3)
        assert_same(c, b, EXACT)
    summary = assert_same(a, b, FP32)
    inject = fast.config_vif.inject_layers
    assert a.injection_layers == inject and summary["vif"]["injection_layers"] == inject
    for record in a.records:
        assert sorted(record.importance) == sorted(inject)
        for pi in record.importance.values():
            assert pi.shape == (64,) and pi.sum() == pytest.approx(1.0, abs=1e-5)
    if rows == "generated":
        return  # VIF changes the generated tokens, so the rows differ from the base model's
    # Against the same model with VIF disabled: identical before the first injection
    # layer, different in every injected layer (the rows reflect the injected flow).
    with fast.disabled():
        base = run(fast, processor, llava["data"], llava["images"], "probe", rows)
    assert base.injection_layers == [] and not base.records[0].importance
    for with_vif, without in zip(a.records, base.records):
        for pos, layer in enumerate(a.layers):
            if layer < min(inject):
                np.testing.assert_allclose(with_vif.visual[pos], without.visual[pos], **EXACT)
            elif layer in inject:
                assert not np.allclose(with_vif.visual[pos], without.visual[pos], atol=1e-4), layer


def test_injected_rows_mix_in_the_map_exactly(llava):
    """In an injected layer A' = ((1-a) A + a pi) / ((1-a) + a m): on the image, per row."""
    fast, processor = load_model(llava["model"], "cpu", "float32", "sdpa", adapter=llava["adapter"])
    fast.config_vif.alpha = 1.0  # A' on the image is then exactly pi (every chosen row sees the image)
    col = run(
        fast,
        processor,
        llava["data"],
        llava["images"],
        "probe",
        "answer",
        layers=fast.config_vif.inject_layers,
    )
    for record in col.records:
        for pos, layer in enumerate(col.layers):
            np.testing.assert_allclose(record.visual[pos], record.importance[layer], atol=1e-6)


# --------------------------------------------------------------------------- Qwen2.5-VL
qwen_backbone = Path(__file__).resolve().parents[1] / "src/vif/backbones/qwen2_vl.py"


@pytest.mark.skipif(not qwen_backbone.exists(), reason="the Qwen2-VL backbone adapter has not landed")
def test_probe_equals_eager_output_attentions_qwen2_5_vl(tmp_path):
    model_dir = build_tiny_qwen2_5_vl(tmp_path / "qwen", WORDS)
    sharpen(model_dir)
    images = write_images(tmp_path / "images", len(QA))
    data = write_data(tmp_path / "data.json", images)
    fast, slow, processor = load_pair(model_dir)
    for rows in ("answer", "generated"):  # generated: M-RoPE decoding with the KV cache
        a = run(fast, processor, data, tmp_path, "probe", rows, max_new_tokens=3)
        b = run(slow, processor, data, tmp_path, "attentions", rows, max_new_tokens=3)
        assert_same(a, b, FP32)
    assert len({r.visual.shape[1] for r in a.records}) > 1  # the images have different grids
    assert a.records[0].images[0].shape[:2] == (  # pictures recovered from Qwen's patch rows
        14 * 2 * a.records[0].grids[0][0],
        14 * 2 * a.records[0].grids[0][1],
    )
    torch.manual_seed(0)
    adapter = vif.attach(fast, vif.VIFConfig.preset("compact", fast)).save_pretrained(tmp_path / "adapter")
    fast, slow, processor = load_pair(model_dir, adapter)
    a = run(fast, processor, data, tmp_path, "probe", "auto")
    b = run(slow, processor, data, tmp_path, "attentions", "auto")
    assert_same(a, b, FP32)


# --------------------------------------------------------------------------- API, inputs, errors
def test_diagnose_pil_samples_and_outputs(llava, tmp_path):
    model, processor = load_model(llava["model"], "cpu", "float32", "sdpa")
    pictures = [Image.open(p).convert("RGB") for p in sorted((llava["root"] / "images").glob("*.png"))]
    samples = [(pictures[0], QA[0][0], QA[0][1]), (pictures[1], QA[1][0])]  # with and without answer
    summary = vif.diagnose(model, samples, tmp_path / "out", processor=processor, progress=False)
    assert summary["n_samples"] == 2 and summary["vif"] is None
    n_answer = len(processor.tokenizer(QA[0][1], add_special_tokens=False).input_ids) + 1  # + </s>
    assert summary["mean_rows_per_sample"] == pytest.approx((n_answer + 1) / 2)  # answer; last token
    for name in ("summary.json", "attention_ratio.png", "attention_violin.png", "entropy.png", "index.html"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert len(list((tmp_path / "out" / "heatmaps").glob("*.png"))) == 2


def test_text_only_and_two_image_samples(llava, tmp_path):
    records = json.loads(llava["data"].read_text())[:2]
    records.insert(
        1,
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes"}],
        },
    )
    two = {"id": "two", "image": ["images/img2.png", "images/img3.png"]}
    two["conversations"] = [
        {"from": "human", "value": "<image>\n<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A red square."},
    ]
    records.append(two)
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    model, processor = load_model(llava["model"], "cpu", "float32", "sdpa")
    summary = diagnose(
        model,
        str(data),
        tmp_path / "out",
        processor=processor,
        image_folder=llava["root"],
        heatmap_layers=[7],
        progress=False,
    )
    assert summary["n_samples"] == 3 and summary["n_skipped_without_image"] == 1
    assert summary["n_image_tokens"] == {"min": 64, "max": 128, "mean": pytest.approx(256 / 3)}
    heatmaps = sorted(p.name for p in (tmp_path / "out" / "heatmaps").glob("*.png"))
    assert heatmaps == [f"sample{s:03d}_image{j}.png" for s, j in [(0, 0), (1, 0), (2, 0), (2, 1)]]
    # The probe on this mixed batch (a text-only row, a two-image row) equals eager output_attentions.
    eager, _ = load_model(llava["model"], "cpu", "float32", "eager")
    a = run(model, processor, data, llava["root"], "probe", "auto", batch_size=4)
    b = run(eager, processor, data, llava["root"], "attentions", "auto", batch_size=4)
    assert_same(a, b, FP32)
    text_only = tmp_path / "text.json"
    text_only.write_text(json.dumps(records[1:2]))
    with pytest.raises(ValueError, match="no sample with an image"):
        diagnose(model, str(text_only), tmp_path / "out2", processor=processor, progress=False)


def test_errors_name_the_fix(llava, tmp_path, capsys):
    model, processor = load_model(llava["model"], "cpu", "float32", "sdpa")
    data = str(llava["data"])
    with pytest.raises(ValueError, match="needs eager attention"):
        diagnose(model, data, tmp_path, route="attentions", processor=processor, progress=False)
    with pytest.raises(ValueError, match="needs the model's processor"):
        diagnose(model, data, tmp_path, progress=False)
    with pytest.raises(ValueError, match="layers must be within 0..7"):
        diagnose(model, data, tmp_path, layers=[8], processor=processor, progress=False)
    with pytest.raises(ValueError, match="needs the base model"):
        compare(None, llava["adapter"], data, tmp_path, processor=processor, progress=False)
    with pytest.raises(vif.VIFLoadError, match="holds no vif_config.json"):  # before any sample is run
        compare(model, tmp_path, data, tmp_path, processor=processor, progress=False)
    assert not getattr(model, "_vif_attached", False)
    from vif.cli import main

    assert main(["diagnose", "--model", str(llava["model"]), "--data", data, "--compare", str(tmp_path)]) == 2
    assert "holds no vif_config.json" in capsys.readouterr().err
    assert main(["diagnose", "--model", str(llava["model"]), "--data", str(tmp_path / "missing.json")]) == 2
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rows must be one of"):
        diagnose(model, data, tmp_path, rows="first", processor=processor, progress=False)


# --------------------------------------------------------------------------- CLI end to end
@pytest.mark.slow
def test_cli_compare_end_to_end(llava, tmp_path, capsys):
    from vif.cli import main

    out = tmp_path / "cmp"
    argv = ["diagnose", "--model", str(llava["model"]), "--data", str(llava["data"])]
    argv += [
        "--compare",
        str(llava["adapter"]),
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--n-heatmaps",
        "2",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "deep-layer entropy" in printed and "index.html" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"base", "vif", "difference"}
    base, with_vif = summary["base"], summary["vif"]
    assert base["vif"] is None and with_vif["vif"]["injection_layers"]
    for run_summary in (base, with_vif):
        assert run_summary["n_samples"] == len(QA) and run_summary["layers"] == list(range(8))
        assert run_summary["max_entropy"] == pytest.approx(np.log(64))
        for row in run_summary["per_layer"]:
            assert set(row) == {"layer", "ratio", "ratio_std", "entropy", "entropy_std", "quantiles"}
            assert 0 < row["ratio"] <= 1 and 0 < row["entropy"] <= np.log(64) + 1e-9
    assert summary["difference"]["deep_entropy"] == pytest.approx(
        with_vif["deep_entropy"] - base["deep_entropy"]
    )

    figures = ["attention_ratio.png", "attention_violin.png", "entropy.png"]
    heatmaps = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert heatmaps == ["sample000_image0.png", "sample001_image0.png"]
    page = (out / "index.html").read_text()
    for name in figures + [f"heatmaps/{h}" for h in heatmaps]:
        assert (out / name).stat().st_size > 5_000
        assert f"src='{name}'" in page
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 100
    assert "summary.json" in page
    values = np.load(out / "attention_values.npz")
    assert "base/layer0" in values and "VIF/layer7" in values

    # --adapter (one model with VIF) on the eager reference route, a subset of layers and samples.
    out = tmp_path / "one"
    argv = ["diagnose", "--model", str(llava["model"]), "--data", str(llava["data"]), "--adapter"]
    argv += [str(llava["adapter"]), "--output-dir", str(out), "--device", "cpu", "--route", "attentions"]
    argv += ["--rows", "last", "--layers", "2,7", "--max-samples", "2", "--n-heatmaps", "1"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label"] == "VIF" and summary["route"] == "attentions" and summary["rows"] == "last"
    assert summary["layers"] == [2, 7] and summary["n_samples"] == 2 and summary["deep_layers"] == [7]
    assert summary["vif"]["injection_layers"] == with_vif["vif"]["injection_layers"]

    # Only shallow layers: no deep-layer numbers, said so instead of failing.
    argv = ["diagnose", "--model", str(llava["model"]), "--data", str(llava["data"]), "--layers", "0,1"]
    argv += [
        "--output-dir",
        str(tmp_path / "shallow"),
        "--device",
        "cpu",
        "--max-samples",
        "1",
        "--n-heatmaps",
        "0",
    ]
    assert main(argv) == 0
    assert "deep-layer entropy n/a" in capsys.readouterr().out
    assert json.loads((tmp_path / "shallow" / "summary.json").read_text())["deep_entropy"] is None


def test_compare_python_api_with_a_vif_model(llava, tmp_path):
    model, processor = load_model(llava["model"], "cpu", "float32", "sdpa", adapter=llava["adapter"])
    result = compare(
        None, model, str(llava["data"]), tmp_path, processor=processor, n_heatmaps=1, progress=False
    )
    assert result["base"]["label"] == "base" and result["vif"]["label"] == "VIF"
    assert model._runtime.enabled  # re-enabled after the base run
    assert not np.isclose(result["difference"]["deep_entropy"], 0.0)
