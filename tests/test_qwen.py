"""VIF on Qwen2.5-VL and Qwen2-VL: dynamic per-image grids, several images per sample, M-RoPE.

The core equivalence suite of tests/test_model.py, on tiny random Qwen models built from
configs (real transformers classes), with batches built as the processor lays them out:
sample 0 holds two images of different non-square grids (2 x 3 and 3 x 2 tokens), sample 1
is text only, sample 2 holds one 2 x 2 image, and ``mm_token_type_ids`` gives the image
tokens their 2-D M-RoPE positions.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

import vif
from vif.backbones import get_backbone
from vif.gmm import Mixture, grid_coordinates, render
from vif.loading import load_model
from vif.testing import (
    QWEN_FAMILIES,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    qwen_batch,
    qwen_sample,
    tiny_qwen,
)
from vif.tiny import build_tiny_qwen2_5_vl
from vif.training import load_recipe, train

REPO = Path(__file__).resolve().parents[1]

MIXED = [([(2, 3), (3, 2)], 3, 6), ([], 5, 7), ([(2, 2)], 2, 4)]
family = pytest.mark.parametrize("family", QWEN_FAMILIES)


def paper(model, **overrides):
    return vif.VIFConfig.preset("paper", model, **overrides)


def hooks_of(model):
    found = []
    for module in model.modules():
        found += list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return found


def real(batch):
    return batch["attention_mask"].bool()


def without(batch, *keys):
    return {k: v for k, v in batch.items() if k not in keys}


# ---------------------------------------------------------------------- exactness
@family
@pytest.mark.parametrize("inject_rows", ["text", "all"])  # sample 0's text between its images; Full-Seq
def test_fused_equals_materialised_and_eager_logits_and_gradients(family, inject_rows):
    model = tiny_qwen(family)
    batch = qwen_batch(model, MIXED, with_labels=True)
    vmodel = vif.attach(model, paper(model, inject_rows=inject_rows)).train()
    results = {}
    for path in ("fused", "materialised"):
        vmodel.config_vif.injection = path
        vmodel.zero_grad()
        torch.manual_seed(0)  # training samples the posterior: same eps for both paths
        out = vmodel(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in vmodel.named_parameters() if p.grad is not None}
        results[path] = (out.logits.detach(), out.loss.detach(), grads)
    (lf, loss_f, gf), (lm, loss_m, gm) = results["fused"], results["materialised"]
    assert torch.allclose(lf[real(batch)], lm[real(batch)], atol=1e-5)
    assert torch.allclose(loss_f, loss_m, atol=1e-6)
    assert gf.keys() == gm.keys()
    assert any(n.startswith("vif_module.") for n in gf) and any("language_model" in n for n in gf)
    for name in gf:
        assert torch.allclose(gf[name], gm[name], atol=1e-5, rtol=1e-4), name

    # The same weights on an eager base take the materialised path and return A'.
    eager = tiny_qwen(family, attn_implementation="eager")
    veager = vif.attach(eager, paper(eager, inject_rows=inject_rows)).train()
    veager.vif_module.load_state_dict(vmodel.vif_module.state_dict())
    torch.manual_seed(0)
    out = veager(**batch, output_attentions=True)
    assert torch.allclose(out.logits.detach()[real(batch)], lf[real(batch)], atol=1e-5)
    rows = out.attentions[max(veager.config_vif.inject_layers)].sum(-1).transpose(1, 2)  # (B, L, H)
    assert torch.allclose(rows[real(batch)], torch.tensor(1.0), atol=1e-6)


@family
def test_importance_covers_each_samples_own_images(family):
    model = tiny_qwen(family)
    batch = qwen_batch(model, MIXED)
    with torch.no_grad():
        base = model(**batch).logits
        vmodel = vif.attach(model, paper(model))
        out = vmodel(**batch)
    mask = real(batch)
    assert not torch.allclose(out.logits[0][mask[0]], base[0][mask[0]])
    assert torch.equal(out.logits[1][mask[1]], base[1][mask[1]])  # text-only passes through
    assert vmodel._runtime.layout.grids == [[(2, 3), (3, 2)], [], [(2, 2)]]
    for pi in out.vif.importance.values():
        assert pi.shape == (3, 12)  # sample 0: 6 + 6 tokens
        assert torch.allclose(pi.sum(-1), torch.tensor([1.0, 0.0, 1.0]))
        assert torch.equal(pi[2, 4:], torch.zeros(8))  # past sample 2's own 4 tokens


@family
def test_alpha_zero_disabled_and_detach_are_exactly_the_base_model(family):
    model = tiny_qwen(family)
    batch = qwen_batch(model, MIXED, with_labels=True)
    with torch.no_grad():
        base = model(**batch)
    hooks_before = hooks_of(model)
    vmodel = vif.attach(model, paper(model, alpha=0.0))
    with torch.no_grad():
        zero = vmodel(**batch)
        vmodel.config_vif.alpha = 0.5
        with vmodel.disabled():
            disabled = vmodel(**batch)
        injected = vmodel(**batch)
    assert torch.equal(zero.logits, base.logits)
    assert torch.equal(disabled.logits, base.logits)
    assert not torch.equal(injected.logits, base.logits)
    detached = vmodel.detach()
    assert detached is model
    assert hooks_of(model) == hooks_before
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_vif_plan_source") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base.logits)


@family
def test_generate_cache_no_cache_batch_vs_single_and_cached_decode(family):
    model = tiny_qwen(family)
    batch = qwen_batch(model, MIXED, padding_side="left")
    vmodel = vif.attach(model, paper(model))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = vmodel.generate(**batch, use_cache=True, **kwargs)
    uncached = vmodel.generate(
        **batch, use_cache=False, output_logits=True, return_dict_in_generate=True, **kwargs
    )
    assert torch.equal(cached, uncached.sequences)
    beams = vmodel.generate(**batch, num_beams=2, **kwargs)  # expands the batch after encoding
    for i in range(len(MIXED)):
        alone = vmodel.generate(**qwen_sample(batch, i, model), **kwargs)
        assert torch.equal(alone[0, -5:], cached[i, -5:]), i
        alone = vmodel.generate(**qwen_sample(batch, i, model), num_beams=2, **kwargs)
        assert torch.equal(alone[0, -5:], beams[i, -5:]), i

    # A hand-driven cached decode step (Qwen's rope deltas from the prefill, VIF's maps from
    # the prompt) equals generate's second step recomputed over the whole sequence.
    single = qwen_sample(batch, 0, model)
    first = cached[0, batch["input_ids"].shape[1]]
    with torch.no_grad():
        prefill = vmodel(**single, use_cache=True)
        step = vmodel(
            input_ids=first.view(1, 1),
            mm_token_type_ids=torch.zeros(1, 1, dtype=torch.long),
            cache=prefill.cache,
        )
    assert torch.allclose(step.logits[0, -1], uncached.logits[1][0], atol=1e-5)


@family
def test_save_and_load_reproduce_logits(family, tmp_path):
    model = tiny_qwen(family)
    batch = qwen_batch(model, MIXED)
    vmodel = vif.attach(model, paper(model))
    with torch.no_grad():
        before = vmodel(**batch).logits
    vmodel.save_pretrained(tmp_path / "adapter")
    vmodel.detach()
    loaded = vif.VIFModel.from_pretrained(tiny_qwen(family), tmp_path / "adapter")
    with torch.no_grad():
        after = loaded(**batch).logits
    assert torch.equal(before, after)
    other = "qwen2_vl" if family == "qwen2_5_vl" else "qwen2_5_vl"
    with pytest.raises(vif.VIFLoadError, match=f"model_type={family}"):
        vif.VIFModel.from_pretrained(tiny_qwen(other), tmp_path / "adapter")


# ---------------------------------------------------------------------- grids and positions
def test_non_square_grid_coordinates_and_peak():
    # A 3 x 5 grid (3 rows, 5 columns): token (r, c) sits at ((c + .5) / 5, (r + .5) / 3).
    coords = grid_coordinates(3, 5)
    assert coords.shape == (15, 2)
    assert torch.allclose(coords[7], torch.tensor([2.5 / 5, 1.5 / 3]))  # row 1, col 2
    assert torch.allclose(coords[14], torch.tensor([4.5 / 5, 2.5 / 3]))

    # Through the model: one narrow Gaussian at (x, y) peaks, in each image, at the token
    # whose patch covers (x, y) of that image, whatever the image's grid.
    model = tiny_qwen()
    batch = qwen_batch(model, [([(3, 5), (4, 2)], 2, 3)])
    vmodel = vif.attach(model, paper(model))
    x, y = 0.7, 0.2
    gmm = vmodel.vif_module.gmm
    with torch.no_grad():
        for layer in (gmm.center, gmm.spread, gmm.logit):
            layer.weight.zero_()
        gmm.center.bias.copy_(torch.logit(torch.tensor([x, y])))
        gmm.spread.bias.fill_(-20.0)  # sigma = min_sigma
        out = vmodel(**batch)
    for pi in out.vif.importance.values():
        assert pi.shape == (1, 15 + 8)
        first, second = pi[0, :15].view(3, 5), pi[0, 15:].view(4, 2)
        assert divmod(int(first.argmax()), 5) == (int(y * 3), int(x * 5))  # (0, 3)
        assert divmod(int(second.argmax()), 2) == (int(y * 4), int(x * 2))  # (0, 1)
    # Importance is shared jointly: one distribution over all the sample's image tokens.
    mixture = Mixture(torch.tensor([[[x, y]]]), torch.tensor([[0.035]]), torch.ones(1, 1))
    coords = torch.cat([grid_coordinates(3, 5), grid_coordinates(4, 2)])[None]
    expected = render(mixture, coords, torch.ones(1, 23, dtype=torch.bool))
    assert torch.allclose(pi, expected, atol=1e-6)


@family
def test_grids_from_generate_positions_equal_grids_from_image_grid_thw(family):
    model = tiny_qwen(family)
    batch = qwen_batch(model, MIXED)
    adapter = get_backbone(model)
    position_ids, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    # generate() passes encoded images and M-RoPE positions instead of pixel_values / image_grid_thw.
    from_thw = adapter.vision_layout(batch)
    from_positions = adapter.vision_layout(
        {**without(batch, "pixel_values", "image_grid_thw"), "position_ids": position_ids}
    )
    assert from_positions.grids == from_thw.grids == [[(2, 3), (3, 2)], [], [(2, 2)]]
    assert torch.equal(from_positions.coords, from_thw.coords)


@family
def test_mrope_is_in_use_and_missing_mm_token_type_ids_is_refused(family):
    model = tiny_qwen(family)
    batch = qwen_batch(model, MIXED[:1])
    vmodel = vif.attach(model, paper(model))
    if family == "qwen2_5_vl":
        # Qwen2.5-VL silently falls back to 1-D positions: M-RoPE changes the outputs.
        with torch.no_grad(), vmodel.disabled():
            assert not torch.allclose(
                vmodel(**batch).logits, vmodel(**without(batch, "mm_token_type_ids")).logits
            )
    with pytest.raises(vif.BackboneError, match="needs mm_token_type_ids"):
        vmodel(**without(batch, "mm_token_type_ids"))
    # generate() builds positions itself (1-D without mm_token_type_ids): refused at prefill.
    with pytest.raises(vif.BackboneError, match="1-D positions.*Pass mm_token_type_ids"):
        vmodel.generate(**without(batch, "mm_token_type_ids"), max_new_tokens=2, pad_token_id=0)
    wrong = {**batch, "mm_token_type_ids": torch.roll(batch["mm_token_type_ids"], 1, dims=1)}
    with pytest.raises(vif.BackboneError, match="does not mark exactly the image tokens"):
        vmodel(**wrong)
    one_d = torch.arange(batch["input_ids"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with pytest.raises(vif.BackboneError, match="1-D positions"):
        vmodel(**without(batch, "mm_token_type_ids"), position_ids=one_d)


# ---------------------------------------------------------------------- diagnostics
@family
def test_diagnostics_probe_equals_eager_attentions_with_vif(family):
    # The diagnostics' rows-only probe (SDPA, fused injection) against eager output_attentions
    # (materialised A') on the same weights, per layer and per image token of each own grid.
    from vif.diagnostics import collect

    batch = qwen_batch(tiny_qwen(family), MIXED, with_labels=True)
    metas = [{"id": str(i)} for i in range(len(MIXED))]
    runs = {}
    for attn, route in (("sdpa", "probe"), ("eager", "attentions")):
        model = tiny_qwen(family, attn_implementation=attn)
        torch.manual_seed(0)
        vmodel = vif.attach(model, paper(model))
        runs[route] = collect(vmodel, [(batch, metas)], rows="answer", route=route, progress=False)
    fast, slow = runs["probe"], runs["attentions"]
    assert len(fast.records) == len(slow.records) == 2 and fast.skipped == 1  # the text-only sample
    assert [r.grids for r in fast.records] == [[(2, 3), (3, 2)], [(2, 2)]]
    for a, b in zip(fast.records, slow.records):
        assert a.visual.shape == b.visual.shape == (8, sum(h * w for h, w in a.grids))
        assert a.importance.keys() == b.importance.keys() == set(vmodel.config_vif.inject_layers)
        torch.testing.assert_close(
            torch.from_numpy(a.visual), torch.from_numpy(b.visual), atol=2e-5, rtol=1e-4
        )


# ---------------------------------------------------------------------- errors
@family
def test_grid_and_token_count_mismatches_are_refused(family):
    model = tiny_qwen(family)
    vmodel = vif.attach(model, paper(model))
    batch = qwen_batch(model, MIXED)
    swapped = {**batch, "image_grid_thw": batch["image_grid_thw"][[0, 2, 1]]}  # 6, 4, 6 tokens
    with pytest.raises(vif.BackboneError, match=r"lengths \[\[6, 6\], \[\], \[4\]\].*need \[6, 4, 6\]"):
        vmodel(**swapped)
    missing = {**batch, "image_grid_thw": batch["image_grid_thw"][:2]}
    with pytest.raises(vif.BackboneError, match="does not match the image tokens"):
        vmodel(**missing)
    odd = {**batch, "image_grid_thw": batch["image_grid_thw"] + torch.tensor([0, 1, 0])}
    with pytest.raises(vif.BackboneError, match="not divisible by the 2 x 2 patch merge"):
        vmodel(**odd)
    frames = {**batch, "image_grid_thw": batch["image_grid_thw"] * torch.tensor([2, 1, 1])}
    with pytest.raises(vif.BackboneError, match="has t=2"):
        vmodel(**frames)
    no_grid = without(batch, "image_grid_thw")
    with pytest.raises(vif.BackboneError, match="image_grid_thw is missing"):
        vmodel(**no_grid)


@family
def test_video_is_refused(family):
    model = tiny_qwen(family)
    vmodel = vif.attach(model, paper(model))
    batch = qwen_batch(model, MIXED[:1])
    video = dict(batch)
    video["input_ids"] = batch["input_ids"].masked_fill(
        batch["input_ids"] == QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID
    )
    video["mm_token_type_ids"] = batch["mm_token_type_ids"] * 2
    video["pixel_values_videos"] = video.pop("pixel_values")
    video["video_grid_thw"] = video.pop("image_grid_thw")
    with pytest.raises(vif.BackboneError, match="does not support video.*disabled"):
        vmodel(**video)
    stray = batch["input_ids"].clone()
    stray[0, 0] = QWEN_VIDEO_TOKEN_ID  # a video placeholder in the text
    with pytest.raises(vif.BackboneError, match="video tokens"):
        vmodel(**{**batch, "input_ids": stray})
    with torch.no_grad(), vmodel.disabled():  # the named fix: the base model runs video as usual
        vmodel(**video)


# ---------------------------------------------------------------------- presets
def test_paper_preset_for_qwen2_5_vl_7b_depth():
    # Qwen2.5-VL-7B's LLM (Qwen2.5-7B): 28 layers, hidden size 3584. Only the config is needed.
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4
        )
    )
    preset = vif.VIFConfig.preset("paper", config)
    assert preset.extract_layers == [9, 11, 13, 15]
    assert preset.inject_layers == [22, 23, 25, 27]
    assert (preset.hidden_size, preset.latent_size, preset.ffn_size) == (3584, 3584, 4 * 3584)
    tiny = tiny_qwen()  # 8 layers
    assert vif.VIFConfig.preset("paper", tiny).inject_layers[-1] == 7


# ---------------------------------------------------------------------- training (shipped recipe)
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "white": (255, 255, 255)}
SIZES = [(84, 56), (56, 84), (112, 56), (56, 56)]  # (width, height): four different grids


def write_qwen_samples(root):
    samples = []
    for i, ((name, rgb), size) in enumerate(zip(COLOURS.items(), SIZES)):
        image = Image.new("RGB", size, (0, 0, 0))
        image.paste(Image.new("RGB", (20, 20), rgb), (4 + 6 * i, 4 + 4 * i))
        image.save(root / f"{name}.png")
        question = {"from": "human", "value": "<image>\nwhat color is the square"}
        samples.append(
            {
                "id": name,
                "image": f"{name}.png",
                "conversations": [question, {"from": "gpt", "value": f"it is {name}"}],
            }
        )
    (root / "data.json").write_text(json.dumps(samples))
    return root / "data.json"


@pytest.mark.slow
def test_shipped_recipe_trains_tiny_qwen2_5_vl_with_llm_only_lora(tmp_path):
    recipe_file = REPO / "recipes/qwen2.5-vl-7b-vif-lora.yaml"
    shipped = load_recipe(recipe_file)
    assert shipped.trainable.mode == "lora" and not shipped.train_projector
    assert (shipped.trainable.lora.r, shipped.trainable.lora.alpha) == (16, 32)
    assert shipped.vif == "large" and shipped.data.image_aspect == "keep"

    model_dir = build_tiny_qwen2_5_vl(
        tmp_path / "model", ["what color is the square", "it is " + " ".join(COLOURS)]
    )
    # LoRA leaves the LM head frozen; a random head of std 0.02 on hidden size 64 caps every logit
    # near +-1.3, so no answer could be memorised. Scale it as a trained head would be.
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    with torch.no_grad():
        base.lm_head.weight.mul_(25.0)
    base.save_pretrained(model_dir)
    data = write_qwen_samples(tmp_path)
    # The shipped recipe as is (LoRA r=16 / alpha=32 on the LLM, paper preset scaled to the tiny
    # depth, activation checkpointing), on the tiny model and data, with a learning rate and a step
    # count for a few-step run.
    overrides = {
        "model": str(model_dir),
        "data.json": str(data),
        "data.image_folder": str(tmp_path),
        "optimizer.lr": 2e-3,
        "optimizer.vif_lr": 3e-3,
        "schedule.max_steps": 16,
        "schedule.per_device_batch_size": 4,
        "schedule.grad_accumulation": 1,
        "schedule.warmup_ratio": 0.0,
        "schedule.scheduler": "constant",
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "save_steps": 1000,
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
    }
    result = train(recipe_file, **overrides)
    lm = [e["lm_loss"] for e in result.log_history if "lm_loss" in e]
    assert len(lm) == 16 and max(lm[-3:]) < 0.7 * lm[0], lm
    assert all("kl" in e and "sparsity" in e for e in result.log_history if "loss" in e)
    counts = result.trainable
    assert counts["vision"] == 0 and counts["projector"] == 0 and counts["language"] > 0 and counts["vif"] > 0
    adapter_config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 32)
    assert "language_model" in adapter_config["target_modules"]  # the LLM-only regex

    # The run loads back (LoRA merged, VIF attached) and answers from the processor's chat template.
    vmodel, processor = load_model(
        result.model_path, device="cpu", dtype="float32", adapter=result.vif_adapter
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the square"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[Image.open(tmp_path / "blue.png")], return_tensors="pt")
    assert "mm_token_type_ids" in inputs
    out = vmodel.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.startswith("it is"), answer
    assert vmodel._runtime.layout.grids == [[(3, 2)]]  # 56 x 84 px: 6 x 4 patches, 3 x 2 tokens
