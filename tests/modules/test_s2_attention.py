"""S²-Attn against an independent dense-mask float64 reference, and as a torchtune attention component."""

import copy
import math
import sys
import types

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torchtune.models.llama2 import llama2

import longlora_tune.modules.s2_attention as s2mod
from benchmarks.backend_check import check_backend
from longlora_tune.modules.s2_attention import (
    S2Attention,
    S2AttentionConfig,
    flash_attn_available,
    shifted_sparse_attention,
)
from longlora_tune.modules.s2_heads import shifted_heads

# --------------------------------------------------------------------------------------------------
# Independent reference: explicit [H, N, N] allowed pattern from the definitions, dense softmax.
# --------------------------------------------------------------------------------------------------


def s2_allowed(n: int, g: int, heads: int, wrap_around: bool) -> torch.Tensor:
    """Bool [heads, n, n]: may query i (row) see key j (column). The head split is shifted_heads (pinned by
    test_shifted_heads_is_longloras_split)."""
    qi = torch.arange(n)[:, None]
    kj = torch.arange(n)[None, :]
    causal = kj <= qi
    first = causal & (qi // g == kj // g)
    s = g // 2
    if wrap_around:
        # Paper Algorithm 1, built literally: rolled slot r holds original token (r + s) % n (torch.roll by
        # -s); in the rolled order attention is causal inside consecutive groups of g; map back.
        perm = (torch.arange(n) + s) % n
        second = torch.zeros(n, n, dtype=torch.bool)
        second[perm[:, None], perm[None, :]] = first
    else:
        second = causal & ((qi + s) // g == (kj + s) // g)
    unshifted = shifted_heads(heads).start
    return torch.stack([first] * unshifted + [second] * (heads - unshifted))


def dense_attention(q, k, v, allowed):
    """Softmax attention in float64; rows with no allowed key give zeros. allowed broadcasts to scores."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * allowed
    return probs @ v


def rand_qkv(b, h, n, d=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


def check_against_reference(
    b, h, n, g, kv_heads=None, *, wrap, backend, mask=None, block_mask=None, backward=True, start=0
):
    """S² of one random case equals the dense reference, forward and (optionally) the gradients.

    With ``kv_heads``, keys and values have that many heads and are expanded to the query heads as
    torchtune does (KV head j serves query heads j*r .. j*r+r-1), and the gradients are of the unexpanded
    ones: a KV head serving query heads on both sides of the split gets both sides' gradient. With
    ``start`` the inputs are the slice ``[start, start + n)`` of a longer sequence.
    """
    q, k, v = rand_qkv(b, h, n, seed=n * 100 + g + b)
    if kv_heads is not None:
        k, v = (x[:, :kv_heads].detach().requires_grad_() for x in (k, v))
    leaves = (q, k, v)
    if not backward:
        leaves = tuple(x.detach() for x in leaves)
    q, k, v = leaves
    if kv_heads is not None:
        k, v = (x.repeat_interleave(h // kv_heads, dim=1) for x in (k, v))
    allowed = s2_allowed(start + n, g, h, wrap)[None, :, start:, start:]
    if mask is not None:
        allowed = allowed & mask[:, None]
    out = shifted_sparse_attention(
        q,
        k,
        v,
        g,
        wrap_around=wrap,
        backend=backend,
        mask=block_mask if block_mask is not None else mask,
        start=start,
    )
    ref = dense_attention(q, k, v, allowed)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    if backward:
        w = torch.randn_like(ref)
        grads = torch.autograd.grad((out * w).sum(), leaves)
        ref_grads = torch.autograd.grad((ref * w).sum(), leaves)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# (batch, heads, seq, group): multiples and non-multiples of G, G > N, G = 2, N < G/2.
SHAPES = [
    (1, 2, 16, 4),
    (2, 4, 16, 8),
    (3, 2, 13, 4),
    (2, 6, 22, 8),
    (1, 8, 7, 4),
    (2, 4, 10, 16),
    (1, 2, 9, 2),
    (2, 2, 3, 8),
]
# Odd query-head counts (batch, heads, seq, group, KV heads): GQA with a KV head serving query heads on both
# sides of the split (9/3: KV head 1 serves heads 3 | 4, 5), a single KV head, one head (nothing unshifted),
# with N a multiple of G and not.
ODD_SHAPES = [
    (2, 9, 16, 4, 3),
    (2, 9, 13, 4, 3),
    (3, 3, 22, 8, 1),
    (2, 3, 12, 4, 3),
    (2, 1, 16, 8, 1),
    (2, 1, 9, 4, 1),
]


def test_shifted_heads_is_longloras_split():
    # LongLoRA's non-flash path shifts qkv[:, num_heads // 2:]: 9 heads = 4 unshifted + 5 shifted.
    assert shifted_heads(9) == slice(4, 9)
    assert shifted_heads(8) == slice(4, 8)
    assert shifted_heads(3) == slice(1, 3)
    assert shifted_heads(1) == slice(0, 1)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="at least one head"):
            shifted_heads(bad)


def test_reference_pattern_matches_listed_segments():
    # docs/reference.md (S²-Attn), N=16, G=4: shifted half groups [0,2) [2,6) [6,10) [10,14) [14,16).
    segs = [(0, 2), (2, 6), (6, 10), (10, 14), (14, 16)]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    for a, e in segs:
        expected[a:e, a:e] = torch.ones(e - a, e - a, dtype=torch.bool).tril()
    allowed = s2_allowed(16, 4, 2, wrap_around=False)
    assert torch.equal(allowed[1], expected)
    assert torch.equal(allowed[0], torch.block_diag(*[torch.ones(4, 4).tril()] * 4).bool())


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("shape", SHAPES + ODD_SHAPES)
def test_sdpa_matches_dense_reference_forward_backward(shape, wrap):
    check_against_reference(*shape, wrap=wrap, backend="sdpa")


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:5] + ODD_SHAPES)
def test_flex_matches_dense_reference(shape, wrap):
    # flex_attention has no CPU backward (even on a machine that has CUDA): the float64 forward is checked
    # here, the backward on CUDA below.
    check_against_reference(*shape, wrap=wrap, backend="flex", backward=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [4, 9])
def test_flex_forward_backward_on_cuda_match_float64_reference(dtype, heads):
    result = check_backend(
        "flex", dtype, torch.device("cuda"), batch=2, heads=heads, n=256, head_dim=16, group=64
    )
    assert result["ok"], result


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("start", [2, 3, 6])
@pytest.mark.parametrize("shape", [(2, 4, 12, 4), (2, 9, 12, 4, 3), (2, 1, 10, 4, 1)])
def test_slice_start_lays_out_groups_of_the_whole_sequence(shape, start, backend, masked):
    # A slice [start, start + n) of a longer sequence (context parallelism) gets the whole sequence's groups,
    # cut at the slice; start = G/2 (mid-group of the unshifted heads), an unaligned start, G + G/2.
    mask = torch.rand(shape[0], shape[2], shape[2], generator=torch.Generator().manual_seed(start)) < 0.7
    check_against_reference(
        *shape,
        wrap=False,
        backend=backend,
        start=start,
        mask=mask if masked else None,
        backward=backend == "sdpa",
    )


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("wrap", [False, True])
def test_random_dense_mask_is_anded(backend, wrap):
    b, h, n, g = 3, 4, 14, 4
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(b, n, n, generator=gen) < 0.6
    mask[1, 5] = False  # a query row with no allowed key must give zeros, not NaN
    check_against_reference(b, h, n, g, wrap=wrap, backend=backend, mask=mask, backward=backend == "sdpa")
    q, k, v = (x.detach() for x in rand_qkv(b, h, n))
    out = shifted_sparse_attention(q, k, v, g, wrap_around=wrap, mask=mask, backend=backend)
    assert torch.equal(out[1, :, 5], torch.zeros_like(out[1, :, 5]))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_batch_one_mask_broadcasts(backend):
    b, h, n, g = 2, 2, 12, 4
    mask = torch.rand(1, n, n, generator=torch.Generator().manual_seed(2)) < 0.7
    q, k, v = (x.detach() for x in rand_qkv(b, h, n))
    for wrap in (False, True):
        out = shifted_sparse_attention(q, k, v, g, wrap_around=wrap, mask=mask, backend=backend)
        ref = dense_attention(q, k, v, s2_allowed(n, g, h, wrap)[None] & mask[:, None])
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("n,g", [(16, 4), (13, 4), (20, 8)])
def test_default_form_is_causal(backend, n, g):
    q, k, v = (x.detach() for x in rand_qkv(2, 4, n))
    base = shifted_sparse_attention(q, k, v, g, backend=backend)
    for t in range(n - 1):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
        out = shifted_sparse_attention(q2, k2, v2, g, backend=backend)
        torch.testing.assert_close(out[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=1e-12)


def keys_seen(q, k, v, g, head, query, **kwargs):
    """Keys whose values influence one output row (by autograd), i.e. the keys that query attends."""
    v = v.detach().clone().requires_grad_()
    out = shifted_sparse_attention(q.detach(), k.detach(), v, g, **kwargs)
    (grad,) = torch.autograd.grad(out[0, head, query].sum(), v)
    return set(torch.nonzero(grad[0, head].abs().sum(-1)).flatten().tolist())


def test_wrap_around_leak_shape():
    # N=16, G=4: with the paper's roll, queries {0, 1} of the shifted heads see keys {14, 15} (the future).
    q, k, v = rand_qkv(1, 2, 16)
    assert keys_seen(q, k, v, 4, head=1, query=0, wrap_around=True) == {14, 15, 0}
    assert keys_seen(q, k, v, 4, head=1, query=1, wrap_around=True) == {14, 15, 0, 1}
    assert keys_seen(q, k, v, 4, head=1, query=15, wrap_around=True) == {14, 15}
    assert keys_seen(q, k, v, 4, head=0, query=1, wrap_around=True) == {0, 1}
    # Default form: no future keys, shifted groups [0,2) and [2,6).
    assert keys_seen(q, k, v, 4, head=1, query=0) == {0}
    assert keys_seen(q, k, v, 4, head=1, query=5) == {2, 3, 4, 5}
    assert keys_seen(q, k, v, 4, head=1, query=15) == {14, 15}


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_padded_batch_equals_each_sample_alone(backend):
    h, g, n = 4, 4, 15
    lengths = [15, 9, 6]
    q, k, v = (x.detach() for x in rand_qkv(len(lengths), h, n, seed=3))
    real = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # [b, n]
    pad_mask = real[:, :, None] & real[:, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    with_mask = shifted_sparse_attention(q, k, v, g, mask=pad_mask, backend=backend)
    no_mask = shifted_sparse_attention(q, k, v, g, backend=backend)
    for i, length in enumerate(lengths):
        alone = shifted_sparse_attention(
            q[i : i + 1, :, :length], k[i : i + 1, :, :length], v[i : i + 1, :, :length], g, backend=backend
        )
        torch.testing.assert_close(with_mask[i : i + 1, :, :length], alone, rtol=1e-12, atol=1e-12)
        # Right padding needs no mask in the no-wrap form: causality hides pad keys from real queries.
        torch.testing.assert_close(no_mask[i : i + 1, :, :length], alone, rtol=1e-12, atol=1e-12)
        assert torch.equal(with_mask[i, :, length:], torch.zeros_like(with_mask[i, :, length:]))


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    n = doc_ids.shape[-1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return same & torch.ones(n, n, dtype=torch.bool).tril()


@pytest.mark.parametrize("mask_kind", ["dense-sdpa", "dense-flex", "blockmask-auto"])
@pytest.mark.parametrize("wrap", [False, True])
def test_packed_documents(mask_kind, wrap):
    h, g, n = 4, 4, 18
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 4, [0] * 11 + [1] * 7])
    dense = document_mask(doc_ids)
    if mask_kind == "blockmask-auto":

        def doc_mod(b, hh, qi, ki):
            return (doc_ids[b, qi] == doc_ids[b, ki]) & (ki <= qi)

        mask, backend = create_block_mask(doc_mod, 2, None, n, n, device="cpu"), "auto"
    else:
        mask, backend = dense, mask_kind.split("-")[1]
    q, k, v = (x.detach() for x in rand_qkv(2, h, n, seed=5))
    out = shifted_sparse_attention(q, k, v, g, wrap_around=wrap, mask=mask, backend=backend)
    ref = dense_attention(q, k, v, s2_allowed(n, g, h, wrap)[None] & dense[:, None])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    # Perturbing document 1 of sample 0 leaves documents 0 and 2 of sample 0 unchanged.
    others = doc_ids[0] != 1
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[0, :, ~others] = torch.randn_like(x[0, :, ~others])
    out2 = shifted_sparse_attention(q2, k2, v2, g, wrap_around=wrap, mask=mask, backend=backend)
    torch.testing.assert_close(out2[0][:, others], out[0][:, others], rtol=0, atol=1e-12)
    torch.testing.assert_close(out2[1], out[1], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# flash-attn varlen path, run on CPU through an independent stand-in for flash_attn_varlen_func.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_flash(monkeypatch):
    calls = []

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal
    ):
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        bounds = cu_seqlens_q.tolist()
        calls.append((bounds, max_seqlen_q))
        out = torch.empty_like(q)
        for a, e in zip(bounds[:-1], bounds[1:]):
            assert 0 < e - a <= max_seqlen_q
            seg = [x[a:e].transpose(0, 1) for x in (q, k, v)]  # [heads, len, d]
            tril = torch.ones(e - a, e - a, dtype=torch.bool).tril()
            out[a:e] = dense_attention(*seg, tril).transpose(0, 1).to(q.dtype)
        return out

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)
    )
    monkeypatch.setattr(s2mod, "flash_attn_available", lambda: True)
    return calls


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 16, 4), (3, 4, 13, 4), (2, 2, 6, 16), *ODD_SHAPES[::2]])
def test_flash_varlen_layout_matches_reference(fake_flash, shape, wrap):
    # The stand-in is differentiable, so the packing's backward (reshapes, rolls) is checked too.
    check_against_reference(*shape, wrap=wrap, backend="flash")
    bounds, max_len = fake_flash[-1]
    assert bounds == sorted(bounds) and max_len == min(shape[3], shape[2])


@pytest.mark.parametrize("shape", [(2, 4, 12, 4), (2, 9, 13, 4, 3), (2, 1, 10, 4, 1)])
def test_flash_varlen_slice_start_matches_reference(fake_flash, shape):
    check_against_reference(*shape, wrap=False, backend="flash", start=6)


@pytest.mark.parametrize("heads", [2, 3])
def test_flash_cu_seqlens_from_positions_only(fake_flash, heads):
    q, k, v = rand_qkv(2, heads, 16)
    shifted_sparse_attention(q, k, v, 4, backend="flash")
    first, second = [0, 4, 8, 12], [0, 2, 6, 10, 14]
    # One varlen row per head set and sample for 2 heads, per head and sample for 3 (heads 1 and 2 shifted).
    row_bounds = [first] * 2 + [second] * (2 * heads - 2)
    want = [16 * row + x for row, bounds in enumerate(row_bounds) for x in bounds] + [16 * 2 * heads]
    assert fake_flash[-1] == (want, 4)


# --------------------------------------------------------------------------------------------------
# As a torchtune attention component
# --------------------------------------------------------------------------------------------------


def tiny_llama(max_seq_len=32, num_heads=4, num_kv_heads=2, embed_dim=32):
    torch.manual_seed(0)
    return llama2(
        vocab_size=64,
        num_layers=2,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
    ).double()


def install(model, group_size, config):
    for layer in model.layers:
        layer.attn._attention_call = S2Attention(group_size, config, layer.attn._attention_call)
    return model


def test_torchtune_model_eval_full_train_s2():
    g, n = 8, 24
    base = tiny_llama()
    patched = install(copy.deepcopy(base), g, S2AttentionConfig(group_size=g, backend="sdpa"))
    assert isinstance(patched.layers[0].attn._modules["_attention_call"], S2Attention)
    assert list(patched.state_dict()) == list(base.state_dict())
    tokens = torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(0))

    base.eval(), patched.eval()
    with torch.no_grad():
        assert torch.equal(patched(tokens), base(tokens))

    base.train(), patched.train()
    assert patched.layers[1].attn._attention_call.training
    with torch.no_grad():
        full, sparse = base(tokens), patched(tokens)
    # Positions before G/2 see their whole causal past in both head halves; later ones do not.
    torch.testing.assert_close(sparse[:, : g // 2], full[:, : g // 2], rtol=1e-12, atol=1e-12)
    assert (sparse[:, g // 2 :] - full[:, g // 2 :]).abs().amax(-1).min() > 1e-6

    full_cfg = S2AttentionConfig(group_size=g, backend="sdpa", use_full_attn=True)
    forced_full = install(copy.deepcopy(base), g, full_cfg).train()
    with torch.no_grad():
        assert torch.equal(forced_full(tokens), full)


@pytest.mark.parametrize("use_mask", [True, False])
def test_torchtune_model_padded_batch_equals_samples_alone(use_mask):
    g, n, lengths = 8, 24, [24, 15]
    model = install(tiny_llama(), g, S2AttentionConfig(group_size=g, backend="sdpa")).train()
    tokens = torch.randint(1, 64, (2, n), generator=torch.Generator().manual_seed(1))
    real = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    tokens[~real] = 0
    mask = (
        real[:, :, None] & real[:, None, :] & torch.ones(n, n, dtype=torch.bool).tril() if use_mask else None
    )
    with torch.no_grad():
        batched = model(tokens, mask=mask)
        for i, length in enumerate(lengths):
            alone = model(tokens[i : i + 1, :length])
            torch.testing.assert_close(batched[i : i + 1, :length], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,embed_dim", [(4, 2, 32), (9, 3, 36)])
def test_torchtune_model_train_matches_dense_reference_at_attention_call(heads, kv_heads, embed_dim):
    # The S² call inside a real MultiHeadAttention sees exactly what the reference expects (GQA expanded),
    # also for SmolLM2's 9 query / 3 KV heads.
    g, n = 4, 10
    model = tiny_llama(num_heads=heads, num_kv_heads=kv_heads, embed_dim=embed_dim)
    model = install(model, g, S2AttentionConfig(group_size=g, backend="sdpa")).train()
    seen = {}
    call = model.layers[0].attn._attention_call

    def record(module, args, kwargs, output):
        seen["qkv"], seen["out"] = args, output

    handle = call.register_forward_hook(record, with_kwargs=True)
    model(torch.randint(0, 64, (2, n)))
    handle.remove()
    q, k, v = seen["qkv"]
    torch.testing.assert_close(seen["out"], dense_attention(q, k, v, s2_allowed(n, g, heads, False)[None]))


def test_s2attention_delegates_without_s2():
    calls = []

    def full(q, k, v, mask=None, dropout_p=0.0, is_causal=True):
        calls.append((mask, dropout_p, is_causal))
        return torch.zeros_like(q)

    attn = S2Attention(4, S2AttentionConfig(group_size=4), full)
    q = torch.randn(1, 2, 8, 4)
    kv = torch.randn(1, 2, 12, 4)  # a KV cache: key length differs from query length
    attn.train()
    attn(q, kv, kv, mask=None, dropout_p=0.1, is_causal=False)
    assert calls == [(None, 0.1, False)]
    attn.eval()
    attn(q, q, q, mask=None, dropout_p=0.0, is_causal=True)
    assert len(calls) == 2
    attn.train()
    out = attn(q, q, q)
    assert len(calls) == 2
    torch.testing.assert_close(out, shifted_sparse_attention(q, q, q, 4))
    assert dict(attn.named_parameters()) == {} and dict(attn.named_buffers()) == {}


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_config_validation_messages():
    with pytest.raises(ValueError, match="must be even"):
        S2AttentionConfig(group_size=7)
    with pytest.raises(ValueError, match=">= 2"):
        S2AttentionConfig(group_size=0)
    with pytest.raises(ValueError, match=r"group_size_ratio must be in \(0, 1\], got 1.5"):
        S2AttentionConfig(group_size_ratio=1.5)
    with pytest.raises(ValueError, match=r"group_size_ratio must be in \(0, 1\], got 0"):
        S2AttentionConfig(group_size_ratio=0.0)
    with pytest.raises(ValueError, match="Unknown S2 attention backend 'xformers'"):
        S2AttentionConfig(backend="xformers")
    with pytest.raises(ValueError, match="both are None"):
        S2AttentionConfig(group_size_ratio=None)
    assert S2AttentionConfig().resolve_group_size(8192) == 2048
    assert S2AttentionConfig(group_size=4096, group_size_ratio=None).resolve_group_size(8192) == 4096
    with pytest.raises(ValueError, match="group_size 4096 exceeds max_seq_len 2048"):
        S2AttentionConfig(group_size=4096).resolve_group_size(2048)
    with pytest.raises(ValueError, match="is not an integer"):
        S2AttentionConfig(group_size_ratio=0.25).resolve_group_size(4098)
    with pytest.raises(ValueError, match="must be even"):
        S2AttentionConfig(group_size_ratio=0.5).resolve_group_size(10)


def test_function_validation_messages():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="at least one head, got 0"):
        shifted_sparse_attention(*[torch.randn(1, 0, 8, 4)] * 3, 4)
    with pytest.raises(ValueError, match="start must be an int >= 0, got -1"):
        shifted_sparse_attention(q, q, q, 4, start=-1)
    with pytest.raises(ValueError, match="wrap_around=True needs the whole sequence"):
        shifted_sparse_attention(q, q, q, 4, wrap_around=True, start=2)
    with pytest.raises(ValueError, match="group_size must be even"):
        shifted_sparse_attention(q, q, q, 5)
    with pytest.raises(ValueError, match="Unknown S2 attention backend 'cuda'"):
        shifted_sparse_attention(q, q, q, 4, backend="cuda")
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[batch or 1, 8, 8\]"):
        shifted_sparse_attention(q, q, q, 4, mask=torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="k/v expanded"):
        shifted_sparse_attention(q, torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), 4)
    with pytest.raises(ValueError, match="does not support dropout"):
        shifted_sparse_attention(q, q, q, 4, backend="flex", dropout_p=0.1)
    block = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="cannot take a flex BlockMask"):
        shifted_sparse_attention(q, q, q, 4, backend="sdpa", mask=block)
    if not flash_attn_available():
        with pytest.raises(ValueError, match="needs flash-attn and a CUDA device"):
            shifted_sparse_attention(q, q, q, 4, backend="flash")
    with pytest.raises(ValueError, match="does not support an attention mask"):
        shifted_sparse_attention(q, q, q, 4, backend="flash", mask=torch.ones(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="already an S2Attention"):
        S2Attention(4, S2AttentionConfig(), S2Attention(4, S2AttentionConfig(), lambda *a, **k: None))


def test_auto_uses_sdpa_on_cpu_and_dropout_runs():
    q, k, v = rand_qkv(1, 2, 16)
    torch.testing.assert_close(
        shifted_sparse_attention(q, k, v, 4, backend="auto"),
        shifted_sparse_attention(q, k, v, 4, backend="sdpa"),
    )
    torch.manual_seed(0)
    out = shifted_sparse_attention(q, k, v, 4, backend="sdpa", dropout_p=0.5)
    assert torch.isfinite(out).all() and not torch.allclose(out, shifted_sparse_attention(q, k, v, 4))


def test_flash_kernel_stays_out_of_compiled_graph(fake_flash):
    # Only the kernel call leaves the graph (dynamo splits each enclosing frame there, so explain counts one
    # break per nesting level); the packing around it is traced, and nothing else breaks: the stand-in's
    # .tolist() and Python loops would, if they were traced.
    g, n = 4, 16
    model = install(tiny_llama(max_seq_len=n), g, S2AttentionConfig(group_size=g, backend="flash")).train()
    layer = model.layers[0]
    x = torch.randn(2, n, 32, dtype=torch.float64)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count >= 1
    for reason in (b.reason for b in explained.break_reasons):
        assert "torch.compiler.disable" in reason and "_flash_varlen" in reason, reason
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-12, atol=1e-12)
