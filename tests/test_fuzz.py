"""Hypothesis properties of routing -> plan -> dispatch/combine -> layer, each against an
independent float64 reference written here (Python loops and dense formulas; none of
moebal's own code runs in a reference).

Example counts come from the profiles in conftest.py: ``ci`` (the default) runs 1000
derandomized examples per property, ``long`` 10000 random ones
(``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py``). Sizes stay tiny so
that 1000 examples take seconds.

Near-ties: moebal chooses experts from fp32 scores, the references from float64 ones.
Computed in fp32, a score s in (0, 1] lands within a relative ~3e-6 of its float64 value
(softmax: the fp32 ``x - max`` of logits within +-40 and the sum; sigmoid: less), and
adding a bias in [-1, 1] rounds by at most ~1.2e-7 more. ``slack`` bounds how far that
moves the difference of two selection scores, with a margin of 3x or more. Where every
expert of the float64 top K differs from every other expert by more than the slack, or not
at all (equal inputs give bit-equal scores in both precisions, and ties break toward the
lower expert index), the top K is decided and must match index for index. Otherwise fp32
may order the near-tied pair either way, and the routing property checks the choice
against the float64 scores up to the slack. The layer property (fp32 logits from a GEMM)
assumes rows with a top-K/rest gap under ``NEAR`` away; for it only the top-K set matters.
"""
import math

import pytest
import torch
from hypothesis import assume, event, given, strategies as st

import moebal
from moebal.functional import combine, dispatch, topk_routing
from moebal.plan import build_plan

pytestmark = pytest.mark.usefixtures("one_thread")

REL, ABS_BIAS = 1e-5, 1e-6  # fp32 slack of a score (relative) and of adding the bias (absolute)
NEAR = 1e-5  # the layer's top-K/rest gap that fp32 logits cannot close


# --- float64 references ----------------------------------------------------------------------


def ref_scores(row: list[float], score: str) -> list[float]:
    """Softmax over the row, or an independent sigmoid per entry, in float64."""
    if score == "softmax":
        top = max(row)
        ex = [math.exp(v - top) for v in row]
        total = math.fsum(ex)
        return [v / total for v in ex]
    return [1.0 / (1.0 + math.exp(-v)) for v in row]


def ref_order(select: list[float]) -> list[int]:
    """Experts by selection score, descending; equal scores: the lower index first."""
    return sorted(range(len(select)), key=lambda e: (-select[e], e))


def slack(scores: list[float], a: int, b: int, biased: bool) -> float:
    """How far fp32 rounding may move ``select[a] - select[b]`` (see the module docstring)."""
    return REL * (scores[a] + scores[b]) + (ABS_BIAS if biased else 0.0)


def near_ties(select: list[float], scores: list[float], order: list[int], top_k: int, biased: bool) -> tuple:
    """``(near, exact)``: whether some expert of the top K differs from another expert by a
    nonzero amount within the fp32 slack (fp32 may order the two either way), and whether
    one ties another exactly. Every expert counts, not only the (K+1)-th: a near-tie can sit
    behind an exact tie, as in scores [a, b, b - 1e-8, b] with K = 2."""
    pairs = [(a, b) for a in order[:top_k] for b in range(len(select)) if b != a]
    near = any(0.0 < abs(select[a] - select[b]) <= slack(scores, a, b, biased) for a, b in pairs)
    return near, any(select[a] == select[b] for a, b in pairs)


def ref_plan(indices: list[list[int]], num_experts: int, capacity: int | None,
             weights: list[list[float]] | None = None) -> dict:
    """Where each (token, slot) pair goes, by a Python loop over the pairs.

    Pairs are numbered p = t*K + k. Each expert takes its pairs in pair order (``weights``
    None: the "position" policy) or by weight, highest first, equal weights in pair order
    (the "weight" policy); with a capacity C it keeps the first C of them in its block of
    rows [e*C, (e+1)*C), padding rows are -1; dropless the experts' groups are packed.
    """
    T = len(indices)
    K = len(indices[0]) if T else 0
    E = num_experts
    pairs_of = [[] for _ in range(E)]
    for t in range(T):
        for k in range(K):
            pairs_of[indices[t][k]].append(t * K + k)
    if weights is not None:
        for e in range(E):
            pairs_of[e].sort(key=lambda p: (-weights[p // K][p % K], p))
    counts = [len(p) for p in pairs_of]
    row_of_pair = [-1] * (T * K)
    if capacity is None:
        pair_of_row = [p for e in range(E) for p in pairs_of[e]]
        kept = counts
        ends = [sum(counts[: e + 1]) for e in range(E)]
        starts = [end - c for end, c in zip(ends, counts)]
    else:
        pair_of_row = [-1] * (E * capacity)
        kept = [min(c, capacity) for c in counts]
        for e in range(E):
            for rank, p in enumerate(pairs_of[e][:capacity]):
                pair_of_row[e * capacity + rank] = p
        starts = [e * capacity for e in range(E)]
        ends = [(e + 1) * capacity for e in range(E)]
    for r, p in enumerate(pair_of_row):
        if p >= 0:
            row_of_pair[p] = r
    return dict(counts=counts, kept=kept, starts=starts, ends=ends, pair_of_row=pair_of_row,
                token_of_row=[p // K if p >= 0 else -1 for p in pair_of_row], row_of_pair=row_of_pair)


def ref_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The FFN nonlinearity from its textbook formula (float64)."""
    if activation == "swiglu":
        gate, up = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
        return gate / (1.0 + torch.exp(-gate)) * up
    if activation == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


# --- strategies ----------------------------------------------------------------------------

# a few repeated levels make exact ties common; the rest is any fp32 value in range
LOGIT = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.5]), st.floats(-20, 20, width=32))
BIAS = st.one_of(st.sampled_from([0.0, 0.25, -0.25]), st.floats(-1, 1, width=32))


def expert_rows(draw, T: int, E: int, K: int, distinct: bool = True) -> list[list[int]]:
    """T rows of K experts in [0, E): K distinct ones (as routing gives), or any."""
    if distinct:
        return [draw(st.permutations(range(E)))[:K] for _ in range(T)]
    return draw(st.lists(st.lists(st.integers(0, E - 1), min_size=K, max_size=K), min_size=T, max_size=T))


# --- routing -------------------------------------------------------------------------------


@given(data=st.data())
def test_topk_routing_equals_the_float64_stable_sort(data):
    T = data.draw(st.integers(0, 12), label="T")
    E = data.draw(st.integers(1, 12), label="E")
    K = data.draw(st.integers(1, E), label="K")
    score = data.draw(st.sampled_from(["softmax", "sigmoid"]), label="score")
    renormalize = data.draw(st.booleans(), label="renormalize")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), label="dtype")
    rows = data.draw(st.lists(st.lists(LOGIT, min_size=E, max_size=E), min_size=T, max_size=T), label="logits")
    bias = data.draw(st.none() | st.lists(BIAS, min_size=E, max_size=E), label="bias")
    logits = torch.tensor(rows, dtype=torch.float32).reshape(T, E).to(dtype)
    bias_t = None if bias is None else torch.tensor(bias, dtype=torch.float32)

    weights, indices = topk_routing(logits, K, score=score, bias=bias_t, renormalize=renormalize)

    assert indices.shape == (T, K) and indices.dtype == torch.int64
    assert weights.shape == (T, K) and weights.dtype == torch.float32
    for t in range(T):
        chosen = indices[t].tolist()
        assert len(set(chosen)) == K and all(0 <= e < E for e in chosen)
        scores = ref_scores([float(v) for v in logits[t].double()], score)
        select = scores if bias is None else [s + b for s, b in zip(scores, bias)]
        order = ref_order(select)
        biased = bias is not None
        near, exact = near_ties(select, scores, order, K, biased)
        if not near:
            event("routing: an exact tie at the top-k" if exact else "routing: no tie at the top-k")
            assert chosen == order[:K], (t, select)
        else:  # fp32 may order a near-tie either way: the choice must be right up to the slack
            event("routing: a near-tie at the top-k")
            unchosen = [e for e in range(E) if e not in chosen]
            assert all(select[e] >= select[u] - slack(scores, e, u, biased) for e in chosen for u in unchosen), \
                (t, select)
            assert all(select[a] >= select[b] - slack(scores, a, b, biased) for a, b in zip(chosen, chosen[1:])), \
                (t, select)
            # exact ties (bit-equal in fp32 too) still go to the lower index, in order and at the boundary
            assert all(a < b for i, a in enumerate(chosen) for b in chosen[i + 1:] if select[a] == select[b])
            assert not any(select[a] == select[b] and a < b for a in unchosen for b in chosen), (t, select)
        # the weights are the unbiased scores of the chosen experts, renormalised when asked
        ref = [scores[e] for e in chosen]
        if renormalize:
            ref = [v / math.fsum(ref) for v in ref]
        torch.testing.assert_close(weights[t].double(), torch.tensor(ref, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)


# --- the dispatch plan -----------------------------------------------------------------------


@given(data=st.data())
def test_build_plan_matches_a_python_loop(data):
    T = data.draw(st.integers(0, 40), label="T")
    E = data.draw(st.integers(1, 11), label="E")
    K = data.draw(st.integers(1, E), label="K")
    distinct = data.draw(st.booleans(), label="distinct experts per token")
    indices = expert_rows(data.draw, T, E, K, distinct)
    capacity = data.draw(st.none() | st.integers(1, T + 2), label="capacity")
    policy = data.draw(st.sampled_from(["position", "weight"]), label="drop_policy")
    weights = None
    if policy == "weight":  # few levels: equal weights are common
        weights = data.draw(st.lists(st.lists(st.sampled_from([0.125, 0.25, 0.5, 1.0]), min_size=K, max_size=K),
                                     min_size=T, max_size=T), label="weights")
    indices_t = torch.tensor(indices, dtype=torch.int64).reshape(T, K)
    weights_t = None if weights is None else torch.tensor(weights, dtype=torch.float32).reshape(T, K)

    plan = build_plan(indices_t, E, capacity, weights_t, policy)
    ref = ref_plan(indices, E, capacity, weights if capacity is not None else None)

    # the invariants, read off the plan alone
    counts = plan.counts_E.tolist()
    assert sum(counts) == T * K
    assert plan.kept_E.tolist() == [c if capacity is None else min(c, capacity) for c in counts]
    assert int(plan.dropped_pairs()) == sum(counts) - sum(plan.kept_E.tolist())
    assert plan.has_drops == (capacity is not None)
    row_of_pair = plan.row_of_pair_TK.reshape(-1).tolist()
    pair_of_row = plan.pair_of_row_R.tolist()
    token_of_row = plan.token_of_row_R.tolist()
    for p, r in enumerate(row_of_pair):
        if r >= 0:
            assert pair_of_row[r] == p  # the permutation and its inverse compose to identity
    for r, p in enumerate(pair_of_row):
        assert token_of_row[r] == (p // K if p >= 0 else -1)
        if p >= 0:
            assert row_of_pair[p] == r
    if capacity is None:
        ends = [sum(counts[: e + 1]) for e in range(E)]  # offsets are the cumsum of the counts
        assert plan.group_ends_E.tolist() == ends and plan.group_ends_E.dtype == torch.int32
        assert plan.starts_E.tolist() == [end - c for end, c in zip(ends, counts)]
        assert sorted(pair_of_row) == list(range(T * K))  # a permutation of all pairs
    # ... and everything equal to the loop
    assert counts == ref["counts"] and plan.kept_E.tolist() == ref["kept"]
    assert plan.starts_E.tolist() == ref["starts"] and plan.group_ends_E.tolist() == ref["ends"]
    assert plan.num_rows == len(ref["pair_of_row"])
    if policy == "position" or capacity is None:
        assert pair_of_row == ref["pair_of_row"]  # kept: each expert's earliest tokens, in order
        assert row_of_pair == ref["row_of_pair"] and token_of_row == ref["token_of_row"]
    else:  # "weight": which pairs each expert keeps (their order in the block is not promised)
        C = capacity
        for e in range(E):
            block, want = pair_of_row[e * C:(e + 1) * C], ref["pair_of_row"][e * C:(e + 1) * C]
            assert sorted(block) == sorted(want), (e, block, want)
            kept = ref["kept"][e]
            assert all(p >= 0 for p in block[:kept]) and all(p == -1 for p in block[kept:])


# --- dispatch and combine (torch backend) ------------------------------------------------------

_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.bfloat16: dict(rtol=2**-8, atol=1e-5)}  # bf16: rounded once from an fp32 sum


@given(data=st.data())
def test_dispatch_and_combine_match_float64_loops_forward_and_backward(data):
    T = data.draw(st.integers(0, 24), label="T")
    D = data.draw(st.integers(1, 8), label="D")
    E = data.draw(st.integers(1, 8), label="E")
    K = data.draw(st.integers(1, E), label="K")
    indices = expert_rows(data.draw, T, E, K)
    capacity = data.draw(st.none() | st.integers(1, T + 1), label="capacity")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), label="dtype")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    ref = ref_plan(indices, E, capacity)
    R = len(ref["pair_of_row"])
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    ys = torch.randn(R, D, generator=g).to(dtype).requires_grad_()
    w_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # routers give fp32 weights
    w = (torch.rand(T, K, generator=g) + 0.1).to(w_dtype).requires_grad_()
    grad_xs = torch.randn(R, D, generator=g).to(dtype)
    grad_y = torch.randn(T, D, generator=g).to(dtype)
    indices_t = torch.tensor(indices, dtype=torch.int64).reshape(T, K)

    xs, plan = dispatch(x, indices_t, E, capacity, backend="torch")
    y = combine(ys, plan, w, backend="torch")
    ((xs.float() * grad_xs.float()).sum() + (y.float() * grad_y.float()).sum()).backward()

    X, YS, W = x.detach().double().tolist(), ys.detach().double().tolist(), w.detach().double().tolist()
    GXS, GY = grad_xs.double().tolist(), grad_y.double().tolist()
    rows = [[ref["row_of_pair"][t * K + k] for k in range(K)] for t in range(T)]
    zero = [0.0] * D
    xs_ref = [X[tok] if tok >= 0 else zero for tok in ref["token_of_row"]]
    y_ref = [[math.fsum(W[t][k] * YS[r][d] for k, r in enumerate(rows[t]) if r >= 0) for d in range(D)]
             for t in range(T)]
    dx_ref = [[math.fsum(GXS[r][d] for r in rows[t] if r >= 0) for d in range(D)] for t in range(T)]
    dys_ref = [[W[p // K][p % K] * GY[p // K][d] for d in range(D)] if p >= 0 else zero
               for p in ref["pair_of_row"]]
    dw_ref = [[math.fsum(GY[t][d] * YS[r][d] for d in range(D)) if r >= 0 else 0.0 for r in rows[t]]
              for t in range(T)]

    def close(got, want, dt):
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64).reshape(got.shape),
                                   **_TOL[dt])

    assert xs.dtype == dtype and torch.equal(xs.double(), torch.tensor(xs_ref, dtype=torch.float64).reshape(R, D))
    close(y, y_ref, dtype)
    close(x.grad, dx_ref, dtype)
    close(ys.grad, dys_ref, dtype)
    close(w.grad, dw_ref, w_dtype)


# --- the MoE layer -------------------------------------------------------------------------


def ref_moe(layer: moebal.MoE, x_TD: torch.Tensor, score: str, bias_E: list[float] | None) -> tuple:
    """The layer's output from float64 copies of its weights, token by token, as a
    differentiable torch graph: route each token (scores of the float64 logits; top-K of
    score + bias, lower index on ties; weights renormalised for K > 1, the Router's
    default), keep each expert's earliest ``ceil(cf * T * K / E)`` pairs (at least 1, at
    most T), add up the kept experts' FFN outputs with their weights, plus the shared FFN.

    Returns ``(y [T, D], x leaf, {parameter name: leaf}, per-expert pair counts)``.
    """
    T, D, E, K = x_TD.shape[0], layer.d_model, layer.num_experts, layer.top_k
    x = x_TD.detach().double().requires_grad_()
    P = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    b_in, b_out = P.get("experts.b_in_EH"), P.get("experts.b_out_ED")
    act = layer.experts.activation
    cf = layer.capacity_factor
    capacity = None if cf is None else max(1, min(T, math.ceil(cf * T * K / E)))

    def expert(e: int, x_D: torch.Tensor) -> torch.Tensor:
        h = x_D @ P["experts.w_in_EDH"][e] + (b_in[e] if b_in is not None else 0.0)
        return ref_activation(h, act) @ P["experts.w_out_EFD"][e] + (b_out[e] if b_out is not None else 0.0)

    taken = [0] * E
    rows = []
    for t in range(T):
        logits_E = P["router.gate.weight"] @ x[t]
        if score == "softmax":
            ex = torch.exp(logits_E - logits_E.max().detach())
            scores_E = ex / ex.sum()
        else:
            scores_E = 1.0 / (1.0 + torch.exp(-logits_E))
        scores = scores_E.tolist()
        select = scores if bias_E is None else [s + b for s, b in zip(scores, bias_E)]
        order = ref_order(select)
        if K < E:  # the top-K set must be decided beyond fp32 rounding
            assume(select[order[K - 1]] - select[order[K]] > NEAR)
        chosen = order[:K]
        weights = scores_E[chosen]
        if K > 1:
            weights = weights / weights.sum()
        y_t = torch.zeros(D, dtype=torch.float64)
        for e, weight in zip(chosen, weights):
            taken[e] += 1
            if capacity is None or taken[e] <= capacity:  # else dropped: its expert is already full
                y_t = y_t + weight * expert(e, x[t])
        if layer.shared is not None:
            y_t = y_t + ref_activation(x[t] @ P["shared.w_in.weight"].T, act) @ P["shared.w_out.weight"].T
        rows.append(y_t)
    y = torch.stack(rows) if rows else torch.zeros(0, D, dtype=torch.float64)
    return y, x, P, taken


@given(data=st.data())
def test_moe_layer_equals_a_float64_per_token_reference_forward_and_backward(data):
    d_model = data.draw(st.integers(1, 16), label="d_model")
    d_ff = data.draw(st.integers(1, 16), label="d_ff")
    E = data.draw(st.integers(1, 8), label="E")
    K = data.draw(st.integers(1, E), label="K")
    T = data.draw(st.integers(0, 40), label="T")
    capacity_factor = data.draw(st.none() | st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]), label="capacity_factor")
    activation = data.draw(st.sampled_from(["swiglu", "gelu", "gelu_tanh"]), label="activation")
    router = data.draw(st.sampled_from(["aux_loss", "loss_free"]), label="router")
    shared = data.draw(st.integers(0, 1), label="num_shared_experts")
    ffn_bias = data.draw(st.booleans(), label="ffn_bias")
    training = data.draw(st.booleans(), label="training")
    batched = data.draw(st.booleans(), label="x as [1, T, D]")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")

    layer = moebal.MoE(d_model, d_ff, E, K, router=router, capacity_factor=capacity_factor, activation=activation,
                       num_shared_experts=shared, ffn_bias=ffn_bias, backend="torch").train(training)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            fan_in = p.shape[-2] if name.startswith("experts.w_") else p.shape[-1]
            spread = 1.5 if name == "router.gate.weight" else 1.0  # logits of std ~1.5: spread-out scores
            p.copy_(torch.randn(p.shape, generator=g) * spread / math.sqrt(fan_in))
        bias_E = None
        if router == "loss_free":
            layer.router.expert_bias.copy_((torch.rand(E, generator=g) - 0.5) * 0.2)
            bias_E = layer.router.expert_bias.double().tolist()
    x = torch.randn(T, d_model, generator=g)
    grad_y = torch.randn(T, d_model, generator=g)
    score = "sigmoid" if router == "loss_free" else "softmax"
    y_ref, x_ref, params_ref, counts = ref_moe(layer, x, score, bias_E)

    x.requires_grad_()
    y = layer(x.view(1, T, d_model) if batched else x)

    assert y.shape == ((1, T, d_model) if batched else (T, d_model)) and y.dtype == torch.float32
    torch.testing.assert_close(y.detach().reshape(T, d_model).double(), y_ref.detach(), rtol=1e-4, atol=1e-5)
    assert layer.last_stats.load.tolist() == counts
    # gradients of <y, grad_y> (the output only, not the balancing loss) by torch.autograd on both
    (y.reshape(T, d_model) * grad_y).sum().backward()
    if y_ref.requires_grad:
        (y_ref * grad_y.double()).sum().backward()

    def grad(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(t.shape, dtype=torch.float64) if t.grad is None else t.grad.double()

    torch.testing.assert_close(grad(x), grad(x_ref), rtol=1e-4, atol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grad(p), grad(params_ref[name]), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
