"""VIFModel on a tiny LLaVA: exactness, plug-and-play, generation, save/load, errors."""

import copy

import pytest
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

import vif
from vif.testing import llava_batch, tiny_llava

# One sample with one image, a text-only sample, a sample with two images.
MIXED = [(1, 3, 6), (0, 5, 7), (2, 2, 4)]


def paper(model, **overrides):
    return vif.VIFConfig.preset("paper", model, **overrides)


def hooks_of(model):
    found = []
    for module in model.modules():
        found += list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return found


def real(batch):
    return batch["attention_mask"].bool()


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("inject_rows", ["text", "all"])  # "all": Full-Seq, rows inside the images too
def test_fused_equals_materialised_logits_and_gradients(padding_side, inject_rows):
    model = tiny_llava()
    batch = llava_batch(model, MIXED, padding_side=padding_side, with_labels=True)
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
    with torch.no_grad():  # without autograd the fused blend runs in place, from its first changed row
        vmodel.config_vif.injection = "fused"
        torch.manual_seed(0)
        assert torch.allclose(vmodel(**batch).logits[real(batch)], lm[real(batch)], atol=1e-5)


def test_vif_changes_samples_with_images_only():
    model = tiny_llava()
    batch = llava_batch(model, MIXED)
    with torch.no_grad():
        base = model(**batch).logits
        vmodel = vif.attach(model, paper(model))
        out = vmodel(**batch)
    mask = real(batch)
    assert not torch.allclose(out.logits[0][mask[0]], base[0][mask[0]])
    assert torch.equal(out.logits[1][mask[1]], base[1][mask[1]])  # text-only passes through
    for layer, pi in out.vif.importance.items():
        assert layer in vmodel.config_vif.inject_layers
        assert pi.shape == (3, 2 * 16)  # 2 images x 4 x 4 tokens at most
        assert torch.allclose(pi.sum(-1), torch.tensor([1.0, 0.0, 1.0]))
        assert torch.equal(pi[0, 16:], torch.zeros(16))  # past sample 0's own tokens


def test_alpha_zero_disabled_and_detach_are_exactly_the_base_model():
    model = tiny_llava()
    batch = llava_batch(model, MIXED, with_labels=True)
    with torch.no_grad():
        base = model(**batch)
    hooks_before = hooks_of(model)  # transformers' own output-capturing hooks, installed on first call
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
    assert disabled.vif.importance == {}
    detached = vmodel.detach()
    assert detached is model
    assert hooks_of(model) == hooks_before
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_vif_plan_source") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base.logits)
    vif.attach(model, paper(model))  # and it can be attached again


def test_generate_cache_and_no_cache_and_batch_vs_single():
    model = tiny_llava()
    batch = llava_batch(model, MIXED, padding_side="left")
    vmodel = vif.attach(model, paper(model))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = vmodel.generate(**batch, use_cache=True, **kwargs)
    uncached = vmodel.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    first_image = 0
    for i, (n_images, _, _) in enumerate(MIXED):
        length = int(batch["attention_mask"][i].sum())
        single = {
            "input_ids": batch["input_ids"][i : i + 1, -length:],
            "attention_mask": batch["attention_mask"][i : i + 1, -length:],
        }
        if n_images:
            single["pixel_values"] = batch["pixel_values"][first_image : first_image + n_images]
        first_image += n_images
        alone = vmodel.generate(**single, **kwargs)
        assert torch.equal(alone[0, -6:], cached[i, -6:]), i


def test_cached_decode_follows_beam_reordering_of_the_cache():
    """Beam search moves cache rows (``reorder_cache``); the prompt's maps and kept image sums move with them."""
    model = tiny_llava()
    batch = llava_batch(model, MIXED, padding_side="left")
    vmodel = vif.attach(model, paper(model))
    order = torch.tensor([2, 0, 1])  # images: sample 0 has image 0, sample 2 images 1 and 2
    reordered = {
        "input_ids": batch["input_ids"][order],
        "attention_mask": batch["attention_mask"][order],
        "pixel_values": batch["pixel_values"][[1, 2, 0]],
    }
    step = torch.tensor([[5], [6], [7]])
    mask = torch.cat([reordered["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        prompt_cache = DynamicCache()
        vmodel(**batch, cache=prompt_cache)
        keys = prompt_cache.layers[0].keys.clone()
        cache = copy.deepcopy(prompt_cache)  # a reused prompt cache: the copy carries VIF's tag
        cache.reorder_cache(order)
        assert torch.equal(prompt_cache.layers[0].keys, keys)  # the copy reorders itself only
        moved = vmodel(input_ids=step, attention_mask=mask, cache=cache).logits[:, -1]
        fresh = DynamicCache()
        vmodel(**reordered, cache=fresh)
        reference = vmodel(input_ids=step, attention_mask=mask, cache=fresh).logits[:, -1]
    assert torch.allclose(moved, reference, atol=1e-5)


def test_caches_vif_cannot_trust_are_refused():
    model = tiny_llava()
    batch = llava_batch(model, MIXED[:1])
    vmodel = vif.attach(model, paper(model))
    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=4) for _ in range(8)]
    offloaded = DynamicCache(offloading=True)
    plain = Cache(layers=[DynamicLayer() for _ in range(8)])
    with torch.no_grad():
        for cache, message in (
            (sliding, "DynamicSlidingWindowLayer"),
            (offloaded, "offloaded"),
            (plain, "got a Cache"),
        ):
            with pytest.raises(vif.BackboneError, match=message):
                vmodel(**batch, cache=cache)
        cache = DynamicCache()
        vmodel(**batch, cache=cache)
        with pytest.raises(vif.BackboneError, match="batch size 2"):
            vmodel(input_ids=torch.tensor([[5], [5]]), cache=cache)
        cache.crop(-5)  # into the prompt: the kept image sums no longer describe the cache
        with pytest.raises(vif.BackboneError, match="cropped into the prompt"):
            vmodel(input_ids=torch.tensor([[5]]), cache=cache)
        other = DynamicCache()
        vmodel(**batch, cache=other)  # a new prompt: `cache` holds an older one
        with pytest.raises(vif.BackboneError, match="different KV cache"):
            vmodel(input_ids=torch.tensor([[5]]), cache=cache)


def test_inject_decode_option_changes_only_generated_rows():
    model = tiny_llava()
    batch = llava_batch(model, MIXED[:1])
    vmodel = vif.attach(model, paper(model))
    kwargs = dict(
        max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    with_decode = vmodel.generate(**batch, **kwargs)
    vmodel.config_vif.inject_decode = False
    prefill_only = vmodel.generate(**batch, **kwargs)
    # The first new token comes from the prompt's last row: identical either way.
    assert torch.equal(with_decode.logits[0], prefill_only.logits[0])
    assert not torch.allclose(with_decode.logits[-1], prefill_only.logits[-1])


def test_save_and_load_reproduce_logits(tmp_path):
    model = tiny_llava()
    batch = llava_batch(model, MIXED)
    vmodel = vif.attach(model, paper(model))
    with torch.no_grad():
        before = vmodel(**batch).logits
    vmodel.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "vif_config.json",
        "vif_module.safetensors",
    ]
    vmodel.detach()
    loaded = vif.VIFModel.from_pretrained(tiny_llava(), tmp_path / "adapter")
    with torch.no_grad():
        after = loaded(**batch).logits
    assert torch.equal(before, after)


def test_load_refuses_a_different_backbone(tmp_path):
    vmodel = vif.attach(tiny_llava(), paper(tiny_llava()))
    vmodel.save_pretrained(tmp_path / "adapter")
    with pytest.raises(vif.VIFLoadError, match="hidden_size=64.*hidden_size=96"):
        vif.VIFModel.from_pretrained(tiny_llava(hidden_size=96), tmp_path / "adapter")
    with pytest.raises(vif.VIFLoadError, match="num_hidden_layers"):
        vif.VIFModel.from_pretrained(tiny_llava(num_layers=10), tmp_path / "adapter")
    with pytest.raises(vif.VIFLoadError, match="does not exist"):
        vif.VIFModel.from_pretrained(tiny_llava(), tmp_path / "nowhere")


def test_posterior_only_in_training_with_labels_and_deterministic_inference():
    model = tiny_llava()
    batch = llava_batch(model, MIXED, with_labels=True)
    vmodel = vif.attach(model, paper(model))
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        a, b = vmodel(**batch), vmodel(**batch)
        c, c2 = vmodel(**unlabelled), vmodel(**unlabelled)
    assert not a.vif.used_posterior and a.vif.kl is not None  # KL reported, prior used
    assert torch.equal(a.logits, b.logits) and torch.equal(c.logits, c2.logits)  # z = mu_prior
    assert c.vif.kl is None
    vmodel.train()
    out = vmodel(**batch)
    assert out.vif.used_posterior
    cfg = vmodel.config_vif
    expected = out.vif.lm_loss + cfg.kl_weight * out.vif.kl + cfg.sparsity_weight * out.vif.sparsity
    assert torch.allclose(out.loss, expected)
    assert out.vif.kl > 0 and out.vif.sparsity > 0 and out.vif.lm_loss > 0
    vmodel.eval()
    vmodel.config_vif.sample_at_inference = True
    with torch.no_grad():
        d, e = vmodel(**unlabelled), vmodel(**unlabelled)
    assert not torch.equal(d.logits, e.logits)


def test_eager_base_returns_injected_attention():
    model = tiny_llava(attn_implementation="eager")
    batch = llava_batch(model, MIXED[:1])
    vmodel = vif.attach(model, paper(model, alpha=0.5))
    with torch.no_grad():
        out = vmodel(**batch, output_attentions=True)
        with vmodel.disabled():
            base = vmodel(**batch, output_attentions=True)
    # The first injected layer sees the same inputs with and without VIF, so its A' must be
    # exactly the spec's formula applied to the base A.
    layer = min(vmodel.config_vif.inject_layers)
    injected, plain = out.attentions[layer][0], base.attentions[layer][0]  # (H, L, L)
    image = batch["input_ids"][0] == 3
    pi = torch.zeros(image.shape[0])
    pi[image] = out.vif.importance[layer][0, : int(image.sum())]
    text_rows = (~image).nonzero().squeeze(-1)
    after_image = text_rows[text_rows > image.nonzero().max()]
    expected = (0.5 * plain[:, after_image] + 0.5 * pi) / (0.5 + 0.5 * 1.0)
    assert torch.allclose(injected[:, after_image], expected, atol=1e-6)
    before_image = text_rows[text_rows < image.nonzero().min()]
    assert torch.allclose(injected[:, before_image], plain[:, before_image], atol=1e-6)
    assert torch.allclose(injected[:, image], plain[:, image], atol=1e-6)  # vision rows untouched
    assert torch.allclose(injected.sum(-1), torch.ones(injected.shape[:2]), atol=1e-6)


def test_lora_and_gradient_checkpointing_keep_vif_working():
    from peft import LoraConfig, get_peft_model

    model = tiny_llava()
    batch = llava_batch(model, MIXED, with_labels=True)
    vmodel = vif.attach(model, paper(model)).train()
    model.gradient_checkpointing_enable()
    torch.manual_seed(0)
    checkpointed = vmodel(**batch)
    checkpointed.loss.backward()
    grad_ckpt = vmodel.vif_module.slots.grad.clone()
    model.gradient_checkpointing_disable()
    vmodel.zero_grad()
    torch.manual_seed(0)
    plain = vmodel(**batch)
    plain.loss.backward()
    assert torch.allclose(checkpointed.loss, plain.loss, atol=1e-6)
    assert torch.allclose(grad_ckpt, vmodel.vif_module.slots.grad, atol=1e-6)

    lora = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, lora)
    out = vmodel(**batch)
    assert out.vif.importance and out.loss.requires_grad
    assert peft_model is not None


# ---------------------------------------------------------------------- errors
def test_config_errors_against_the_backbone():
    model = tiny_llava()  # 8 layers
    with pytest.raises(vif.VIFConfigError, match=r"out of range .* 8 decoder layers"):
        vif.attach(model, paper(model, extract_layers=[2], inject_layers=[9]))
    with pytest.raises(vif.VIFConfigError, match="hidden size is 64"):
        vif.attach(model, paper(model, hidden_size=32))


def test_unknown_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(
        vif.BackboneError, match="LlamaForCausalLM .*'llama'.* is not a vision-language model"
    ):
        vif.attach(llm, vif.VIFConfig(hidden_size=32, extract_layers=[0], inject_layers=[1]))


def test_image_token_count_mismatch_is_refused():
    model = tiny_llava()
    vmodel = vif.attach(model, paper(model))
    batch = llava_batch(model, MIXED[:1])
    batch["input_ids"][0, -1] = 3  # one extra image token
    with pytest.raises(vif.BackboneError, match="not a multiple of the 16 tokens"):
        vmodel(**batch)
    batch = llava_batch(model, MIXED[:1])
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(vif.BackboneError, match="pixel_values has 2 images"):
        vmodel(**batch)


def test_inputs_embeds_and_double_attach_and_flash_are_refused():
    model = tiny_llava()
    vmodel = vif.attach(model, paper(model))
    embeds = torch.randn(1, 5, 64)
    with pytest.raises(vif.BackboneError, match="input_ids"):
        vmodel(inputs_embeds=embeds)
    with pytest.raises(vif.VIFConfigError, match="already has VIF attached"):
        vif.attach(model, paper(model))
    other = tiny_llava()
    other.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(vif.VIFConfigError, match="attn_implementation='sdpa'"):
        vif.attach(other, paper(other))


def test_two_models_in_one_process_do_not_share_state():
    a, b = tiny_llava(seed=0), tiny_llava(seed=0)
    batch = llava_batch(a, MIXED)
    va = vif.attach(a, paper(a))
    torch.manual_seed(1)
    vb = vif.attach(b, paper(b, alpha=0.0))
    with torch.no_grad():
        out_a = va(**batch)
        out_b = vb(**batch)
        again_a = va(**batch)
        plain = tiny_llava(seed=0)(**batch)
    assert torch.equal(out_a.logits, again_a.logits)
    assert torch.equal(out_b.logits, plain.logits)


def test_attach_to_a_model_on_the_meta_device_keeps_the_module_there():
    """Counting parameters at 7B sizes builds the model on the meta device (benchmarks/memory_table.py)."""
    from transformers import LlavaForConditionalGeneration

    from vif.testing import tiny_llava_config

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(tiny_llava_config())
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    config = vif.VIFConfig.preset("compact", model, extract_layers=[1], inject_layers=[3])
    vmodel = vif.attach(model, config)
    assert {p.device.type for p in vmodel.vif_module.parameters()} == {"meta"}
