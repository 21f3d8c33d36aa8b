"""Context-parallel S²-Attn (halo exchange) against the single-process function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longlora_tune.data.loader import pad_multiple
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.context_parallel import (
    check_context_parallel,
    context_parallel_attention,
    context_parallel_s2_attention,
    document_ids_from_positions,
    split_batch_for_context_parallel,
    split_for_context_parallel,
)
from longlora_tune.modules.loss import summed_token_loss
from longlora_tune.modules.s2_attention import S2Attention, shifted_sparse_attention
from longlora_tune.plan.communication import (
    halo_bytes_per_layer,
    ring_bytes_per_layer,
    ulysses_bytes_per_layer,
)
from longlora_tune.training.distributed import build_device_mesh

WORKER = Path(__file__).with_name("_context_parallel_worker.py")


def _run_worker(tmp_path: Path, world: int, degrees: str, cases: str = "") -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(world), degrees, str(out), *([cases] if cases else [])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_matches(results: dict, expected: tuple[str, ...]) -> None:
    cases = {key: errors for key, errors in results.items() if key.startswith("G=")}
    assert sorted(cases) == sorted(expected)
    for key, (out_err, dq_err, dk_err, dv_err, k_grad_zero) in cases.items():
        assert max(out_err, dq_err, dk_err, dv_err) < 1e-12, key
        assert k_grad_zero == 0.0, key


@pytest.mark.slow
def test_two_ranks_match_single_process_forward_and_backward(tmp_path: Path) -> None:
    results = _run_worker(tmp_path, world=2, degrees="2")["cp=2"]
    assert results["mesh"] == [1, 2]
    assert results["cp_rank_matches"] == 1.0
    # G = L, G = L/2, G = 2L and L = 3G/2, without and with padding / packed-document masks.
    expected = ("G=8 L=8 none", "G=8 L=8 padding", "G=8 L=8 documents", "G=4 L=8 none", "G=4 L=8 padding")
    expected += ("G=16 L=8 none", "G=16 L=8 documents", "G=8 L=12 none", "G=8 L=12 padding")
    expected += ("G=8 L=8 documents-checkpointed",)
    # Odd head counts with GQA, and one head (rank 1 of L = 3G/2 has no seam).
    expected += ("G=8 L=12 none H=9/3", "G=16 L=8 documents H=9/3", "G=8 L=8 padding H=3/1")
    expected += ("G=8 L=12 none H=1/1", "G=8 L=12 padding H=1/1")
    _assert_matches(results, expected)


@pytest.mark.slow
def test_four_ranks_as_two_by_two_and_one_by_four(tmp_path: Path) -> None:
    cases = ("G=8 L=8 documents", "G=16 L=8 documents", "G=8 L=12 padding")
    cases += ("G=8 L=12 none H=9/3", "G=8 L=12 none H=1/1")
    results = _run_worker(tmp_path, world=4, degrees="2,4", cases="2,6,8,10,13")
    # Context groups {0,1} and {2,3}: peers are addressed by group-local rank, not global rank.
    assert results["cp=2"]["mesh"] == [2, 2]
    _assert_matches(results["cp=2"], cases)
    # One group of four: the middle ranks both receive a halo and send one; with L = 3G/2 they alternate
    # which heads straddle their start (9 heads: 5 or 4; one head: rank 1 has no seam but must still
    # receive rank 2's gradient for its tail).
    assert results["cp=4"]["mesh"] == [1, 4]
    _assert_matches(results["cp=4"], cases)


@pytest.mark.parametrize("heads", [4, 9, 1])
@pytest.mark.parametrize("group_size,n", [(8, 16), (16, 8), (4, 12)])
@pytest.mark.parametrize("masked", [False, True])
def test_one_rank_equals_shifted_sparse_attention(group_size: int, n: int, masked: bool, heads: int) -> None:
    # Without a process group the op is rank 0 of 1: bulk plus a seam whose halo is fully masked.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    valid = torch.arange(n)[None, :] < torch.tensor([[n], [n // 2 + 1]]) if masked else None
    dense = valid[:, None, :].expand(2, n, n) if masked else None
    ref = shifted_sparse_attention(q, k, v, group_size, mask=dense, backend="sdpa")
    out = context_parallel_s2_attention(q, k, v, group_size, key_padding_mask=valid)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_refuses_slice_not_multiple_of_half_group() -> None:
    q = torch.zeros(1, 2, 6, 4)
    with pytest.raises(ValueError, match="multiple of G/2=4"):
        context_parallel_s2_attention(q, q, q, 8)
    with pytest.raises(ValueError, match="at least one head, got 0"):
        context_parallel_s2_attention(*[torch.zeros(1, 0, 8, 4)] * 3, 8)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        context_parallel_s2_attention(q, q, q, 4, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))


def test_check_context_parallel_lists_working_degrees() -> None:
    assert check_context_parallel(4096, 8, 1024) == 512
    assert check_context_parallel(64, 4, 32) == 16  # G = 2L: a group spans two ranks
    with pytest.raises(LongLoRAConfigError, match=r"degrees that work: 1, 2, 4, 8; .*multiple of 128"):
        check_context_parallel(64, 16, 8 * 2)
    with pytest.raises(LongLoRAConfigError, match="context_parallel_degree=0"):
        check_context_parallel(64, 0, 8)


def test_mesh_degree_must_divide_the_world() -> None:
    with pytest.raises(LongLoRAConfigError, match=r"context_parallel_degree=2 does not divide the 1 rank"):
        build_device_mesh("cpu", context_parallel_degree=2)


def test_split_shifts_labels_before_splitting() -> None:
    tokens = torch.arange(16).reshape(2, 8)
    labels = tokens + 100
    first = split_for_context_parallel(tokens, labels, rank=0, degree=2)
    second = split_for_context_parallel(tokens, labels, rank=1, degree=2)
    assert first.tokens.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    # The slice's last token keeps its target (the next slice's first token).
    assert first.labels.tolist() == [[101, 102, 103, 104], [109, 110, 111, 112]]
    assert second.labels.tolist() == [[105, 106, 107, -100], [113, 114, 115, -100]]
    assert second.input_pos.tolist() == [[4, 5, 6, 7]] * 2 and second.start == 4
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]] * 2)
    assert (
        split_for_context_parallel(tokens, labels, rank=1, degree=2, input_pos=packed).input_pos.tolist()
        == [[1, 0, 1, 2]] * 2
    )
    with pytest.raises(LongLoRAConfigError, match="not a multiple of context_parallel_degree=3"):
        split_for_context_parallel(tokens, labels, rank=0, degree=3)


def test_bytes_halo_is_independent_of_slice_and_far_below_ring() -> None:
    # Llama 2 7B, 256k tokens on 8 ranks (L = 32768), G = 8192, bf16, with activation checkpointing.
    common = dict(batch_size=1, head_dim=128, degree=8, dtype_bytes=2, recompute=True)
    halo = halo_bytes_per_layer(num_heads=32, group_size=8192, **common)
    # 3 messages (forward, recomputed forward, gradient) of K and V: 2 * 16 heads * 4096 tokens * 128 * 2 B.
    assert halo == 3 * 2 * 16 * 4096 * 128 * 2
    ring = ring_bytes_per_layer(num_kv_heads=32, slice_len=32768, **common)
    assert ring == 7 * 32 * 32768 * 128 * 2 * (2 * 2 + 4)
    assert ring > 50 * halo
    assert ulysses_bytes_per_layer(num_heads=32, num_kv_heads=32, slice_len=32768, **common) > halo
    assert halo_bytes_per_layer(num_heads=32, group_size=8192, **{**common, "degree": 1}) == 0
    assert (
        halo_bytes_per_layer(num_heads=32, group_size=8192, masks=True, **common) == halo + 2 * 2 * 4096 * 8
    )
    # 9 heads: the busier boundaries carry the 5 shifted heads.
    assert halo_bytes_per_layer(num_heads=9, group_size=8192, **common) == 3 * 2 * 5 * 4096 * 128 * 2


# ----------------------------------------------------------------------------------------------------
# Recipe plumbing: batch split, the per-step attention switch, padding, the loss
# ----------------------------------------------------------------------------------------------------


def _tiny_s2_model(**overrides):
    from longlora_tune.models import longlora_llama2

    args = dict(
        vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=4, embed_dim=32, intermediate_dim=64,
        max_seq_len=16, original_max_seq_len=16, lora_attn_modules=["q_proj", "v_proj"], lora_rank=2,
        lora_alpha=4.0, s2_group_size_ratio=0.5,
    )  # fmt: skip
    args.update(overrides)
    return longlora_llama2(**args)


def test_split_batch_gives_document_ids_of_the_slice_and_no_dense_mask() -> None:
    tokens = torch.arange(8).reshape(1, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    batch = {"tokens": tokens, "labels": tokens + 100, "input_pos": pos, "mask": torch.ones(1, 8, 8).bool()}
    assert document_ids_from_positions(pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    second = split_batch_for_context_parallel(batch, rank=1, degree=2, ignore_index=-100)
    assert set(second.batch) == {"tokens", "labels", "input_pos"}
    assert second.document_ids.tolist() == [[1, 2, 2, 2]]
    assert second.batch["labels"].tolist() == [[105, 106, 107, -100]]
    assert second.batch["input_pos"].tolist() == [[1, 0, 1, 2]]
    plain = split_batch_for_context_parallel(
        {"tokens": tokens, "labels": tokens}, rank=0, degree=2, ignore_index=-100
    )
    assert plain.document_ids is None and plain.batch["input_pos"].tolist() == [[0, 1, 2, 3]]


def test_context_parallel_attention_switches_s2_layers_for_one_step_only() -> None:
    model = _tiny_s2_model()
    layers = [m for m in model.modules() if isinstance(m, S2Attention)]
    keys = set(model.state_dict())
    assert layers and all(m.context_parallel is None for m in layers)
    docs = torch.zeros(1, 16, dtype=torch.long)
    model.train()
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    reference = model(tokens)
    with context_parallel_attention(model, group=None, document_ids=docs):
        assert all(m.context_parallel is not None and m.context_parallel.document_ids is docs for m in layers)
        assert set(model.state_dict()) == keys  # no new state-dict key
        # One process is a group of one: the halo op must give the single-process result.
        torch.testing.assert_close(model(tokens), reference)
        model.eval()
        with pytest.raises(RuntimeError, match="runs only in training"):
            model(tokens)
    assert all(m.context_parallel is None for m in layers)
    model(tokens)  # eval works again once the step is over


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"use_full_attn": True}, "use_full_attn=true is not supported"), ({"s2_wrap_around": True}, "wrap")],
)
def test_context_parallel_attention_refuses_full_attention_and_wrap_around(overrides, message) -> None:
    with pytest.raises(LongLoRAConfigError, match=message):
        with context_parallel_attention(_tiny_s2_model(**overrides), group=None):
            pass


def test_pad_multiple_makes_slices_whole_half_groups() -> None:
    assert pad_multiple(None, 64, 256, context_parallel_degree=2) == 64
    assert pad_multiple(None, 64, 256, context_parallel_degree=4) == 128  # 4 slices of 32 = G/2
    assert pad_multiple(None, 64, 768, context_parallel_degree=3) == 192  # lcm(64, 96)
    assert pad_multiple(48, 64, 768, context_parallel_degree=4) == 384  # lcm(48, 128)
    with pytest.raises(LongLoRAConfigError, match="pad_to_multiple_of=256 does not divide"):
        pad_multiple(None, 64, 384, context_parallel_degree=8)


def test_loss_of_already_shifted_labels_and_of_a_slice_without_targets() -> None:
    model = _tiny_s2_model()
    model.train()
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    loss_fn = torch.nn.CrossEntropyLoss()
    unshifted, n = summed_token_loss(
        model, loss_fn, {"tokens": tokens, "labels": tokens}, device=torch.device("cpu"), ignore_index=-100
    )
    shifted = torch.cat([tokens[:, 1:], torch.full((1, 1), -100)], dim=1)
    same, m = summed_token_loss(
        model,
        loss_fn,
        {"tokens": tokens, "labels": shifted},
        device=torch.device("cpu"),
        ignore_index=-100,
        labels_shifted=True,
    )
    assert int(n) == int(m) == 15
    torch.testing.assert_close(same, unshifted)
    # A slice of padding only (every label ignored): zero loss and zero, not NaN, gradients.
    empty, k = summed_token_loss(
        model,
        loss_fn,
        {"tokens": tokens, "labels": torch.full_like(tokens, -100)},
        device=torch.device("cpu"),
        ignore_index=-100,
        labels_shifted=True,
    )
    empty.backward()
    assert int(k) == 0 and float(empty.detach()) == 0.0
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
