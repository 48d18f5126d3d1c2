"""`attender="released"` and `init="released"`: the authors' module and how their run started it."""

from __future__ import annotations

import math

import pytest
import torch

import vif
from vif.attender import MultiHeadAttention, ProbabilisticAttender
from vif.config import PAPER_METHOD
from vif.testing import llava_batch, tiny_llava


def module(attender="vif", init="vif", latent=256, **fields) -> ProbabilisticAttender:
    torch.manual_seed(0)
    fields = {**PAPER_METHOD, **fields}  # the released module has none of the project's additions
    config = vif.VIFConfig(
        hidden_size=64, latent_size=latent, ffn_size=2 * latent, num_encoder_layers=2, num_heads=4, **fields
    )
    config.attender, config.init = attender, init
    return ProbabilisticAttender(config)


def test_released_architecture_has_no_context_or_slot_norms():
    ours, released = module("vif").state_dict(), module("released").state_dict()
    extra = {k for k in ours if k not in released}
    # Both blocks normalise the attended text stream; only the first attends back to vision.
    expected = {"slot_norm", *(f"{b}.blocks.{i}.norm_t_ctx" for b in ("prior", "posterior") for i in (0, 1))}
    expected |= {f"{b}.blocks.0.norm_v_ctx" for b in ("prior", "posterior")}
    assert extra == {f"{name}.{p}" for name in expected for p in ("weight", "bias")}
    assert set(released) < set(ours)


def test_released_attender_output_differs_from_ours_with_the_same_weights():
    released = module("released")
    ours = module("vif")
    ours.load_state_dict(released.state_dict(), strict=False)  # the extra norms keep weight 1, bias 0
    vision, text = torch.randn(1, 16, 64), torch.randn(1, 5, 64)
    masks = torch.ones(1, 16, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        a = released.latent(released.prior, vision, text, *masks).mu
        b = ours.latent(ours.prior, vision, text, *masks).mu
    assert not torch.allclose(a, b, atol=1e-3)  # a LayerNorm with unit weight is not the identity


def test_released_init_matches_the_released_run():
    attender = module("released", init="released")
    c = attender.config.latent_size
    attentions = [m for m in attender.modules() if isinstance(m, MultiHeadAttention)]
    qkv = {id(p) for m in attentions for proj in (m.q_proj, m.k_proj, m.v_proj) for p in proj.parameters()}
    bound = math.sqrt(6 / (c + 3 * c))  # xavier_uniform_ over the stacked (3C, C) in_proj_weight
    for m in attentions:
        w = torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight])
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert all(torch.equal(p.bias, torch.zeros_like(p.bias)) for p in (m.q_proj, m.k_proj, m.v_proj))
    for m in attender.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in qkv:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            if m.weight.numel() >= 1000:
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert attender.slots.std().item() == pytest.approx(1.0, rel=0.1)
    # The GMM head's own initialisation is overridden: at z = 0 every centre is the image centre
    # and sigma = softplus(0) + min_sigma.
    mixture = attender.decode(torch.zeros(1, 16, c))
    assert torch.allclose(mixture.centers, torch.full_like(mixture.centers, 0.5))
    assert torch.allclose(mixture.sigmas, torch.full_like(mixture.sigmas, math.log(2) + 0.035))


def test_vif_init_keeps_the_gmm_head_init_and_small_slots():
    attender = module("released", init="vif")
    c = attender.config.latent_size
    assert attender.slots.std().item() == pytest.approx(c**-0.5, rel=0.1)
    assert attender.gmm.center.bias.abs().max() > 0.1 and torch.all(attender.gmm.spread.bias == -2.0)


@pytest.mark.parametrize("attender", ["vif", "released"])
def test_labels_without_any_answer_token(attender):
    """Released: the prior is sampled and KL = 0 (ours: the posterior, with a KL); every parameter trains."""
    model = tiny_llava()
    batch = llava_batch(model, [(1, 3, 6), (1, 1, 6)])  # the second sample is left-padded by 2
    assert batch["attention_mask"][1, :2].sum() == 0
    labels = torch.full_like(batch["input_ids"], -100)
    labels[1, 1] = 5  # a target on padding: the LM loss is finite, yet there is no answer token
    config = vif.VIFConfig.preset("paper", model, attender=attender)
    vmodel = vif.attach(model, config).train()
    out = vmodel(**batch, labels=labels)
    if attender == "released":
        assert not out.vif.used_posterior and out.vif.kl.item() == 0.0
    else:
        assert out.vif.used_posterior and out.vif.kl.item() > 0.0
    out.loss.backward()
    assert all(p.grad is not None for p in vmodel.vif_module.parameters())
