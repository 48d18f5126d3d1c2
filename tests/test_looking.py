"""Learning where to look: attention centres, the sigma floor in tokens, the answer-evidence
head, the ground-truth map, and which parameters each loss reaches."""

import math

import pytest
import torch

import vif
from vif.backbones.base import build_layout
from vif.gmm import GMMHead, grid_coordinates
from vif.model import box_map
from vif.testing import IMAGE_TOKEN_ID, llava_batch, tiny_llava, tokens_per_image

# One sample with one image, a text-only sample, a sample with two images.
MIXED = [(1, 3, 6), (0, 5, 7), (2, 2, 4)]

LOOKING = dict(
    centers="attention",
    min_sigma=0.5,
    min_sigma_unit="token",
    evidence_weight=1.0,
    evidence_pool="locator",
    evidence_reader="tokens",
    vision_features="extraction+embeddings",
    detach_input=True,
)


def compact(model, **overrides):
    overrides = {"extract_layers": [1, 2], "inject_layers": [4, 6], **overrides}
    return vif.VIFConfig.preset("compact", model, **overrides)


def test_attention_centres_are_the_soft_argmax_of_token_coordinates():
    torch.manual_seed(0)
    head = GMMHead(16, centers="attention")
    coords = grid_coordinates(3, 4)[None].expand(2, -1, -1)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 6:] = False
    tokens = torch.randn(2, 12, 16, requires_grad=True)
    z = torch.randn(2, 5, 16)
    mixture = head(z, tokens, coords, valid, floor=torch.tensor([0.1, 0.2]))
    assert torch.allclose(mixture.locator.sum(-1), torch.ones(2, 5))
    assert torch.equal(mixture.locator[1, :, 6:], torch.zeros(5, 6))  # never on padding
    assert torch.allclose(mixture.centers, torch.einsum("bkn,bnd->bkd", mixture.locator, coords), atol=1e-6)
    # padding is excluded: sample 1's centres lie in the hull of its first 6 tokens (the top half)
    assert mixture.centers[1, :, 1].max() <= coords[1, 5, 1] + 1e-6
    assert torch.all(mixture.sigmas[0] > 0.1) and torch.all(mixture.sigmas[1] > 0.2)
    mixture.centers.sum().backward()
    assert head.center_query.weight.grad.abs().sum() > 0 and tokens.grad.abs().sum() > 0


def test_box_map_is_uniform_over_the_tokens_the_box_overlaps():
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, 2:18] = True  # one 4 x 4 image per sample
    layout = build_layout(mask, [[(4, 4)], [(4, 4)]])
    boxes = torch.tensor([[0.30, 0.55, 0.45, 0.70], [float("nan")] * 4])
    pi = box_map(layout, boxes)
    grid = pi[0].reshape(4, 4)
    # x in [0.30, 0.45) covers columns 1; y in [0.55, 0.70) covers row 2
    expected = torch.zeros(4, 4)
    expected[2, 1] = 1.0
    assert torch.equal(grid, expected)
    assert torch.allclose(pi[1], torch.full((16,), 1 / 16))  # no box: flat
    wide = box_map(layout, torch.tensor([[0.2, 0.05, 0.8, 0.2]] * 2))[0].reshape(4, 4)
    assert torch.allclose(wide[0], torch.full((4,), 0.25)) and wide[1:].sum() == 0
    with pytest.raises(vif.BackboneError, match="vif_boxes"):
        box_map(layout, None)


def test_ground_truth_map_arm_injects_the_box():
    model = tiny_llava()
    batch = llava_batch(model, [(1, 3, 6), (1, 2, 4)], with_labels=True)
    vmodel = vif.attach(model, compact(model, map_source="boxes")).train()
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
    out = vmodel(**batch, vif_boxes=boxes)
    pi = out.vif.importance[4]
    side = int(math.isqrt(tokens_per_image(model)))
    assert pi[0].reshape(side, side)[0, 0] == 1.0
    assert torch.allclose(pi[1].reshape(side, side)[side // 2 :, side // 2 :].sum(), torch.tensor(1.0))
    out.loss.backward()  # every VIF parameter is in the graph (data-parallel reduction needs it)
    assert all(p.grad is not None for p in vmodel.vif_module.parameters())
    with pytest.raises(vif.BackboneError, match="vif_boxes"):
        vmodel(**batch)


def test_sigma_floor_in_tokens_follows_the_grid():
    model = tiny_llava()
    side = int(math.isqrt(tokens_per_image(model)))
    batch = llava_batch(model, MIXED, with_labels=True)
    for unit, floor in (("image", 0.3), ("token", 0.3 / side)):
        vmodel = vif.attach(model, compact(model, min_sigma=0.3, min_sigma_unit=unit)).eval()
        with torch.no_grad():
            out = vmodel(**batch)
        sigmas = out.vif.mixtures[4].sigmas
        assert torch.all(sigmas >= floor) and torch.all(sigmas < floor + 0.2)
        vmodel.detach()


def trainable_llm(vmodel):
    return {n: p for n, p in vmodel.base_model.named_parameters() if "vision_tower" not in n}


def test_evidence_and_auxiliary_losses_never_reach_the_llm_with_detached_input():
    torch.manual_seed(0)
    model = tiny_llava()
    batch = llava_batch(model, MIXED, padding_side="right", with_labels=True)
    vmodel = vif.attach(model, compact(model, **LOOKING)).train()
    torch.manual_seed(1)
    out = vmodel(**batch)
    assert out.vif.evidence is not None and torch.isfinite(out.vif.evidence)
    aux = out.vif.kl + out.vif.sparsity + out.vif.evidence
    grads = torch.autograd.grad(aux, list(trainable_llm(vmodel).values()), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    attender_grads = torch.autograd.grad(
        out.vif.evidence, list(vmodel.vif_module.parameters()), allow_unused=True
    )
    named = dict(zip([n for n, _ in vmodel.vif_module.named_parameters()], attender_grads))
    for name in ("gmm.center_query.weight", "evidence.proj.0.weight", "prior.embeddings_in.1.weight"):
        assert named[name] is not None and named[name].abs().sum() > 0, name
    # ...while without detach_input the same losses do train the LLM's lower layers
    vmodel.detach()
    vmodel = vif.attach(model, compact(model, **{**LOOKING, "detach_input": False})).train()
    out = vmodel(**batch)
    grads = torch.autograd.grad(
        out.vif.kl + out.vif.evidence, list(trainable_llm(vmodel).values()), allow_unused=True
    )
    assert any(g is not None and g.abs().max() > 0 for g in grads)


def test_evidence_ignores_end_of_turn_tokens():
    torch.manual_seed(0)
    model = tiny_llava()
    batch = llava_batch(model, [(1, 3, 6), (1, 2, 5)], padding_side="right", with_labels=True)
    vmodel = vif.attach(model, compact(model, **LOOKING)).eval()
    with torch.no_grad():
        before = vmodel(**batch).vif.evidence
        labels = batch["labels"].clone()
        labels[labels != -100] = model.config.text_config.pad_token_id  # only non-evidence tokens
        nothing = vmodel(**{**batch, "labels": labels}).vif.evidence
    assert before > 0 and nothing == 0


def test_new_options_round_trip_through_the_adapter_folder(tmp_path):
    model = tiny_llava()
    config = compact(model, **LOOKING)
    vmodel = vif.attach(model, config)
    batch = llava_batch(model, MIXED)
    with torch.no_grad():
        expected = vmodel(**batch).logits
    vmodel.save_pretrained(tmp_path / "adapter")
    base = vmodel.detach()
    loaded = vif.VIFModel.from_pretrained(base, tmp_path / "adapter")
    assert loaded.config_vif == vmodel.config_vif
    assert (vmodel.config_vif.vocab_size, vmodel.config_vif.encoder_size) == (128, 32)  # filled on attach
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def synthetic_batch(model, n: int, generator: torch.Generator):
    """Images of noise with one patch painted in one of 4 flat colours; the answer is that colour's token.

    Returns the batch and each sample's target-token mask ``(n, tokens_per_image)``.
    """
    vision = model.config.vision_config
    side, patch = vision.image_size // vision.patch_size, vision.patch_size
    colours = torch.tensor([[2.0, -2.0, -2.0], [-2.0, 2.0, -2.0], [-2.0, -2.0, 2.0], [2.0, 2.0, -2.0]])
    pixels = 0.3 * torch.randn(n, 3, vision.image_size, vision.image_size, generator=generator)
    cls = torch.randint(0, 4, (n,), generator=generator)
    where = torch.randint(0, side * side, (n,), generator=generator)
    target = torch.zeros(n, side * side, dtype=torch.bool)
    for i in range(n):
        r, c = divmod(int(where[i]), side)
        pixels[i, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = colours[cls[i]][
            :, None, None
        ]
        target[i, where[i]] = True
    question = torch.tensor([10, 11, 12])
    ids = torch.stack(
        [
            torch.cat(
                [question[:1], torch.full((side * side,), IMAGE_TOKEN_ID), question[1:], 20 + cls[i : i + 1]]
            )
            for i in range(n)
        ]
    )
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "pixel_values": pixels, "labels": labels}, target


def test_training_puts_the_map_on_the_evidence():
    """A deterministic tiny problem: the evidence head moves the prior's map onto the painted patch."""
    torch.manual_seed(0)
    model = tiny_llava(num_layers=4)
    model.requires_grad_(False)  # only the attender learns: what moves the map is VIF's own training
    config = compact(model, extract_layers=[1], inject_layers=[3], num_heads=1, **LOOKING)
    vmodel = vif.attach(model, config)
    generator = torch.Generator().manual_seed(0)
    test_batch, test_target = synthetic_batch(model, 64, generator)
    flat = 1 / test_target.shape[1]

    def on_target() -> float:
        vmodel.eval()
        with torch.no_grad():
            pi = vmodel(**test_batch).vif.importance[3]
        vmodel.train()
        return float((pi * test_target).sum(-1).mean())

    before = on_target()
    optimiser = torch.optim.AdamW(vmodel.vif_module.parameters(), lr=3e-3)
    for _ in range(60):
        batch, _ = synthetic_batch(model, 16, generator)
        loss = vmodel(**batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = on_target()
    assert before < 2 * flat
    print("ON-TARGET", before, after, flat)
    assert after > 5 * flat, (before, after, flat)


def test_an_adapter_saved_before_the_new_fields_loads_as_it_was_built(tmp_path):
    import json

    from vif.config import LEGACY_VALUES, PAPER_METHOD

    model = tiny_llava()
    vmodel = vif.attach(model, compact(model, **PAPER_METHOD))
    vmodel.save_pretrained(tmp_path)
    path = tmp_path / "vif_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in LEGACY_VALUES}))
    loaded = vif.VIFModel.from_pretrained(vmodel.detach(), tmp_path)
    for key, value in LEGACY_VALUES.items():
        assert getattr(loaded.config_vif, key) == value, key


def test_features_of_the_vision_encoder_reach_the_attender_and_nothing_else():
    """`encoder` features: LLaVA's projector input (CLIP width), read without training the projector."""
    torch.manual_seed(0)
    model = tiny_llava()
    batch = llava_batch(model, MIXED, padding_side="left", with_labels=True)
    config = compact(
        model, **{**LOOKING, "vision_features": "extraction+encoder", "evidence_features": "encoder"}
    )
    vmodel = vif.attach(model, config).train()
    width = model.config.vision_config.hidden_size
    assert vmodel.config_vif.encoder_size == width
    assert vmodel.vif_module.prior.embeddings_in[1].in_features == width
    assert vmodel.vif_module.evidence.norm.normalized_shape == (width,)
    out = vmodel(**batch)
    projector = list(model.model.multi_modal_projector.parameters())
    grads = torch.autograd.grad(out.vif.evidence + out.vif.kl, projector, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    vmodel.eval()
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert vmodel.generate(**prompt, max_new_tokens=2).shape[0] == 3


def test_evidence_salience_scores_centres_with_the_readers_features():
    """salience='evidence': the centre scores read the evidence reader's hidden features per token."""
    torch.manual_seed(0)
    model = tiny_llava()
    batch = llava_batch(model, MIXED, padding_side="right", with_labels=True)
    config = compact(model, **{**LOOKING, "salience": "evidence"})
    vmodel = vif.attach(model, config).train()
    assert vmodel.vif_module.gmm.center_salience[0].in_features == config.evidence_size
    out = vmodel(**batch)
    names = [n for n, _ in vmodel.vif_module.named_parameters()]
    grads = dict(
        zip(names, torch.autograd.grad(out.loss, list(vmodel.vif_module.parameters()), allow_unused=True))
    )
    for name in ("gmm.center_salience.0.weight", "evidence.proj.0.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # the map moves when the reader's features change: the salience path is live
    vmodel.eval()
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = vmodel(**prompt).vif.importance[4]
        vmodel.vif_module.evidence.proj[0].weight.mul_(3.0)
        after = vmodel(**prompt).vif.importance[4]
    assert (before - after).abs().max() > 1e-4


def test_evidence_salience_without_the_evidence_head_reads_the_tokens():
    """salience="distilled" (the default) falls back to the encoded tokens where there is no reader."""
    model = tiny_llava()
    config = compact(model, **{**LOOKING, "evidence_weight": 0.0, "evidence_pool": "map"})
    assert config.salience == "distilled"
    vmodel = vif.attach(model, config)
    assert vmodel.vif_module.evidence is None
    assert vmodel.vif_module.gmm.center_salience[0].in_features == config.latent_size
    with torch.no_grad():
        out = vmodel(**llava_batch(model, MIXED))
    assert all(torch.isfinite(pi).all() for pi in out.vif.importance.values())


def test_generate_after_generate_reads_this_prompts_encoder_features():
    """The evidence salience reads the vision encoder's output of *this* prompt, also when a previous
    generate() left the runtime in its decode state (the encoder runs before the prompt's `begin`)."""
    torch.manual_seed(0)
    model = tiny_llava()
    vmodel = vif.attach(model, compact(model, **{**LOOKING, "salience": "evidence"})).eval()
    first = llava_batch(model, [(1, 3, 6), (1, 2, 5), (1, 4, 4)], padding_side="left")
    second = llava_batch(model, [(1, 2, 7), (1, 5, 3)], padding_side="left")

    def maps_after(*batches):
        for batch in batches:
            with torch.no_grad():
                vmodel.generate(**batch, max_new_tokens=2, do_sample=False)
        return {d: r.pi.clone() for d, r in vmodel._runtime.results.items()}

    alone = maps_after(second)
    after_another = maps_after(first, second)
    assert alone.keys() == after_another.keys() and alone
    for d in alone:
        assert torch.equal(alone[d], after_another[d]), d


def test_logsumexp_reader_matches_its_closed_form_and_trains_the_reader_on_the_uniform_pool():
    """evidence_reader='logsumexp': an answer's image score is the (map-weighted) log-sum-exp of its
    tokens' scores; the map-weighted term trains the map, not the reader."""
    from vif.attender import EvidenceHead

    torch.manual_seed(0)
    head = EvidenceHead(8, 16, "logsumexp", vocab_size=10, answer_size=6)
    features = torch.randn(2, 5, 8)
    answers = torch.tensor([[3], [7]])
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    pi = torch.softmax(torch.randn(2, 5), -1).masked_fill(~valid, 0.0).requires_grad_()
    loss = head(pi, features, None, answers, valid)

    # by hand: scores over the batch's answers {3, 7}, pooled with log-sum-exp, one softmax per image
    scores = head.proj(head.norm(features)) @ head.answers.weight[[3, 7]].T  # (2, 5, 2)
    target = torch.tensor([0, 1])
    expected = 0.0
    for weights in (pi.detach(), valid.float()):
        log_w = weights.clamp_min(1e-38).log().masked_fill(~valid, -math.inf)
        expected = expected + torch.nn.functional.cross_entropy(
            torch.logsumexp(scores + log_w[..., None], 1), target
        )
    assert torch.allclose(loss, expected, atol=1e-5)

    (pi_grad,) = torch.autograd.grad(loss, pi, retain_graph=True)
    assert pi_grad[valid].abs().sum() > 0 and pi_grad[~valid].abs().sum() == 0
    # the reader's gradient does not depend on the map: the same for any pi
    g_pi = torch.autograd.grad(head(pi.detach(), features, None, answers, valid), head.answers.weight)[0]
    g_flat = torch.autograd.grad(head(valid.float(), features, None, answers, valid), head.answers.weight)[0]
    assert g_pi.abs().sum() > 0 and torch.allclose(g_pi, g_flat, atol=1e-6)


def test_distilled_salience_learns_the_readers_map():
    """salience='distilled': the centres' salience term is trained towards the reader's own map."""
    torch.manual_seed(0)
    model = tiny_llava()
    batch = llava_batch(model, MIXED, padding_side="right", with_labels=True)
    config = compact(model, **{**LOOKING, "evidence_reader": "logsumexp", "salience": "distilled"})
    vmodel = vif.attach(model, config).train()
    names = [n for n, _ in vmodel.vif_module.named_parameters()]
    out = vmodel(**batch)
    grads = dict(
        zip(
            names,
            torch.autograd.grad(out.vif.evidence, list(vmodel.vif_module.parameters()), allow_unused=True),
        )
    )
    assert grads["gmm.center_salience.2.weight"].abs().sum() > 0
    # training the salience term alone on the evidence loss lowers it (only the distillation moves)
    salience = [p for n, p in vmodel.vif_module.named_parameters() if n.startswith("gmm.center_salience")]
    optimiser = torch.optim.Adam(salience, lr=1e-2)
    losses = []
    for _ in range(30):
        evidence = vmodel(**batch).vif.evidence
        losses.append(float(evidence.detach()))
        optimiser.zero_grad()
        evidence.backward()
        optimiser.step()
    assert losses[-1] < losses[0] - 0.05
    back = vif.VIFConfig.from_dict(config.to_dict())
    assert back.salience == "distilled" and back.evidence_reader == "logsumexp"
