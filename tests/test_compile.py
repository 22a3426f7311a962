"""The torch dispatch/combine path under ``torch.compile(fullgraph=True)`` on the CPU.

The plan is built inside the compiled function from the router's indices, then
dispatch -> a per-expert op -> combine, forward and backward; results must equal eager.
``aot_eager`` checks that dynamo traces the whole thing (plan dataclass, the autograd
Functions) and that AOTAutograd handles the backward; one ``inductor`` case compiles it.
"""
import pytest
import torch

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
