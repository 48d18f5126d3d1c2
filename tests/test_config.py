"""VIFConfig: validation, JSON round trip, presets."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

import vif
from vif.attender import ProbabilisticAttender
from vif.config import scaled_paper_pairs


def llava_7b_config() -> LlavaConfig:
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    return LlavaConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14), text_config=text)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(extract_layers=[1, 2], inject_layers=[5]), "one extraction layer per injection layer"),
        (dict(extract_layers=[5], inject_layers=[5]), "not before its injection layer"),
        (dict(extract_layers=[6], inject_layers=[2]), "not before its injection layer"),
        (dict(extract_layers=[-1], inject_layers=[2]), "negative"),
        (dict(extract_layers=[], inject_layers=[]), "at least one"),
        (dict(extract_layers=[1, 2], inject_layers=[5, 5]), "repeats a layer"),
        (dict(alpha=1.5), r"alpha=1.5 is outside \[0, 1\]"),
        (dict(alpha=-0.1), "outside"),
        (dict(normalisation="l1"), "normalisation"),
        (dict(inject_rows="vision"), "inject_rows"),
        (dict(injection="flash"), "injection"),
        (dict(latent_size=30, num_heads=4), "not divisible"),
        (dict(min_sigma=0.0), "min_sigma"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(num_components=0), "num_components"),
        (dict(attender="authors"), r"attender='authors' is not one of \('vif', 'released'\)"),
        (dict(init="xavier"), r"init='xavier' is not one of \('vif', 'released'\)"),
        (dict(centers="argmax"), r"centers='argmax' is not one of \('linear', 'attention'\)"),
        (dict(min_sigma_unit="pixel"), "min_sigma_unit"),
        (dict(evidence_weight=-1.0), "evidence_weight must be >= 0"),
        (dict(evidence_features="pixels"), "evidence_features"),
        (dict(evidence_pool="slots"), "evidence_pool"),
        (dict(evidence_reader="mlp"), "evidence_reader"),
        (dict(vision_features="tower"), "vision_features"),
        (dict(map_source="oracle"), "map_source"),
        (dict(salience="reader"), "salience"),
        (
            dict(centers="linear", evidence_pool="locator", evidence_weight=1.0),
            "only centers=.attention. has",
        ),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(vif.VIFConfigError, match=message):
        vif.VIFConfig(**kwargs)


def test_layer_range_is_checked_against_the_backbone():
    config = vif.VIFConfig(extract_layers=[11], inject_layers=[40])
    with pytest.raises(vif.VIFConfigError, match="out of range for a language model with 32"):
        config.validate(num_layers=32)


def test_json_round_trip(tmp_path):
    config = vif.VIFConfig(
        alpha=0.3,
        normalisation="softmax",
        extract_layers=[1, 2],
        inject_layers=[4, 6],
        attender="released",
        init="released",
    )
    assert vif.VIFConfig.from_json(config.to_json()) == config
    config.save(tmp_path)
    assert vif.VIFConfig.load(tmp_path) == config
    assert (vif.VIFConfig.load(tmp_path).attender, vif.VIFConfig.load(tmp_path).init) == (
        "released",
        "released",
    )
    assert (vif.VIFConfig().attender, vif.VIFConfig().init) == ("vif", "vif")  # ours stays the default
    with pytest.raises(vif.VIFConfigError, match="unknown VIFConfig fields"):
        vif.VIFConfig.from_dict({"alhpa": 0.5})
    with pytest.raises(vif.VIFConfigError, match="unknown preset"):
        vif.VIFConfig.preset("huge", llava_7b_config())


def test_paper_pairs_scale_with_depth():
    assert scaled_paper_pairs(32) == ([11, 13, 15, 17], [25, 27, 29, 31])
    for depth in (5, 6, 7, 8, 12, 24, 28, 40, 80):
        extract, inject = scaled_paper_pairs(depth)
        assert inject[-1] == depth - 1 and len(set(inject)) == 4
        assert all(e < d for e, d in zip(extract, inject))
    assert scaled_paper_pairs(28) == ([9, 11, 13, 15], [22, 23, 25, 27])
    with pytest.raises(vif.VIFConfigError, match="too shallow"):
        scaled_paper_pairs(4)
    four = llava_7b_config()
    four.text_config.num_hidden_layers = 4
    with pytest.raises(vif.VIFConfigError, match="too shallow"):
        vif.VIFConfig.preset("compact", four)
    explicit = vif.VIFConfig.preset("compact", four, extract_layers=[0, 1], inject_layers=[2, 3])
    assert explicit.pairs == [(0, 2), (1, 3)]


def test_paper_preset_matches_the_released_recipe_size():
    """The released recipe on LLaVA-1.5-7B: Dz = D = 4096, Dff = 16384, 3 blocks, 4 heads, K = 16.

    The spec counts 3.42 B parameters; ours omits the last block's dead text tail
    (docs/presets.md), counted here on the meta device.
    """
    config = vif.VIFConfig.preset("paper", llava_7b_config())
    assert (config.latent_size, config.ffn_size, config.num_encoder_layers, config.num_heads) == (
        4096,
        16384,
        3,
        4,
    )
    assert config.pairs == [(11, 25), (13, 27), (15, 29), (17, 31)]
    with torch.device("meta"):
        module = ProbabilisticAttender(config)
    total = sum(p.numel() for p in module.parameters())
    dead_tail = 2 * (4 * (4096 * 4096 + 4096) + 2 * 4096 * 16384 + 16384 + 4096 + 4 * 2 * 4096 + 2 * 4096)
    text_norm = 2 * 2 * 4096
    assert abs(total + dead_tail + text_norm - 3.42e9) / 3.42e9 < 0.005
    # The spec's 1.64 B "prior branch" is the encoder without the mu / logvar heads.
    heads = sum(p.numel() for p in [*module.prior.mu.parameters(), *module.prior.logvar.parameters()])
    prior = sum(p.numel() for p in module.prior.parameters()) - heads
    assert abs(prior + dead_tail // 2 + text_norm // 2 - 1.64e9) / 1.64e9 < 0.005


def test_compact_preset_is_much_smaller():
    config = vif.VIFConfig.preset("compact", llava_7b_config())
    with torch.device("meta"):
        compact = sum(p.numel() for p in ProbabilisticAttender(config).parameters())
    assert config.latent_size == 1024 and config.num_encoder_layers == 2
    assert 100e6 < compact < 160e6


def test_paper_and_released_presets():
    """`paper`: the released module and training; `released`: also the released map and decoding."""
    paper = vif.VIFConfig.preset("paper", llava_7b_config())
    released = vif.VIFConfig.preset("released", llava_7b_config())
    compact = vif.VIFConfig.preset("compact", llava_7b_config())
    assert (paper.attender, paper.init, paper.loss_pairs) == ("released", "released", "first")
    assert (paper.normalisation, paper.grid_coords, paper.inject_decode, paper.sample_at_inference) == (
        "sum",
        "centers",
        True,
        False,
    )
    assert released == vif.VIFConfig.from_dict({**paper.to_dict(), **vif.config.RELEASED_BEHAVIOUR})
    assert (compact.attender, compact.init, compact.loss_pairs) == ("vif", "vif", "all")


def test_presets_choose_the_method():
    """`paper` / `released` keep the paper's method; `compact` / `large` use vif's (docs/looking.md)."""
    from vif.config import PAPER_METHOD

    model = llava_7b_config()
    defaults = vif.VIFConfig()
    for name in ("paper", "released"):
        config = vif.VIFConfig.preset(name, model)
        assert {k: getattr(config, k) for k in PAPER_METHOD} == PAPER_METHOD, name
    for name in ("compact", "large"):
        config = vif.VIFConfig.preset(name, model)
        assert {k: getattr(config, k) for k in PAPER_METHOD} == {
            k: getattr(defaults, k) for k in PAPER_METHOD
        }
        assert config.encoder_size == model.vision_config.hidden_size  # what the projector reads
        assert config.vocab_size == model.text_config.vocab_size
    large, paper = vif.VIFConfig.preset("large", model), vif.VIFConfig.preset("paper", model)
    assert (large.latent_size, large.ffn_size, large.num_encoder_layers) == (
        paper.latent_size,
        paper.ffn_size,
        paper.num_encoder_layers,
    )
    assert vif.VIFConfig().evidence_weight > 0 and vif.VIFConfig().centers == "attention"
