"""`VIFConfig`: every knob of the VIF method, with the released recipe's defaults.

A config is plain data: it can be written to / read from JSON, validated against a
backbone (layer indices in range, hidden size), and built from a named preset.
Section numbers refer to the method specification (VIF_METHOD.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "vif_config.json"

# The paper's pairs for a 32-layer LLM (LLaVA-1.5-7B / Vicuna-7B), section 3.
PAPER_EXTRACT_LAYERS = (11, 13, 15, 17)
PAPER_INJECT_LAYERS = (25, 27, 29, 31)
PAPER_DEPTH = 32

# What the released code does where the spec recommends otherwise (docs/fidelity.md): the
# `released` preset and `vif convert-authors` set these on top of the released module.
RELEASED_BEHAVIOUR: dict[str, Any] = {
    "normalisation": "softmax",
    "grid_coords": "linspace",
    "inject_decode": False,
    "sample_at_inference": True,
}


# The paper's (and the released code's) values of the options this project added to learn where to
# look (docs/presets.md, "departures from the paper"). The "paper" and "released" presets and
# `vif convert-authors` use them; a vif_config.json saved before a field existed is read with them.
PAPER_METHOD: dict[str, Any] = {
    "alpha": 0.5,
    "centers": "linear",
    "min_sigma": 0.035,
    "min_sigma_unit": "image",
    "evidence_weight": 0.0,
    "vision_features": "extraction",
    "detach_input": False,
    "salience": "tokens",
}
# (evidence_features / _pool / _reader / _readout / _size only matter with evidence_weight > 0.)
# Fields added after the first saved format, with the value that reproduces a module saved before.
LEGACY_VALUES: dict[str, Any] = {
    **{k: v for k, v in PAPER_METHOD.items() if k != "min_sigma"},
    "map_source": "attender",
    "attender": "vif",
    "init": "vif",
}


class VIFConfigError(ValueError):
    """A VIF configuration that cannot work; the message names the field and the fix."""


@dataclass
class VIFConfig:
    """Configuration of the VIF module and of how it is wired into a backbone.

    Layer indices are 0-based decoder layers of the language model; the hidden state
    of layer ``e`` is that layer's output.
    """

    # --- wiring (section 3) -------------------------------------------------------
    extract_layers: list[int] = field(default_factory=lambda: list(PAPER_EXTRACT_LAYERS))
    inject_layers: list[int] = field(default_factory=lambda: list(PAPER_INJECT_LAYERS))
    # The injection's weight: A' = (1 - alpha) A + alpha pi on the image (paper: 0.5). vif: 0.8, so that
    # the LLM leans on a map that is right (docs/looking.md).
    alpha: float = 0.8
    # "fused": closed form on top of the base attention (no q x kv matrix);
    # "materialised": eager reference that builds A' explicitly.
    injection: str = "fused"
    inject_rows: str = "text"  # "text": non-vision rows only; "all": the Full-Seq ablation
    inject_decode: bool = True  # False: the released code's prefill-only behaviour

    # --- the probabilistic attender (section 4) -----------------------------------
    # "vif": ours (LayerNorm on the attended stream of each cross-attention and on the slot
    # queries); "released": the authors' module exactly (docs/fidelity.md).
    attender: str = "vif"
    # "vif": PyTorch's defaults, the GMM head's own init, slots N(0, 1/Dz); "released": the
    # released run's (every nn.Linear N(0, 0.02) with zero bias, q/k/v xavier_uniform as one
    # nn.MultiheadAttention in_proj with zero bias, slots N(0, 1)).
    init: str = "vif"
    hidden_size: int | None = None  # LLM hidden size D; filled from the backbone on attach
    latent_size: int = 4096  # Dz
    num_encoder_layers: int = 3  # Nenc
    num_heads: int = 4  # Hz
    ffn_size: int = 16384  # Dff
    num_components: int = 16  # K Gaussian components = latent slots
    logvar_clamp: float = 5.0
    use_posterior: bool = True  # False: the "w/o AP" ablation
    sample_at_inference: bool = False  # True: the released code's stochastic inference

    # --- spatial GMM decoding (section 5) -----------------------------------------
    min_sigma: float = 0.25  # the smallest spread, in units of min_sigma_unit (paper: 0.035 of the image)
    normalisation: str = "sum"  # "sum": M / sum M (paper); "softmax": released code
    grid_coords: str = "centers"  # "centers": (i + 0.5) / W; "linspace": linspace(0, 1, W)

    # --- learning where to look (this project's additions; docs/presets.md, departures) --
    # "linear": centre = sigmoid(W_c z) (paper); "attention": z attends over the encoded image
    # tokens and the centre is the attention-weighted mean of their coordinates (soft-argmax).
    centers: str = "attention"
    # "image": min_sigma in image widths (paper); "token": in tokens of each image's grid.
    min_sigma_unit: str = "token"
    # What the centres' salience term reads (centers="attention"): "evidence", the evidence reader's
    # hidden features of each image token (what it reads the answer from), so the map can point wherever
    # the reader can read; "distilled", the same features, and the term also learns to match the reader's
    # own map (where it finds any of the batch's answers), so the prior finds evidence without the answer;
    # "tokens", the branch's encoded image tokens (also used without the evidence head).
    salience: str = "distilled"
    # Answer-evidence loss: the map pools per-token image features, a small head reads the answer's
    # tokens from the pooled vector through the LM's own output embeddings. 0 turns it off (paper).
    evidence_weight: float = 3.0
    # Features the map pools for it: "encoder", the vision encoder's output at each image token (before
    # a projector into the LLM, if the backbone has one); "embeddings", the LLM's input there; both are
    # local to their patch. "extraction": layer e's hidden states (already mixed across patches).
    evidence_features: str = "encoder"
    # What pools the features for it: "map", the rendered Gaussian mixture; "locator", the components'
    # attention over the image tokens (centers="attention"), which reaches every token, not only those
    # under the current Gaussians.
    evidence_pool: str = "locator"
    # How the head reads: "pooled", one prediction from the pooled features (over the vocabulary);
    # "tokens", every image token predicts the answer alone and the pool mixes their likelihoods;
    # "logsumexp", every image token scores every answer and an answer's score for the image is the
    # pool-weighted log-sum-exp of its tokens' scores (a token may show no answer at all).
    evidence_reader: str = "logsumexp"
    # What scores an answer token: "lm_head", the LM's own output embeddings (detached); "learned", an
    # embedding table of the module's own (vocab_size x evidence_size), which does not inherit the LM
    # head's confusions (a base that answers "purple" for blue and green has nearly equal rows for them).
    evidence_readout: str = "learned"
    evidence_size: int = 128  # width of the "learned" answer embeddings
    vocab_size: int | None = None  # the LM's vocabulary; filled on attach when evidence_readout="learned"
    # What the attender's vision stream reads: "extraction", layer e's hidden states at the image tokens
    # (paper); "extraction+embeddings" / "extraction+encoder", plus the LLM's input / the vision
    # encoder's output there (per-patch features, not yet mixed by the LLM).
    vision_features: str = "extraction+embeddings"
    encoder_size: int | None = None  # width of the vision encoder's output; filled on attach when read
    detach_input: bool = True  # the attender reads detached hidden states: its losses never reach the LLM
    # "attender": the map VIF learns; "boxes": a ground-truth map, uniform over the image tokens that
    # overlap each sample's `evidence_box` (an upper bound for experiments; needs boxes at inference).
    map_source: str = "attender"

    # --- losses (section 7) -------------------------------------------------------
    kl_weight: float = 0.1  # beta
    sparsity_weight: float = 0.1  # gamma
    entropy_weight: float = 1.0  # lambda_ent
    volume_weight: float = 1.0  # lambda_vol
    volume: str = "sigma2"  # "sigma2": mean_k sigma_k^2 (released); "weighted": sum_k w_k sigma_k^2 (paper)
    loss_pairs: str = "all"  # "all": average KL/sparsity over pairs; "first": released code

    def __post_init__(self) -> None:
        self.extract_layers = [int(i) for i in self.extract_layers]
        self.inject_layers = [int(i) for i in self.inject_layers]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, num_layers: int | None = None) -> None:
        """Checks the config on its own and, given ``num_layers``, against a backbone."""
        choices = {
            "attender": ("vif", "released"),
            "init": ("vif", "released"),
            "injection": ("fused", "materialised"),
            "inject_rows": ("text", "all"),
            "normalisation": ("sum", "softmax"),
            "grid_coords": ("centers", "linspace"),
            "volume": ("sigma2", "weighted"),
            "loss_pairs": ("all", "first"),
            "centers": ("linear", "attention"),
            "min_sigma_unit": ("image", "token"),
            "salience": ("tokens", "evidence", "distilled"),
            "evidence_features": ("embeddings", "encoder", "extraction"),
            "map_source": ("attender", "boxes"),
            "evidence_pool": ("map", "locator"),
            "evidence_reader": ("pooled", "tokens", "logsumexp"),
            "evidence_readout": ("lm_head", "learned"),
            "vision_features": ("extraction", "extraction+embeddings", "extraction+encoder"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise VIFConfigError(f"VIFConfig.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if len(self.extract_layers) != len(self.inject_layers):
            raise VIFConfigError(
                f"extract_layers has {len(self.extract_layers)} entries but inject_layers has "
                f"{len(self.inject_layers)}: give one extraction layer per injection layer."
            )
        if self.evidence_weight > 0 and self.evidence_pool == "locator" and self.centers != "attention":
            raise VIFConfigError(
                "evidence_pool='locator' pools with the components' attention over the image tokens, which "
                "only centers='attention' has; set centers='attention' or evidence_pool='map'."
            )
        if not self.extract_layers:
            raise VIFConfigError("VIFConfig needs at least one (extract_layers, inject_layers) pair.")
        if len(set(self.inject_layers)) != len(self.inject_layers):
            raise VIFConfigError(
                f"inject_layers {self.inject_layers} repeats a layer; each layer injects once."
            )
        for e, d in zip(self.extract_layers, self.inject_layers):
            if min(e, d) < 0:
                raise VIFConfigError(f"layer pair ({e} -> {d}) has a negative index; layers are 0-based.")
            if e >= d:
                raise VIFConfigError(
                    f"extraction layer {e} is not before its injection layer {d}: the map must be "
                    "computed before the layer that uses it (need extract < inject)."
                )
        if num_layers is not None:
            bad = [i for i in self.extract_layers + self.inject_layers if i >= num_layers]
            if bad:
                raise VIFConfigError(
                    f"layer indices {bad} are out of range for a language model with {num_layers} decoder "
                    f"layers (valid: 0..{num_layers - 1}). Use VIFConfig.preset(name, model) to scale the "
                    "paper's pairs to this depth, or pass explicit lists."
                )
        if not 0.0 <= self.alpha <= 1.0:
            raise VIFConfigError(f"alpha={self.alpha} is outside [0, 1]; it is a mixing weight.")
        for name in (
            "latent_size",
            "num_encoder_layers",
            "num_heads",
            "ffn_size",
            "num_components",
            "evidence_size",
        ):
            if getattr(self, name) < 1:
                raise VIFConfigError(f"VIFConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.latent_size % self.num_heads:
            raise VIFConfigError(
                f"latent_size={self.latent_size} is not divisible by num_heads={self.num_heads}."
            )
        if self.min_sigma <= 0:
            raise VIFConfigError(f"min_sigma must be > 0, got {self.min_sigma}.")
        for name in ("kl_weight", "sparsity_weight", "entropy_weight", "volume_weight", "evidence_weight"):
            if getattr(self, name) < 0:
                raise VIFConfigError(f"VIFConfig.{name} must be >= 0, got {getattr(self, name)}.")

    @property
    def token_sources(self) -> set[str]:
        """Which per-token image features besides layer e the attender reads: "embeddings", "encoder"."""
        sources = {self.vision_features.removeprefix("extraction").removeprefix("+")} - {""}
        if self.evidence_weight > 0 and self.evidence_features != "extraction":
            sources.add(self.evidence_features)
        return sources

    def feature_size(self, source: str) -> int:
        """Width of a per-token feature source ("embeddings" / "extraction": the LLM's, "encoder")."""
        size = self.encoder_size if source == "encoder" else self.hidden_size
        if size is None:
            raise VIFConfigError(
                f"VIFConfig.{'encoder_size' if source == 'encoder' else 'hidden_size'} is unset; attach the "
                "config to its model (vif.attach) or build it with VIFConfig.preset(name, model)."
            )
        return size

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.extract_layers, self.inject_layers))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VIFConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VIFConfigError(f"unknown VIFConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VIFConfig:
        return cls.from_dict(json.loads(text))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> VIFConfig:
        path = Path(directory)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"no {CONFIG_NAME} at {path}; is this a directory written by save_pretrained?"
            )
        return cls.from_dict({**LEGACY_VALUES, **json.loads(path.read_text())})

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, model_or_config: Any, **overrides: Any) -> VIFConfig:
        """A named recipe sized for a backbone.

        * ``"paper"``: the released recipe (section 4): latent width = LLM hidden size,
          FFN 4x, 3 encoder blocks, 4 heads, K = 16, the paper's layer pairs scaled to
          the model's depth; the released module and its training (``attender``,
          ``init`` = ``"released"``, ``loss_pairs="first"``). Map, grid and decoding keep
          the spec's recommendations (docs/fidelity.md says why).
        * ``"released"``: ``"paper"`` plus the released code's map, grid and decoding
          (:data:`RELEASED_BEHAVIOUR`): what ``vif convert-authors`` writes.
        * ``"compact"``: this project's small module with this project's method (the
          dataclass defaults: the map learned with the answer-evidence head, docs/demo.md):
          latent width = D / 4 (at least 32), FFN 4x latent, 2 encoder blocks, 8 heads (fewer
          if the width is small), K = 16, same layer pairs. On LLaVA-1.5-7B it has 134 M
          parameters (4.4 % of the paper preset) - see docs/presets.md.
        * ``"large"``: this project's method at the paper's size (latent width = D, FFN 4x,
          3 blocks, 4 heads, K = 16).

        ``model_or_config`` is a transformers model or config (only its text config's
        ``hidden_size`` and ``num_hidden_layers`` are read). ``overrides`` replace fields.
        """
        hidden, depth = _text_dims(model_or_config)
        explicit = "extract_layers" in overrides and "inject_layers" in overrides
        extract, inject = (None, None) if explicit else scaled_paper_pairs(depth)
        if name in ("paper", "released"):
            values = dict(
                latent_size=hidden,
                ffn_size=4 * hidden,
                num_encoder_layers=3,
                num_heads=4,
                num_components=16,
                attender="released",
                init="released",
                loss_pairs="first",  # the released training adds the first pair's KL / sparsity only
                **PAPER_METHOD,
            )
            if name == "released":
                values.update(RELEASED_BEHAVIOUR)
        elif name == "large":
            values = dict(
                latent_size=hidden, ffn_size=4 * hidden, num_encoder_layers=3, num_heads=4, num_components=16
            )
        elif name == "compact":
            latent = max(32, hidden // 4)
            heads = 8 if latent % 8 == 0 and latent >= 256 else 4
            values = dict(
                latent_size=latent,
                ffn_size=4 * latent,
                num_encoder_layers=2,
                num_heads=heads,
                num_components=16,
            )
        else:
            raise VIFConfigError(
                f"unknown preset {name!r}; known presets: 'paper', 'released', 'compact', 'large'."
            )
        values.update(hidden_size=hidden, extract_layers=extract, inject_layers=inject)
        values.update(overrides)
        config = cls(**values)
        # Sizes the project's options read off the backbone (attach fills them too).
        if "encoder" in config.token_sources and config.encoder_size is None:
            config.encoder_size = _encoder_width(model_or_config, hidden)
        if config.evidence_weight > 0 and config.evidence_readout == "learned" and config.vocab_size is None:
            config.vocab_size = _vocab_size(model_or_config)
        config.validate(num_layers=depth)
        return config


def scaled_paper_pairs(depth: int) -> tuple[list[int], list[int]]:
    """The paper's pairs (11,13,15,17) -> (25,27,29,31) for 32 layers, scaled to ``depth``.

    Each index keeps its distance from the *end* of the network in proportion to depth
    (injection layers end at the last layer, as in the paper), and indices are made
    distinct and strictly ordered. For depth 32 this is the paper's default; for
    Qwen2.5-7B's 28 layers it gives (9, 11, 13, 15) -> (22, 23, 25, 27).
    """
    # Four distinct injection layers, each after its extraction layer, need at least 5 layers.
    if depth < 5:
        raise VIFConfigError(
            f"a language model with {depth} layers is too shallow for VIF's four default pairs (needs 5+); "
            "pass explicit extract_layers / inject_layers."
        )

    def scale(i: int) -> int:
        from_end = PAPER_DEPTH - 1 - i
        return depth - 1 - round(from_end * depth / PAPER_DEPTH)

    extract = [scale(i) for i in PAPER_EXTRACT_LAYERS]
    inject = [scale(i) for i in PAPER_INJECT_LAYERS]
    # In shallow models rounding can merge neighbours; keep injection layers distinct
    # (extraction layers may repeat - the attender simply runs twice on one layer).
    for k in range(len(inject) - 2, -1, -1):
        inject[k] = min(inject[k], inject[k + 1] - 1)
    for k in range(len(extract)):
        extract[k] = max(0, min(extract[k], inject[k] - 1))
    return extract, inject


def _encoder_width(model_or_config: Any, hidden: int) -> int:
    """Width of the vision encoder's output where the LLM reads it: LLaVA-style models feed a projector
    the CLIP features of ``vision_feature_layer`` (one layer or several, concatenated); models whose
    vision encoder ends in the LLM's width (Qwen2-VL's merger) hand over ``hidden`` directly."""
    config = getattr(model_or_config, "config", model_or_config)
    layer = getattr(config, "vision_feature_layer", None)
    vision = getattr(config, "vision_config", None)
    if layer is None or vision is None:
        return hidden
    return int(vision.hidden_size) * (len(layer) if isinstance(layer, list | tuple) else 1)


def _vocab_size(model_or_config: Any) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    text = getattr(config, "text_config", None) or config
    return int(text.vocab_size)


def _text_dims(model_or_config: Any) -> tuple[int, int]:
    config = getattr(model_or_config, "config", model_or_config)
    text = getattr(config, "text_config", None) or config
    try:
        return int(text.hidden_size), int(text.num_hidden_layers)
    except AttributeError as err:
        raise VIFConfigError(
            f"cannot read hidden_size / num_hidden_layers from {type(config).__name__}; pass a transformers "
            "vision-language model or its config."
        ) from err
