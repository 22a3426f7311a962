"""moebal under ``torch.compile(fullgraph=True)`` on the CPU.

Two levels:

- The functional dispatch/combine path with static shapes: the plan is built inside the
  compiled function from the router's indices, then dispatch -> a per-expert op ->
  combine, forward and backward; results must equal eager.
- The whole ``MoE`` layer in training mode with ``dynamic=True``: five token counts run
  through one graph (at most one recompile), forward and backward equal an eager copy fed
  the same inputs, and the loss-free bias moves bit for bit as eager moves it.

``fullgraph=True`` turns any graph break into an error, so a passing test had none.
``aot_eager`` checks that dynamo traces the whole thing (plan dataclass, the autograd
Functions, buffer updates) and that AOTAutograd handles the backward; the ``inductor``
cases compile it for real (tens of seconds each on a cold cache).
"""
import copy

import pytest
import torch

from moebal import MoE
from moebal.functional import combine, dispatch

T, K, E, D = 37, 3, 7, 24  # prime E, T*K = 111


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.argsort(torch.rand(T, E, generator=g), dim=-1)[:, :K]
    x = torch.randn(T, D, generator=g)
    w = torch.rand(T, K, generator=g) + 0.1
    return idx, x, w


def _moe(x, idx, w, capacity):
    xs, plan = dispatch(x, idx, E, capacity, backend="torch", validate=False)
    rows = torch.arange(plan.num_rows, device=x.device)
    expert_R = torch.searchsorted(plan.group_ends_E.long(), rows, right=True).clamp(max=E - 1)
    scale_E = torch.linspace(0.5, 2.0, E, device=x.device, dtype=x.dtype)
    ys = torch.tanh(xs) * scale_E[expert_R].unsqueeze(-1)  # a different "expert" per group
    return combine(ys, plan, w, backend="torch")


def _run(fn, x, idx, w, capacity):
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = fn(xl, idx, wl, capacity)
    y.backward(torch.cos(y.detach()))
    return y.detach(), xl.grad, wl.grad


@pytest.mark.parametrize(
    "compiler,capacity",
    [
        ("aot_eager", None),  # dropless: data-dependent group sizes stay on the device
        ("aot_eager", 4),  # capacity: drops and zero padding rows
        ("inductor", 4),  # one real compile (about 30 s on a cold cache)
    ],
)
def test_dispatch_combine_compile_fullgraph(compiler, capacity):
    idx, x, w = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(_moe, fullgraph=True, backend=compiler, dynamic=False)
    got = _run(compiled, x, idx, w, capacity)
    want = _run(_moe, x, idx, w, capacity)
    for a, b, name in zip(got, want, ("y", "grad_x", "grad_w")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # a second call with new values reuses the graph and stays correct
    idx2, x2, w2 = _inputs(seed=1)
    for a, b in zip(_run(compiled, x2, idx2, w2, capacity), _run(_moe, x2, idx2, w2, capacity)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- the MoE layer, dynamic token counts -------------------------------------------------

LAYER_D = 24  # no token count below equals it (dynamo would give both dims one symbol)
TOKENS = (17, 32, 45, 64, 100)  # odd, prime-ish and even counts; all >= 2 (0 and 1 specialise)
BASE_TOKENS = (20, 32, 44, 64, 100)  # BASE balances exactly: T*K must be a multiple of E = 8


def _layer(router, capacity_factor, d_model=LAYER_D, dtype=torch.float32):
    torch.manual_seed(0)
    return MoE(d_model, 32, 8, 2, router=router, capacity_factor=capacity_factor, dtype=dtype).train()


def _step(moe, fn, x):
    """One training forward + backward; what it returned and the gradients it left."""
    xl = x.clone().requires_grad_(True)
    y = fn(xl)
    (y.float().square().mean() + moe.aux_loss).backward()
    out = dict(
        y=y.detach(), grad_x=xl.grad, grad_gate=moe.router.gate.weight.grad, grad_w_in=moe.experts.w_in_EDH.grad,
        aux_loss=moe.aux_loss.detach(), load=moe.last_stats.load, kept=moe.last_stats.kept,
    )
    moe.zero_grad(set_to_none=True)
    return out


def _check_against_eager(router, capacity_factor, backend, tokens, d_model=LAYER_D, dtype=torch.float32):
    """Run ``tokens`` through an eager layer and a compiled copy: (graphs compiled, the copy).

    Graphs are counted by dynamo's ``unique_graphs`` (one per compile or recompile of a
    frame; a restarted analysis within one compile is not a recompile).
    """
    eager = _layer(router, capacity_factor, d_model, dtype)
    moe = copy.deepcopy(eager)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters  # here, not at collection: it imports triton, and
    # tests/test_kernels.py must import it first, under TRITON_INTERPRET=1

    counters.clear()
    compiled = torch.compile(moe, backend=backend, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype != torch.float64 else {}
    for T_ in tokens:
        x = torch.randn(T_, d_model, generator=g, dtype=dtype)
        want, got = _step(eager, eager, x), _step(moe, compiled, x)
        for name in want:
            torch.testing.assert_close(got[name], want[name], **tol, msg=f"{name} at T={T_}")
        assert moe.last_stats.num_tokens == T_
        if eager.router.expert_bias is not None:  # loss-free: the bias moves bit for bit as eager
            assert torch.equal(moe.router.expert_bias, eager.router.expert_bias), f"T={T_}"
            assert torch.equal(moe.router.load_counts, eager.router.load_counts)
    return counters["stats"]["unique_graphs"], moe


@pytest.mark.parametrize("capacity_factor", [None, 1.25])  # dropless; capacity with drops and padding
@pytest.mark.parametrize("router", ["aux_loss", "loss_free", "base"])
def test_layer_compiles_once_for_all_token_counts(router, capacity_factor):
    tokens = BASE_TOKENS if router == "base" else TOKENS
    graphs, _ = _check_against_eager(router, capacity_factor, "aot_eager", tokens)
    assert graphs <= 2, f"{graphs} compiles for {len(tokens)} token counts"  # at most one recompile


@pytest.mark.parametrize(
    "d_model,dtype",
    [
        (18, torch.float32),  # rows of 72 bytes: F.grouped_mm cannot take them (per-expert GEMMs)
        (LAYER_D, torch.float64),  # no grouped_mm for float64 either
    ],
)
def test_layer_compiles_experts_grouped_mm_cannot_take(d_model, dtype):
    graphs, _ = _check_against_eager("aux_loss", None, "aot_eager", TOKENS[:3], d_model, dtype)
    assert graphs <= 2


def test_loss_free_layer_inductor_moves_bias_as_eager():
    """The default backend: one compile for every token count, the bias bit for bit as eager."""
    graphs, moe = _check_against_eager("loss_free", None, "inductor", TOKENS)
    assert graphs <= 2
    assert torch.count_nonzero(moe.router.expert_bias) > 0  # the bias did move: the equality says something


def test_base_compiled_raises_the_solvers_value_error():
    """BASE needs T*K to be a multiple of E; the compiled layer says so as eager does."""
    moe = _layer("base", None)
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(torch.randn(20, LAYER_D)).sum().backward()
    with pytest.raises(ValueError, match="not a multiple of num_experts"):
        compiled(torch.randn(17, LAYER_D))


def test_compiled_capacity_rounds_as_eager():
    """The capacity ``ceil(c*T*K/E)`` is a symbolic size under dynamic shapes; inductor
    evaluates it with sympy. A factor with no exact binary value (1.1) and K = 3 find the
    token counts where a different order of the float products would round differently."""
    torch.manual_seed(0)
    moe = MoE(8, 8, 7, 3, capacity_factor=1.1)

    def rows(x):
        return x.new_zeros(moe.capacity(x.shape[0]))

    torch._dynamo.reset()
    compiled = torch.compile(rows, backend="inductor", fullgraph=True, dynamic=True)
    for T_ in range(2, 600):
        assert compiled(torch.empty(T_)).shape[0] == moe.capacity(T_), T_
