"""The fused closed form against the materialised reference, on raw tensors."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vif.injection import ImageSum, InjectionPlan, fused_correction, materialised_attention


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


# ---------------------------------------------------------------------- the runtime's plans
def layout_case(hkv=2, kv_len=12, seed=1):
    """Three samples as the runtime lays them out: two images with text between (slots 2-3 and
    6-7), one image (slots 5-7) after two padding slots, text only; padding entries at 12."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(3, 4, kv_len, 8, generator=g, dtype=torch.float64)
    key = torch.randn(3, hkv, kv_len, 8, generator=g, dtype=torch.float64)
    value = torch.randn(3, hkv, kv_len, 8, generator=g, dtype=torch.float64)
    positions = torch.tensor([[2, 3, 6, 7], [5, 6, 7, 12], [12] * 4])  # padding at the prompt's end
    pi = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.3, 0.2, 0.0], [0.0] * 4], dtype=torch.float64)
    mask = torch.ones(3, 1, kv_len, kv_len, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # left padding of sample 1
    real = torch.ones(3, kv_len, dtype=torch.bool)
    real[1, :2] = False
    return query, key, value, positions, pi, mask, real


def runtime_plan(positions, pi, real, rows_mode, alpha=0.5, kv_len=12, q_len=12, state=None):
    rows = torch.arange(kv_len - q_len, kv_len)[None].expand(3, -1)
    image = torch.zeros(3, kv_len + 1, dtype=torch.bool).scatter(1, positions.clamp(max=kv_len), True)[
        :, :kv_len
    ]
    inject = real[:, kv_len - q_len :] & torch.tensor([True, True, False])[:, None]
    if rows_mode == "text":
        inject = inject & ~image[:, kv_len - q_len :]
    # What build_layout derives: span (2, 8); inside (2, 7); gaps (3, 7) from sample 0.
    window, rows_from = ((2, 7), 2) if rows_mode == "all" else ((3, 7), 3)
    return InjectionPlan(pi, positions, rows, inject, alpha, (2, 8), window, state, rows_from)


@pytest.mark.parametrize("rows_mode", ["text", "all"])
@pytest.mark.parametrize("hkv", [1, 2])
def test_runtime_plans_equal_materialised_with_gradients(rows_mode, hkv):
    query, key, value, positions, pi, mask, real = layout_case(hkv=hkv)
    module = FakeAttention(4 // hkv)
    grads = []
    for path in ("fused", "derived", "materialised"):
        q, k, v, p = (t.clone().requires_grad_() for t in (query, key, value, pi))
        plan = runtime_plan(positions, p, real, rows_mode)
        if path == "derived":  # span and window found from the positions instead
            plan.span = plan.window = None
        if path == "materialised":
            out = materialised_attention(module, q, k, v, mask, plan, scaling=0.3)[0]
        else:
            base = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]
            out = fused_correction(base, v, plan)
            if path == "fused":
                assert torch.equal(out[~plan.inject], base[~plan.inject])  # untouched rows: bit-exact
        out = out[real]
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), q.grad, k.grad, v.grad, p.grad[pi > 0]))
    for fused in grads[:2]:
        for a, b in zip(fused, grads[2]):
            assert torch.allclose(a, b, atol=1e-12)


def test_in_place_blend_equals_the_copy():
    query, key, value, positions, pi, mask, real = layout_case()
    module = FakeAttention(2)
    with torch.no_grad():
        base = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)[0]
        copy = fused_correction(base, value, runtime_plan(positions, pi, real, "all"))
        same = fused_correction(base.clone(), value, runtime_plan(positions, pi, real, "all"), inplace=True)
    assert torch.equal(copy, same)


def test_decode_reads_no_cached_value_and_follows_row_reordering():
    """With the prompt's c kept, a decode step reads nothing of the cache: every cached value
    may be NaN. Reordering the batch rows (beam search) reorders the kept c with them."""
    query, key, value, positions, pi, mask, real = layout_case(kv_len=13)
    module = FakeAttention(2)
    state = ImageSum()
    prompt = (query[:, :, :12], key[:, :, :12], value[:, :, :12])
    base = sdpa_attention_forward(module, *prompt, mask[:, :, :12, :12], scaling=0.3)[0]
    fused_correction(base, prompt[2], runtime_plan(positions, pi, real[:, :12], "text", state=state))
    assert state.mean is not None

    order = torch.tensor([2, 0, 1])  # e.g. beam search moving row 2 to the front
    state.select(order)
    q, k, v, m, r = query[order], key[order], value[order], mask[order][:, :, 12:], real[order]
    plan = runtime_plan(positions[order], pi[order], r, "text", kv_len=13, q_len=1, state=state)
    step = sdpa_attention_forward(module, q[:, :, 12:], k, v, m, scaling=0.3)[0]
    poisoned = torch.full_like(v, float("nan"))
    out = fused_correction(step, poisoned, plan)
    reference, _ = materialised_attention(module, q[:, :, 12:], k, v, m, plan, scaling=0.3)
    assert torch.allclose(out, reference, atol=1e-12)


def test_half_precision_stays_within_its_rounding():
    query, key, value, positions, pi, mask, real = layout_case()
    module = FakeAttention(2)
    plan = runtime_plan(positions, pi.float(), real, "all")
    reference, _ = materialised_attention(module, query, key, value, mask, plan, scaling=0.3)
    q, k, v = (t.bfloat16() for t in (query, key, value))
    fused = fused_correction(sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0], v, plan)
    assert fused.dtype == torch.bfloat16
    assert torch.allclose(fused[real].double(), reference[real], atol=3e-2)


def test_in_place_blend_starts_at_the_first_row_it_can_change():
    """One image per sample, text rows: nothing before the first row after an image changes."""
    query, key, value, positions, pi, rows, inject = random_case()
    image = torch.zeros(2, 13, dtype=torch.bool).scatter(1, positions, True)[:, :12]
    inject &= ~image
    module = FakeAttention(2)
    # build_layout: span (2, 8), no gaps, first slot after every image of some sample: 6.
    plan = InjectionPlan(pi, positions, rows, inject, 0.5, (2, 8), (0, 0), ImageSum(), rows_from=6)
    with torch.no_grad():
        base = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)[0]
        fused = fused_correction(base.clone(), value, plan, inplace=True)
        reference, _ = materialised_attention(module, query, key, value, None, plan, scaling=0.3)
    assert torch.allclose(fused, reference, atol=1e-12)
    assert torch.equal(fused[:, :6], base[:, :6])
