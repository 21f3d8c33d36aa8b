"""The lean RMSNorm and SwiGLU against torchtune's: same forward, same gradients, fewer saved bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchtune.modules import FeedForward, RMSNorm

from longlora_tune.modules.lean_layers import LeanFeedForward, LeanRMSNorm, apply_lean_layers
from tests.test_plan import _counting_saved_storages


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    # Activations only: the planner tests' counter leaves out the weights (and views of them).
    storages: dict[int, int] = {}
    with _counting_saved_storages(module, storages):
        module(x)
    return sum(storages.values())


def _norm_pair(dtype: torch.dtype, weight_dtype: torch.dtype, dim: int = 96):
    torch.manual_seed(0)
    ref = RMSNorm(dim, eps=1e-5)
    ref.scale.data = (torch.rand(dim) + 0.5).to(weight_dtype)
    lean = copy.deepcopy(ref)
    assert apply_lean_layers(lean) == 1 and type(lean) is LeanRMSNorm
    x = torch.randn(3, 40, dim, dtype=dtype)
    return ref, lean, x


@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_rms_norm_forward_is_torchtunes_to_the_bit(dtype, weight_dtype):
    ref, lean, x = _norm_pair(dtype, weight_dtype)
    xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert torch.equal(ref(xr), lean(xl))
    with torch.no_grad():
        assert torch.equal(ref(x), lean(x))


def test_rms_norm_gradients_equal_autograds_in_float64():
    # torchtune rounds a float64 input to float32; the lean norm keeps float64, so autograd of the same
    # float64 op is the reference for its closed-form backward.
    _, lean, x = _norm_pair(torch.float64, torch.float64)
    grad = torch.randn_like(x)
    results = []
    for use_lean in (False, True):
        xi = x.clone().requires_grad_()
        lean.zero_grad()
        if use_lean:
            out = lean(xi)
        else:
            out = torch.nn.functional.rms_norm(xi, (x.shape[-1],), lean.scale, lean.eps)
        out.backward(grad)
        results.append((out.detach(), xi.grad, lean.scale.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rms_norm_bf16_gradients_match_torchtune_within_rounding():
    ref, lean, x = _norm_pair(torch.bfloat16, torch.float32)
    grad = torch.randn_like(x)
    grads = []
    for module in (ref, lean):
        xi = x.clone().requires_grad_()
        module(xi).backward(grad)
        grads.append((xi.grad, module.scale.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, saved_ratio", [(torch.bfloat16, 0.25), (torch.float32, 0.5)])
def test_rms_norm_keeps_its_input_and_inverse_rms_only(dtype, saved_ratio):
    ref, lean, x = _norm_pair(dtype, torch.float32, dim=512)
    x = torch.randn(1, 256, 512, dtype=dtype, requires_grad=True)
    ref_bytes = _saved_bytes(ref, x)
    lean_bytes = _saved_bytes(lean, x)
    tokens = 256
    assert lean_bytes == x.numel() * x.element_size() + 4 * tokens
    assert ref_bytes == 2 * 4 * x.numel() + 4 * tokens
    assert lean_bytes / ref_bytes == pytest.approx(saved_ratio, rel=0.02)


def _mlp_pair(dim: int = 64, hidden: int = 176, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    ref = FeedForward(
        gate_proj=nn.Linear(dim, hidden, bias=False),
        down_proj=nn.Linear(hidden, dim, bias=False),
        up_proj=nn.Linear(dim, hidden, bias=False),
    ).to(dtype)
    lean = copy.deepcopy(ref)
    assert apply_lean_layers(lean) == 1 and type(lean) is LeanFeedForward
    return ref, lean


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_swiglu_forward_and_gradients_are_torchtunes_exactly(dtype):
    ref, lean = _mlp_pair(dtype=dtype)
    x = torch.randn(2, 30, 64, dtype=dtype)
    grad = torch.randn(2, 30, 64, dtype=dtype)
    results = []
    for module in (ref, lean):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.backward(grad)
        results.append((out, xi.grad, *(p.grad for p in module.parameters())))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_swiglu_keeps_two_of_the_three_intermediate_tensors():
    ref, lean = _mlp_pair()
    for p in [*ref.parameters(), *lean.parameters()]:
        p.requires_grad_(False)  # frozen base weights, as LongLoRA trains them
    x = torch.randn(1, 128, 64, requires_grad=True)
    ref_bytes = _saved_bytes(ref, x)
    lean_bytes = _saved_bytes(lean, x)
    intermediate = 128 * 176 * 4
    assert ref_bytes - lean_bytes == intermediate
    assert lean_bytes == 2 * intermediate  # gate and up; the frozen projections keep no input


def test_without_grad_both_run_torchtunes_forward():
    ref, lean = _mlp_pair()
    x = torch.randn(1, 8, 64)
    with torch.no_grad():
        assert torch.equal(ref(x), lean(x))


def test_apply_lean_layers_leaves_other_modules_and_state_dict_names_alone():
    class GELUMLP(FeedForward):
        pass

    model = nn.ModuleDict(
        {
            "norm": RMSNorm(8),
            "mlp": FeedForward(
                gate_proj=nn.Linear(8, 16), down_proj=nn.Linear(16, 8), up_proj=nn.Linear(8, 16)
            ),
            "no_up": FeedForward(gate_proj=nn.Linear(8, 8), down_proj=nn.Linear(8, 8)),
            "gelu": FeedForward(
                gate_proj=nn.Linear(8, 8),
                down_proj=nn.Linear(8, 8),
                up_proj=nn.Linear(8, 8),
                activation=nn.GELU(),
            ),
            "sub": GELUMLP(gate_proj=nn.Linear(8, 8), down_proj=nn.Linear(8, 8), up_proj=nn.Linear(8, 8)),
        }
    )
    keys = list(model.state_dict())
    assert apply_lean_layers(model) == 2
    assert [type(m).__name__ for m in model.values()] == [
        "LeanRMSNorm",
        "LeanFeedForward",
        "FeedForward",
        "FeedForward",
        "GELUMLP",
    ]
    assert list(model.state_dict()) == keys
    assert apply_lean_layers(model) == 0


def test_rms_norm_overflow_gives_torchtunes_zeros():
    # Inputs whose square overflows float32 (a diverged run): both forwards and both backwards give 0.
    ref, lean, _ = _norm_pair(torch.float32, torch.float32, dim=8)
    x = torch.full((1, 2, 8), 1e30)
    for module in (ref, lean):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.backward(torch.randn(out.shape))
        for t in (out, xi.grad, module.scale.grad):
            assert torch.equal(t, torch.zeros_like(t))
