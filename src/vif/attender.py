"""The probabilistic attender (spec section 4): a conditional VAE over spatial slots.

Reads middle-layer hidden states of the LLM, split into vision tokens and text
tokens, and produces ``K`` latent slots. Two branches with the same architecture:

* prior     - vision + question tokens (all that is known at inference);
* posterior - vision + question + answer tokens (training only).

Both share the learned slot queries, the slot attention and the GMM head, so the
prior learns to put its slots where the posterior, which has seen the answer, puts
them. Padding inside a stream is masked everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VIFConfig
from .gmm import GMMHead, Mixture


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention with a key-padding mask, on SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """query ``(B, Lq, C)``, context ``(B, Lk, C)``, context_mask ``(B, Lk)`` bool (True = real token)."""
        b, lq, c = query.shape
        lk = context.shape[1]
        h = self.num_heads
        q = self.q_proj(query).view(b, lq, h, c // h).transpose(1, 2)
        k = self.k_proj(context).view(b, lk, h, c // h).transpose(1, 2)
        v = self.v_proj(context).view(b, lk, h, c // h).transpose(1, 2)
        # A sample whose context stream is empty would give an all-masked softmax (NaN);
        # let it attend to its padding and zero the result instead.
        has_context = context_mask.any(-1)
        mask = context_mask | ~has_context[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        out = self.o_proj(out.transpose(1, 2).reshape(b, lq, c))
        return out * has_context[:, None, None].to(out.dtype)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class EncoderBlock(nn.Module):
    """One two-stream block: self-attention in each stream, cross-attention both ways, FFNs.

    Pre-LayerNorm with residuals everywhere. In a cross-attention the querying stream is
    normalised; with ``context_norm=True`` (ours) so is the attended stream, with
    ``False`` (``attender="released"``) it is attended as the raw residual stream, as in
    the released module (no weight setting turns one into the other).

    Only the vision stream leaves the encoder (the slots read it), so in the *last*
    block the text stream's tail (text-queries-vision and the text FFN) could never
    influence anything. The released recipe instantiates it anyway; we do not
    (``last=True``), which keeps every parameter trained - DDP needs that - and drops
    about 0.4 B dead parameters from the paper preset (docs/presets.md).
    """

    def __init__(
        self, dim: int, num_heads: int, ffn: int, last: bool = False, context_norm: bool = True
    ) -> None:
        super().__init__()
        self.last = last

        def context() -> nn.Module:  # the norm on a cross-attention's attended stream
            return nn.LayerNorm(dim) if context_norm else nn.Identity()

        self.norm_v_self, self.attn_v_self = nn.LayerNorm(dim), MultiHeadAttention(dim, num_heads)
        self.norm_t_self, self.attn_t_self = nn.LayerNorm(dim), MultiHeadAttention(dim, num_heads)
        self.norm_v_cross, self.norm_t_ctx = nn.LayerNorm(dim), context()
        self.attn_v_to_t = MultiHeadAttention(dim, num_heads)
        self.norm_v_ffn, self.ffn_v = nn.LayerNorm(dim), FeedForward(dim, ffn)
        if not last:
            self.norm_t_cross, self.norm_v_ctx = nn.LayerNorm(dim), context()
            self.attn_t_to_v = MultiHeadAttention(dim, num_heads)
            self.norm_t_ffn, self.ffn_t = nn.LayerNorm(dim), FeedForward(dim, ffn)

    def forward(
        self, v: torch.Tensor, t: torch.Tensor, v_mask: torch.Tensor, t_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """v ``(B, Nv, C)``, t ``(B, Nt, C)``; masks ``(B, Nv)``, ``(B, Nt)`` bool."""
        x = self.norm_v_self(v)
        v = v + self.attn_v_self(x, x, v_mask)
        x = self.norm_t_self(t)
        t = t + self.attn_t_self(x, x, t_mask)
        v = v + self.attn_v_to_t(self.norm_v_cross(v), self.norm_t_ctx(t), t_mask)
        if not self.last:
            t = t + self.attn_t_to_v(self.norm_t_cross(t), self.norm_v_ctx(v), v_mask)
            t = t + self.ffn_t(self.norm_t_ffn(t))
        v = v + self.ffn_v(self.norm_v_ffn(v))
        return v, t


class Branch(nn.Module):
    """Prior or posterior encoder: LLM hidden states -> encoded vision tokens, and latent heads."""

    def __init__(self, config: VIFConfig) -> None:
        super().__init__()
        d, dz = config.hidden_size, config.latent_size
        self.vision_in = nn.Linear(d, dz)
        # Per-patch features at the image tokens, not yet mixed by the LLM (VIFConfig.vision_features).
        extra = config.vision_features.removeprefix("extraction").removeprefix("+")
        self.embeddings_in = None
        if extra:  # normalised first: a vision encoder's output has its own scale
            size = config.feature_size(extra)
            self.embeddings_in = nn.Sequential(nn.LayerNorm(size), nn.Linear(size, dz))
        self.text_in = nn.Linear(d, dz)
        n, context_norm = config.num_encoder_layers, config.attender == "vif"
        self.blocks = nn.ModuleList(
            EncoderBlock(dz, config.num_heads, config.ffn_size, last=i == n - 1, context_norm=context_norm)
            for i in range(n)
        )
        self.vision_norm = nn.LayerNorm(dz)
        self.mu = nn.Linear(dz, dz)
        self.logvar = nn.Linear(dz, dz)

    def encode(
        self,
        vision: torch.Tensor,
        text: torch.Tensor,
        v_mask: torch.Tensor,
        t_mask: torch.Tensor,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """vision ``(B, Nv, D)``, text ``(B, Nt, D)`` -> encoded vision ``(B, Nv, Dz)``.

        ``embeddings (B, Nv, De)``: per-patch features at the image tokens (the LLM's input or the vision
        encoder's output), added to the vision stream when ``vision_features`` names them.
        """
        v, t = self.vision_in(vision), self.text_in(text)
        if self.embeddings_in is not None:
            if embeddings is None:
                raise ValueError("this branch reads per-token image features (VIFConfig.vision_features)")
            v = v + self.embeddings_in(embeddings)
        for block in self.blocks:
            v, t = block(v, t, v_mask, t_mask)
        return self.vision_norm(v)


@dataclass
class Latent:
    """Gaussian over the slots of one branch: mu, logvar ``(B, K, Dz)``.

    ``tokens``: the branch's encoded image tokens ``(B, Nv, Dz)``, which ``centers="attention"``
    locates the components on.
    """

    mu: torch.Tensor
    logvar: torch.Tensor
    tokens: torch.Tensor | None = None

    def sample(
        self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mu + sigma * eps``; ``eps`` is ``noise`` ``(B, K, Dz)`` when given, else drawn from ``generator``."""
        if noise is None:
            noise = torch.randn(
                self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype
            )
        return self.mu + torch.exp(0.5 * self.logvar) * noise.to(self.mu.dtype)


def seeded_noise(seeds: list[int], stream: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normal noise ``(len(seeds), *shape)``, row ``b`` a function of ``(seeds[b], stream)`` only.

    Drawn in fp32 on the CPU, so a sample's noise does not depend on its batch, its process,
    the device or the dtype (data-parallel runs then match the one-process run).
    """
    rows = []
    generator = torch.Generator()
    for seed in seeds:
        generator.manual_seed(hash((seed, stream)) & 0x7FFF_FFFF_FFFF_FFFF)  # int-tuple hashes are stable
        rows.append(torch.randn(shape, generator=generator))
    return torch.stack(rows).to(device)


def gaussian_kl(q: Latent, p: Latent) -> torch.Tensor:
    """``KL(q || p)`` of diagonal Gaussians, elementwise, averaged over all elements -> scalar."""
    lq, lp = q.logvar.float(), p.logvar.float()
    kl = 0.5 * (lp - lq + (lq.exp() + (q.mu.float() - p.mu.float()).pow(2)) / lp.exp() - 1.0)
    return kl.mean()


class EvidenceHead(nn.Module):
    """Reads the answer from what the map points at: the answer-evidence loss.

    The map ``pi`` pools per-token image features into one vector per sample; a LayerNorm and
    a linear map take it to the LLM's hidden size, and the LM's own output embeddings
    (``lm_head``, detached: this loss never trains the LLM) score every vocabulary token. The
    loss is the cross-entropy of the answer's tokens (a bag of words). It gives the map a direct
    signal from the first step: the pooled features predict the answer only when the map
    covers the patches that show it. Without it the only signal is the LM loss through the
    injection, which is flat until the LLM has learned to use a map (docs/demo.md).
    """

    def __init__(
        self,
        feature_size: int,
        hidden_size: int,
        reader: str = "pooled",
        vocab_size: int | None = None,
        answer_size: int = 128,
    ) -> None:
        super().__init__()
        self.reader = reader
        self.norm = nn.LayerNorm(feature_size)
        # vocab_size given: answer tokens are scored with an embedding table of the module's own.
        self.answers = nn.Embedding(vocab_size, answer_size) if vocab_size is not None else None
        width = hidden_size if self.answers is None else answer_size
        # Two layers: whether a patch shows the answer is not a linear function of its features.
        self.proj = nn.Sequential(nn.Linear(feature_size, width), nn.GELU(), nn.Linear(width, width))

    def trunk(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, N, width)``: the reader's hidden features of each token (what it reads the answer from)."""
        return self.proj[1](self.proj[0](self.norm(features)))

    def forward(
        self,
        pi: torch.Tensor,
        features: torch.Tensor,
        readout: torch.Tensor | None,
        answers: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens -> scalar.

        pi ``(B, Nv)`` the pooling weights (0 on padding), features ``(B, Nv, D)`` per image token,
        readout ``(V, D)`` the LM's output embeddings (None: the head's own table), answers ``(B, A)`` token ids, -100 where
        there is none (samples without answer tokens contribute nothing), valid ``(B, Nv)`` bool.
        """
        if self.answers is not None:
            readout = self.answers.weight
        if self.reader == "tokens":
            return self.token_reader(pi, features, readout, answers, valid)
        if self.reader == "logsumexp":
            return self.logsumexp_reader(pi, features, readout, answers, valid)
        return self.pooled_reader(pi, features, readout, answers)

    def token_reader(
        self,
        pi: torch.Tensor,
        features: torch.Tensor,
        readout: torch.Tensor,
        answers: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Each image token reads the answer on its own; ``pi`` mixes their likelihoods.

        ``-log sum_j pi_j p_j(answer token)``, over the batch's answer tokens as candidates. The
        gradient raises ``pi_j`` exactly where token ``j`` alone explains the answer (attention
        multiple-instance learning), so every token gets a signal from the first step.
        """
        has = answers >= 0
        logits, index = self.candidate_scores(features, readout, answers)
        log_p = torch.log_softmax(logits, dim=-1)  # (B, N, U)
        picked = log_p.gather(2, index[:, None, :].expand(-1, log_p.shape[1], -1))  # (B, N, A)
        log_pi = pi.float().clamp_min(torch.finfo(torch.float32).tiny).log()
        mixed = torch.logsumexp(picked + log_pi[..., None], dim=1)  # (B, A)
        # The reader also learns on every token alone, with the answer as each token's label (a noisy
        # label: most tokens do not show it). This term does not depend on the map, so the reader
        # learns to read tokens the map does not point at yet; without it map and reader lock onto
        # the first answers they learn. (A flat pool, -log mean_j p_j, dilutes the few tokens that
        # show the answer among all the others and taught the reader only some colours.)
        flat = (picked * valid[..., None]).sum(1) / valid.sum(-1, keepdim=True).clamp_min(1)  # (B, A)
        return -((mixed + flat) * has).sum() / has.sum().clamp_min(1)

    def logsumexp_reader(
        self,
        pi: torch.Tensor,
        features: torch.Tensor,
        readout: torch.Tensor,
        answers: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Each image token scores every candidate answer; the image's score for an answer is
        ``log sum_j pi_j exp(s_j(answer))``, read with a softmax over the candidates.

        Unlike ``"tokens"``, a token is not made to name some answer: a background token scores every
        answer low and drops out of the sum, so the few tokens that show the answer carry the loss
        (log-sum-exp pooling, as in weakly supervised localisation). The gradient raises ``pi_j``
        where token ``j`` scores the answer above the others. A second, map-independent term pools
        all valid tokens alike, so the reader learns on tokens the map does not point at yet.
        """
        has = answers >= 0
        scores, index = self.candidate_scores(features, readout, answers)
        tiny = torch.finfo(torch.float32).tiny
        loss = 0.0
        # The map-weighted term trains the map only: through it, a map that points at the background
        # would teach the reader to name the answer from background tokens (noise it can memorise).
        for weights, s in ((pi.float() * valid, scores.detach()), (valid.float(), scores)):
            log_w = weights.clamp_min(tiny).log().masked_fill(~valid, float("-inf"))
            image = torch.logsumexp(s + log_w[..., None], dim=1)  # (B, U)
            picked = torch.log_softmax(image, dim=-1).gather(1, index)  # (B, A)
            loss = loss - (picked * has).sum() / has.sum().clamp_min(1)
        return loss

    def answer_scores(
        self, features: torch.Tensor, readout: torch.Tensor, answers: torch.Tensor
    ) -> torch.Tensor:
        """``(B, N)``: how strongly each image token shows *any* of the batch's answers, the
        log-sum-exp of its scores over the candidate answer tokens (what ``salience="distilled"``
        teaches the centres' salience term, which must find the evidence without the answer).
        """
        if self.answers is not None:
            readout = self.answers.weight
        real = answers[answers >= 0][None]  # (1, K): only the batch's real answer tokens compete
        return torch.logsumexp(self.candidate_scores(features, readout, real)[0], dim=-1)

    def candidate_scores(
        self, features: torch.Tensor, readout: torch.Tensor, answers: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's score for every distinct answer token of the batch (the candidates).

        Returns ``(B, N, U)`` float32 scores and ``(B, A)`` each answer's index among the ``U``
        candidates (entries of ``answers`` below 0, "no answer", are read as token 0; callers mask
        them).
        """
        candidates, index = torch.unique(answers.clamp_min(0), return_inverse=True)  # (U,), (B, A)
        scores = torch.einsum(
            "bnd,ud->bnu", self.proj(self.norm(features)), readout[candidates].to(features.dtype)
        )
        return scores.float(), index

    def pooled_reader(
        self, pi: torch.Tensor, features: torch.Tensor, readout: torch.Tensor, answers: torch.Tensor
    ) -> torch.Tensor:
        """One prediction over the vocabulary from the ``pi``-pooled features."""
        pooled = torch.einsum("bn,bnd->bd", pi.to(features.dtype), features)
        logits = F.linear(self.proj(self.norm(pooled)), readout.to(pooled.dtype)).float()  # (B, V)
        log_probs = torch.log_softmax(logits, dim=-1)
        has = answers >= 0
        picked = log_probs.gather(1, answers.clamp_min(0)) * has
        return -picked.sum() / has.sum().clamp_min(1)


class ProbabilisticAttender(nn.Module):
    """The VIF module: prior and posterior branches, shared slots and GMM head."""

    def __init__(self, config: VIFConfig) -> None:
        super().__init__()
        if config.hidden_size is None:
            raise ValueError(
                "VIFConfig.hidden_size is unset; build the config with VIFConfig.preset(name, model)."
            )
        self.config = config
        dz = config.latent_size
        self.prior = Branch(config)
        self.posterior = Branch(config) if config.use_posterior else None
        self.slots = nn.Parameter(torch.randn(config.num_components, dz) * dz**-0.5)
        # The released module uses its slot queries as they are.
        self.slot_norm = nn.LayerNorm(dz) if config.attender == "vif" else nn.Identity()
        self.slot_attention = MultiHeadAttention(dz, config.num_heads)
        evidence_salience = config.salience != "tokens" and config.evidence_weight > 0
        salience_size = config.hidden_size if config.evidence_readout == "lm_head" else config.evidence_size
        self.gmm = GMMHead(dz, config.min_sigma, config.centers, salience_size if evidence_salience else None)
        if config.evidence_weight > 0 and config.evidence_readout == "learned" and config.vocab_size is None:
            raise ValueError(
                "VIFConfig.vocab_size is unset (evidence_readout='learned'); build the config with "
                "VIFConfig.preset(name, model) or attach it to its model."
            )
        self.evidence = (
            EvidenceHead(
                config.feature_size(config.evidence_features),
                config.hidden_size,
                config.evidence_reader,
                config.vocab_size if config.evidence_readout == "learned" else None,
                config.evidence_size,
            )
            if config.evidence_weight > 0
            else None
        )
        if config.init == "released":
            init_released_(self)

    def latent(
        self,
        branch: Branch,
        vision: torch.Tensor,
        text: torch.Tensor,
        v_mask: torch.Tensor,
        t_mask: torch.Tensor,
        embeddings: torch.Tensor | None = None,
    ) -> Latent:
        """One branch from hidden states to the slot Gaussians ``(B, K, Dz)``."""
        encoded = branch.encode(vision, text, v_mask, t_mask, embeddings)
        queries = self.slot_norm(self.slots).expand(vision.shape[0], -1, -1)
        slots = self.slot_attention(queries, encoded, v_mask)
        lim = self.config.logvar_clamp
        return Latent(branch.mu(slots), branch.logvar(slots).clamp(-lim, lim), encoded)

    def decode(
        self,
        z: torch.Tensor,
        latent: Latent | None = None,
        coords: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        floor: torch.Tensor | float | None = None,
        salience: torch.Tensor | None = None,
    ) -> Mixture:
        """Slots ``z (B, K, Dz)`` of ``latent``'s branch -> mixture (coords/valid: the image tokens').

        ``salience (B, N, S)``: features for the centres' salience term (default: the encoded tokens).
        """
        tokens = None if latent is None else latent.tokens
        return self.gmm(z, tokens, coords, valid, floor, salience)


def init_released_(attender: ProbabilisticAttender) -> None:
    """Re-initialises ``attender`` as the released run started (``VIFConfig.init="released"``).

    The released module is built by transformers' ``from_pretrained``, whose weight
    initialisation re-draws every ``nn.Linear`` (the attentions' output projections, the
    FFNs, the mu / logvar heads and the GMM head, whose own initialisation therefore never
    takes effect) from N(0, 0.02) with a zero bias. Its attentions are
    ``nn.MultiheadAttention``, whose q, k and v form one ``(3C, C)`` ``in_proj_weight``
    that is not an ``nn.Linear``: it keeps PyTorch's ``xavier_uniform_`` over the stacked
    matrix and a zero ``in_proj_bias``. Slot queries: N(0, 1). LayerNorms: weight 1, bias 0.
    """
    for module in attender.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in attender.modules():
        if isinstance(module, MultiHeadAttention):
            projections = (module.q_proj, module.k_proj, module.v_proj)
            stacked = torch.empty(
                3 * module.q_proj.out_features, module.q_proj.in_features, device=module.q_proj.weight.device
            )
            nn.init.xavier_uniform_(stacked)
            with torch.no_grad():
                for projection, weight in zip(projections, stacked.chunk(3)):
                    projection.weight.copy_(weight)
                    projection.bias.zero_()
    nn.init.normal_(attender.slots)
