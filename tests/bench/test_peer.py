"""The transformers + PEFT peer of the benchmark: its S² equals ours, and a tiny step runs side by side."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from benchmarks.__main__ import main as bench_main
from benchmarks.backend_check import reference_s2_attention
from benchmarks.peer import run_peer_case, s2_sdpa_attention, s2_sdpa_reference
from benchmarks.train_step import Case
from longlora_tune.modules.s2_attention import shifted_sparse_attention
from longlora_tune.modules.s2_heads import shifted_heads


@pytest.mark.parametrize("heads", [4, 9])
@pytest.mark.parametrize(("n", "group"), [(64, 16), (60, 16), (40, 8), (6, 16), (24, 24)])
def test_peer_s2_equals_ours_and_the_dense_reference(n, group, heads):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, heads, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    peer = s2_sdpa_reference(q, k, v, group)
    torch.testing.assert_close(peer, shifted_sparse_attention(q, k, v, group, backend="sdpa"))
    torch.testing.assert_close(peer, reference_s2_attention(q, k, v, group))
    # The shifted heads differ from plain grouped attention once a sequence spans two groups (the first
    # half of a doubled head set is every head grouped from 0).
    if n > group:
        unshifted = s2_sdpa_reference(*(torch.cat([x, x], dim=1) for x in (q, k, v)), group)[:, :heads]
        shifted = shifted_heads(heads)
        torch.testing.assert_close(unshifted[:, : shifted.start], peer[:, : shifted.start])
        assert not torch.allclose(unshifted[:, shifted], peer[:, shifted])


def test_attention_interface_function_expands_kv_heads_and_returns_bnhd():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 32, 8, generator=gen)
    k, v = (torch.randn(1, 2, 32, 8, generator=gen) for _ in range(2))
    module = SimpleNamespace(config=SimpleNamespace(s2_group_size=8))
    out, weights = s2_sdpa_attention(module, q, k, v, None, scaling=0.5)
    assert weights is None and out.shape == (1, 32, 4, 8)
    expanded = [x.repeat_interleave(2, dim=1) for x in (k, v)]
    want = shifted_sparse_attention(q, *expanded, 8, backend="sdpa", scale=0.5)
    torch.testing.assert_close(out, want.transpose(1, 2))


def test_peer_case_trains_lora_embeddings_and_norms():
    result = run_peer_case(Case(shape="tiny", seq_len=32, variant="peer", repeats=2))
    assert len(result["step_s"]) == 2 and result["median_s"] > 0 and result["loss"] > 0
    # tiny: LoRA r8 on q/k/v/o (2 layers x 4 x 8*(64+64)) + embed copy 256*64 + 5 norms of 64.
    assert result["trainable"]["total"] == 2 * 4 * 8 * 128 + 256 * 64 + 5 * 64
    assert result["model_flops"] > 0


def test_cli_peer_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--shape", "tiny", "--seq-lens", "32", "--repeats", "1", "--device", "cpu", "--in-process"]
    fixed = ["--losses", "chunked", "--checkpoint-layers", "all", "--sequence-tile-tokens", "off"]
    fixed += ["--compile", "false"]
    results = bench_main(
        [*argv, "--variants", "longlora", "--peer", "--loss-chunks", "2", "--out", str(out), *fixed]
    )
    assert [r["variant"] for r in results] == ["longlora", "peer"]
    table = capsys.readouterr().out
    assert "| 32 | longlora[sdpa] |" in table and "ours/peer best" in table
    payload = json.loads(out.read_text())
    (row,) = payload["peer"]
    ours, peer = payload["results"]
    assert row["best_ratio"] == pytest.approx(peer["min_s"] / ours["min_s"])
    assert row["tokens_per_s_median"] == pytest.approx([ours["tokens_per_s"], peer["tokens_per_s"]])
