"""`vif convert-authors`: a module with the released code's names, shapes and computation, converted.

`Released*` below is written here from the published facts about the authors' module
(`latent_importance.py`): its parameter names and shapes, `nn.MultiheadAttention`
everywhere, pre-LayerNorm on the querying stream only, raw slot queries, a softmax map on
a linspace grid. Its state dict, saved as the released training would save it, is
converted and loaded into vif's `attender="released"`; both must compute the same.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vif
from vif.attender import ProbabilisticAttender
from vif.cli import main
from vif.convert import ConversionError, from_authors, rename_tensors
from vif.gmm import grid_coordinates, render
from vif.model import WEIGHTS_NAME
from vif.testing import IMAGE_TOKEN_ID, llava_batch, tiny_llava

HIDDEN, LATENT, HEADS, FFN, SLOTS, BLOCKS = 64, 32, 2, 64, 4, 3  # HIDDEN = tiny_llava's width


class ReleasedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        for stream in ("vision", "text"):
            setattr(self, f"{stream}_self_attn", nn.MultiheadAttention(dim, heads, batch_first=True))
            for i in (1, 2, 3):
                setattr(self, f"{stream}_norm{i}", nn.LayerNorm(dim))
            setattr(self, f"{stream}_ffn", nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim)))
        self.v2t_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.t2v_attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, v, t, t_mask):
        x = self.vision_norm1(v)
        v = v + self.vision_self_attn(x, x, x, need_weights=False)[0]
        x = self.text_norm1(t)
        t = t + self.text_self_attn(x, x, x, need_weights=False)[0]
        v = v + self.v2t_attn(self.vision_norm2(v), t, t, key_padding_mask=~t_mask, need_weights=False)[0]
        t = t + self.t2v_attn(self.text_norm2(t), v, v, need_weights=False)[0]
        v = v + self.vision_ffn(self.vision_norm3(v))
        t = t + self.text_ffn(self.text_norm3(t))
        return v, t


class ReleasedEncoder(nn.Module):
    def __init__(self, hidden: int, dim: int, heads: int, ffn: int, blocks: int) -> None:
        super().__init__()
        self.img_proj, self.txt_proj = nn.Linear(hidden, dim), nn.Linear(hidden, dim)
        self.layers = nn.ModuleList(ReleasedBlock(dim, heads, ffn) for _ in range(blocks))
        self.vision_norm, self.text_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, vision, text, t_mask):
        v, t = self.img_proj(vision), self.txt_proj(text)
        for layer in self.layers:
            v, t = layer(v, t, t_mask)
        return self.vision_norm(v)


class ReleasedRenderer(nn.Module):
    def __init__(self, dim: int, min_sigma: float = 0.035) -> None:
        super().__init__()
        self.min_sigma = min_sigma
        self.pos_head, self.sigma_head, self.weight_head = (
            nn.Linear(dim, 2),
            nn.Linear(dim, 1),
            nn.Linear(dim, 1),
        )

    def forward(self, z, side):
        centers = torch.sigmoid(self.pos_head(z))
        sigma = F.softplus(self.sigma_head(z)).squeeze(-1) + self.min_sigma
        weights = torch.softmax(self.weight_head(z).squeeze(-1), dim=-1)
        axis = torch.linspace(0, 1, side, dtype=z.dtype)
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        grid = torch.stack([x.reshape(-1), y.reshape(-1)], -1)  # (N, 2) as (x, y), row-major
        sq = (grid[None, None] - centers[:, :, None]).pow(2).sum(-1)  # (B, K, N)
        raw = (torch.exp(-sq / (2 * sigma[..., None] ** 2)) * weights[..., None]).sum(1)
        return torch.softmax(raw, -1), (centers, sigma, weights)


class Released(nn.Module):
    """The released module's parts, under the names its state dict uses."""

    def __init__(self, hidden=HIDDEN, dim=LATENT, heads=HEADS, ffn=FFN, slots=SLOTS, blocks=BLOCKS) -> None:
        super().__init__()
        self.prior_encoder = ReleasedEncoder(hidden, dim, heads, ffn, blocks)
        self.posterior_encoder = ReleasedEncoder(hidden, dim, heads, ffn, blocks)
        self.latent_queries = nn.Parameter(torch.randn(1, slots, dim))
        self.compress_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        for branch in ("prior", "posterior"):
            setattr(self, f"{branch}_mean_head", nn.Linear(dim, dim))
            setattr(self, f"{branch}_logvar_head", nn.Linear(dim, dim))
        self.renderer = ReleasedRenderer(dim)

    def latent(self, branch, vision, text, t_mask):
        encoded = getattr(self, f"{branch}_encoder")(vision, text, t_mask)
        queries = self.latent_queries.expand(vision.shape[0], -1, -1)
        slots = self.compress_attn(queries, encoded, encoded, need_weights=False)[0]
        mean = getattr(self, f"{branch}_mean_head")(slots)
        return mean, getattr(self, f"{branch}_logvar_head")(slots).clamp(-5, 5)


def released_weights(seed: int = 0) -> Released:
    """Random values everywhere (biases and LayerNorm affines included), so a misplaced tensor shows."""
    torch.manual_seed(seed)
    module = Released()
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    return module.eval()


RUN_CONFIG = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "model_type": "llava_llama",
    "hidden_size": HIDDEN,
    "num_hidden_layers": 8,
    "use_latent_importance": True,
    "latent_hidden_size": LATENT,
    "latent_num_layers": BLOCKS,
    "latent_num_heads": HEADS,
    "latent_ffn_dim": FFN,
    "latent_num_components": SLOTS,
    "latent_min_sigma": 0.035,
    "latent_bias_alpha": 0.5,
    "latent_kl_weight": 0.1,
    "latent_layer_stride": 2,
    # Null ranges fall back to the legacy names, as in the released config class.
    "latent_learning_start": None,
    "latent_learning_end": None,
    "latent_l_start": 1,
    "latent_l_end": 3,
    "latent_apply_start": None,
    "latent_apply_end": None,
    "latent_start_layer": 5,
    "latent_end_layer": 7,
    "latent_dropout": 0.1,
}


def write_sharded_run(folder, module: Released, config=RUN_CONFIG) -> None:
    """A full run as the released training saves it: LLM + projector + module in two shards + index."""
    folder.mkdir(parents=True, exist_ok=True)
    module_state = {f"model.attention_bias_generator.{k}": v for k, v in module.state_dict().items()}
    llm = {
        "model.embed_tokens.weight": torch.randn(8, HIDDEN),
        "model.mm_projector.0.weight": torch.randn(4, 4),
    }
    keys = sorted(module_state)
    shards = {
        "model-00001-of-00002.safetensors": {**llm, **{k: module_state[k] for k in keys[::2]}},
        "model-00002-of-00002.safetensors": {k: module_state[k] for k in keys[1::2]},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(config))


def ours_from(out) -> ProbabilisticAttender:
    data = json.loads((out / "vif_config.json").read_text())
    data.pop("base_model")
    module = ProbabilisticAttender(vif.VIFConfig.from_dict(data))
    module.load_state_dict(load_file(out / WEIGHTS_NAME))  # strict: every name and shape
    return module.eval()


def test_converted_module_computes_what_the_released_module_computes(tmp_path):
    released = released_weights()
    write_sharded_run(tmp_path / "run", released)
    result = from_authors(tmp_path / "run", tmp_path / "out")
    notes = "\n".join(result.notes)
    assert "left out 2 other tensors" in notes and "dropped 28 tensors" in notes
    assert result.config.pairs == [(1, 5), (3, 7)] and "latent_l_start" in notes
    expected = dict(attender="released", normalisation="softmax", grid_coords="linspace", inject_decode=False)
    expected.update(sample_at_inference=True, loss_pairs="first", num_heads=HEADS, alpha=0.5)
    assert {k: getattr(result.config, k) for k in expected} == expected

    ours, released = ours_from(tmp_path / "out").double(), released.double()
    g = torch.Generator().manual_seed(1)
    vision = torch.randn(2, 16, HIDDEN, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, HIDDEN, generator=g, dtype=torch.float64)
    v_mask, t_mask = torch.ones(2, 16, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        for branch in ("prior", "posterior"):
            theirs_encoded = getattr(released, f"{branch}_encoder")(vision, text, t_mask)
            ours_encoded = getattr(ours, branch).encode(vision, text, v_mask, t_mask)
            torch.testing.assert_close(ours_encoded, theirs_encoded, rtol=0, atol=1e-12)
            mean, logvar = released.latent(branch, vision, text, t_mask)
            latent = ours.latent(getattr(ours, branch), vision, text, v_mask, t_mask)
            torch.testing.assert_close(latent.mu, mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(latent.logvar, logvar, rtol=0, atol=1e-12)
            heatmap, (centers, sigma, weights) = released.renderer(mean, side=4)
            mixture = ours.decode(latent.mu)
            for a, b in zip((mixture.centers, mixture.sigmas, mixture.weights), (centers, sigma, weights)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            coords = grid_coordinates(4, 4, "linspace").double()[None].expand(2, -1, -1)
            pi = render(mixture, coords, v_mask, "softmax")
            torch.testing.assert_close(pi, heatmap.float(), rtol=0, atol=1e-7)  # render works in fp32


def test_converted_adapter_loads_and_gives_the_released_map_inside_the_model(tmp_path):
    released = released_weights()
    write_sharded_run(tmp_path / "run", released)
    from_authors(tmp_path / "run", tmp_path / "out")
    model = tiny_llava()
    vmodel = vif.VIFModel.from_pretrained(model, tmp_path / "out", sample_at_inference=False)
    batch = llava_batch(model, [(1, 3, 6)])
    with torch.no_grad():
        out = vmodel(**batch, output_hidden_states=True)
        vision = batch["input_ids"][0] == IMAGE_TOKEN_ID
        for e, d in vmodel.config_vif.pairs:
            hidden = out.hidden_states[e + 1][0]  # layer e's output
            mean, _ = released.latent(
                "prior", hidden[vision][None], hidden[~vision][None], torch.ones(1, 9).bool()
            )
            heatmap, _ = released.renderer(mean, side=4)
            torch.testing.assert_close(out.vif.importance[d], heatmap, rtol=0, atol=1e-6)


def test_lora_run_non_lora_trainables_and_released_default_layers(tmp_path):
    released = released_weights()
    run = tmp_path / "lora-run"
    run.mkdir()
    state = {
        f"base_model.model.model.attention_bias_generator.{k}": v for k, v in released.state_dict().items()
    }
    state["base_model.model.model.mm_projector.0.weight"] = torch.randn(4, 4)
    torch.save(state, run / "non_lora_trainables.bin")
    config = {k: v for k, v in RUN_CONFIG.items() if "start" not in k and "end" not in k}
    config.update(latent_learning_start=1, latent_learning_end=3)  # injection range left to the defaults
    (run / "config.json").write_text(json.dumps(config))
    result = from_authors(run, tmp_path / "out", normalisation="sum")
    # Default injection range of 8 layers is [6]; one layer for two extraction layers, so the
    # released code takes the last two of range(0, 8, 2).
    assert result.config.pairs == [(1, 4), (3, 6)] and result.config.normalisation == "sum"
    write_sharded_run(tmp_path / "full", released)
    from_authors(tmp_path / "full", tmp_path / "out-full")
    a, b = load_file(tmp_path / "out" / WEIGHTS_NAME), load_file(tmp_path / "out-full" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_conversion_errors_name_the_problem(tmp_path):
    released = released_weights()
    write_sharded_run(tmp_path / "run", released)
    with pytest.raises(ConversionError, match="fixed by the checkpoint"):
        from_authors(tmp_path / "run", tmp_path / "out", latent_size=16)
    with pytest.raises(vif.VIFConfigError, match="normalisation"):
        from_authors(tmp_path / "run", tmp_path / "out", normalisation="l2")
    from_authors(tmp_path / "run", tmp_path / "out")
    with pytest.raises(ConversionError, match="already exists"):
        from_authors(tmp_path / "run", tmp_path / "out")

    extra = {f"model.attention_bias_generator.{k}": v for k, v in released.state_dict().items()}
    extra["model.attention_bias_generator.answer_head.weight"] = torch.zeros(2, 2)
    save_file(extra, tmp_path / "run" / "extra.safetensors")  # SRC may name one weight file
    with pytest.raises(
        ConversionError, match="attention_bias_generator.answer_head.weight has no counterpart"
    ):
        from_authors(tmp_path / "run" / "extra.safetensors", tmp_path / "out2")

    wrong = {**RUN_CONFIG, "latent_num_layers": 2}
    write_sharded_run(tmp_path / "wrong", released, config=wrong)
    with pytest.raises(ConversionError, match="latent_num_layers=2 but the weights have 3"):
        from_authors(tmp_path / "wrong", tmp_path / "out3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="holds none of"):
        from_authors(tmp_path / "empty", tmp_path / "out4")


def test_cli_converts_with_overrides(tmp_path, capsys):
    write_sharded_run(tmp_path / "run", released_weights())
    out = tmp_path / "out"
    assert (
        main(["convert-authors", str(tmp_path / "run"), str(out), "--set", "sample_at_inference=false"]) == 0
    )
    assert "dropped 28 tensors" in capsys.readouterr().out
    assert json.loads((out / "vif_config.json").read_text())["sample_at_inference"] is False
    assert main(["convert-authors", str(tmp_path / "run"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_paper_sizes_released_module_is_ours_plus_the_dropped_dead_tensors():
    """At LLaVA-1.5-7B's sizes the released module has the spec's 3.42 B parameters."""
    with torch.device("meta"):
        released = Released(hidden=4096, dim=4096, heads=4, ffn=16384, slots=16, blocks=3)
        text = dict(hidden_size=4096, num_hidden_layers=32)
        ours = ProbabilisticAttender(vif.VIFConfig.preset("paper", type("C", (), text)()))
    state, dropped = rename_tensors(released.state_dict())
    theirs = sum(p.numel() for p in released.parameters())
    assert set(state) == set(ours.state_dict())
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in ours.parameters())
    dead = sum(released.state_dict()[k].numel() for k in dropped)
    assert sum(p.numel() for p in ours.parameters()) + dead == theirs
    assert abs(theirs - 3.42e9) / 3.42e9 < 0.005
