"""The fused closed form against the materialised reference, on raw tensors."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vif.injection import InjectionPlan, fused_correction, materialised_attention


class FakeAttention(torch.nn.Module):
    """Only the attributes the attention functions read."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def random_case(batch=2, hq=4, hkv=2, q_len=12, kv_len=12, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, hq, q_len, dim, generator=g, dtype=torch.float64)
    key = torch.randn(batch, hkv, kv_len, dim, generator=g, dtype=torch.float64)
    value = torch.randn(batch, hkv, kv_len, dim, generator=g, dtype=torch.float64)
    # sample 0: image tokens 2..5; sample 1: image tokens 6, 7 (then padding entries).
    positions = torch.tensor([[2, 3, 4, 5], [6, 7, kv_len, kv_len]])
    pi = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.3, 0.0, 0.0]], dtype=torch.float64)
    rows = torch.arange(kv_len - q_len, kv_len)[None].repeat(batch, 1)
    inject = torch.ones(batch, q_len, dtype=torch.bool)
    return query, key, value, positions, pi, rows, inject


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_fused_equals_materialised_prefill(alpha, hkv):
    query, key, value, positions, pi, rows, inject = random_case(hkv=hkv)
    inject[0, 7] = False  # a row that is not injected stays exactly as the base computed it
    inject[1, :6] = False
    plan = InjectionPlan(pi, positions, rows, inject, alpha)
    module = FakeAttention(4 // hkv)
    base, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    fused = fused_correction(base, value, plan)
    reference, weights = materialised_attention(module, query, key, value, None, plan, scaling=0.3)
    assert torch.allclose(fused, reference.to(fused.dtype), atol=1e-12)
    assert torch.equal(fused[0, 7], base[0, 7])
    assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)))


def test_rows_before_the_image_and_padded_keys():
    query, key, value, positions, pi, rows, inject = random_case()
    # A bool padding mask: sample 1 is left-padded by 2 (columns 0, 1 invisible).
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False
    mask[1, :, :2, :] = False  # padding rows see nothing
    inject[1, :2] = False
    plan = InjectionPlan(pi, positions, rows, inject, 0.5)
    module = FakeAttention(2)
    base, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    fused = fused_correction(base, value, plan)
    reference, weights = materialised_attention(module, query, key, value, mask, plan, scaling=0.3)
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, :2] = False
    assert torch.allclose(fused[real], reference[real], atol=1e-12)
    # Rows before the first image token see no pi-mass: untouched.
    assert torch.equal(fused[0, :2], base[0, :2])
    # Mid-image rows see part of the map: row 3 of sample 0 sees tokens 2, 3 only.
    assert torch.allclose(weights[0, :, 3, 4:], torch.zeros_like(weights[0, :, 3, 4:]))


def test_decode_row_equals_last_prefill_row():
    """One query row at the end of the cache (decoding) takes the q_len == 1 branch."""
    query, key, value, positions, pi, rows, inject = random_case()
    module = FakeAttention(2)
    plan = InjectionPlan(pi, positions, rows, inject, 0.5)
    full = fused_correction(
        sdpa_attention_forward(module, query, key, value, None, scaling=0.3)[0], value, plan
    )
    plan1 = InjectionPlan(pi, positions, rows[:, -1:], inject[:, -1:], 0.5)
    q1 = query[:, :, -1:]
    one = fused_correction(sdpa_attention_forward(module, q1, key, value, None, scaling=0.3)[0], value, plan1)
    ref, _ = materialised_attention(module, q1, key, value, None, plan1, scaling=0.3)
    assert torch.allclose(one, full[:, -1:], atol=1e-12)
    assert torch.allclose(one, ref, atol=1e-12)
    # The image span (slots 2..7 hold every image token) is all decoding needs to read.
    spanned = InjectionPlan(pi, positions, rows[:, -1:], inject[:, -1:], 0.5, span=(2, 8))
    value_outside_nan = value.clone()
    value_outside_nan[:, :, :2] = float("nan")
    value_outside_nan[:, :, 8:] = float("nan")
    base_one = sdpa_attention_forward(module, q1, key, value, None, scaling=0.3)[0]
    assert torch.allclose(fused_correction(base_one, value_outside_nan, spanned), one, atol=1e-12)


def test_gradients_match():
    query, key, value, positions, pi, rows, inject = random_case(hkv=2)
    module = FakeAttention(2)
    grads = []
    for path in ("fused", "materialised"):
        q, k, v, p = (t.clone().requires_grad_() for t in (query, key, value, pi))
        plan = InjectionPlan(p, positions, rows, inject, 0.5)
        if path == "fused":
            out = fused_correction(sdpa_attention_forward(module, q, k, v, None, scaling=0.3)[0], v, plan)
        else:
            out = materialised_attention(module, q, k, v, None, plan, scaling=0.3)[0]
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([t.grad for t in (q, k, v, p)])
    for a, b in zip(grads[0][:3], grads[1][:3]):
        assert torch.allclose(a, b, atol=1e-10)
    # pi's gradient on real image tokens (padding entries are zero by construction and
    # get whatever gradient the clamped index gives them).
    real = positions < 12
    assert torch.allclose(grads[0][3][real], grads[1][3][real], atol=1e-10)
