"""``HashRouting`` (Hash Layers): n-gram buckets, tables, weights, and the policy in a router.

References that share no code with the library: a plain-Python n-gram hash, table rows
looked up in a Python loop, properties that need no hash at all (same context -> same
experts; a changed token moves only its own window), Graham's bound for the balanced
table, float64 softmax for the router weights, and a per-token expert loop for the layer.
"""
import copy
import inspect

import pytest
import torch

import moebal
from moebal.experts import activate
from moebal.hash_table import bucket_counts, ngram_buckets
from moebal.policies.aux_loss import AuxLoss
from moebal.policies.hashing import HashRouting

D, E, K = 12, 6, 2


def _ids(B, S, V, seed=0):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def _python_buckets(ids_BS, n, V):
    """The documented hash, in Python ints: v = id % (P-1) + 1 (0 before the sequence start),
    h = (h * base + v) % P over the window oldest first, then h % V."""
    P, base = 2**31 - 1, 1_000_003
    out = []
    for row in ids_BS.tolist():
        for s in range(len(row)):
            h = 0
            for j in range(s - n + 1, s + 1):
                h = (h * base + (row[j] % (P - 1) + 1 if j >= 0 else 0)) % P
            out.append(h % V)
    return out


def _router(policy, E=E, K=K, **kw):
    torch.manual_seed(0)
    return moebal.Router(D, E, K, balancer=policy, **kw)


# --- buckets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])  # 5 > the shortest window: pads inside every sequence's start
def test_ngram_buckets_match_a_python_hash(n):
    ids_BS = _ids(3, 7, 1000, seed=n)
    ids_BS[0, 0] = 2**40  # a large id: the arithmetic must not overflow
    want = _python_buckets(ids_BS, n, 997)
    assert ngram_buckets(ids_BS.reshape(-1), n, 997, seq_len=7).tolist() == want
    assert ngram_buckets(ids_BS, n, 997).reshape(-1).tolist() == want  # the last dim is the sequence


def test_same_context_same_bucket_and_a_change_moves_only_its_window():
    n, V, S = 3, 2**20, 16
    ids_BS = _ids(4, S, 50)
    base_BS = ngram_buckets(ids_BS, n, V)
    ids_BS[1, 8:11] = ids_BS[2, 3:6] = torch.tensor([7, 8, 9])  # one 3-gram in two places
    again_BS = ngram_buckets(ids_BS, n, V)
    assert again_BS[1, 10] == again_BS[2, 5]
    changed_BS = ids_BS.clone()
    changed_BS[1, 5] += 1
    moved_BS = ngram_buckets(changed_BS, n, V) != again_BS
    assert moved_BS[1, 5:5 + n].all()  # its own window (with V = 2^20 no collision here)
    assert moved_BS.sum() == n  # and nothing else, in no other sequence
    assert not (base_BS[0] != again_BS[0]).any() and not (base_BS[3] != again_BS[3]).any()


def test_a_token_at_a_sequence_start_sees_padding_not_the_previous_sequence():
    ids_BS = _ids(2, 5, 30)
    a = ngram_buckets(ids_BS, 3, 1 << 20)
    b = ngram_buckets(torch.cat([torch.full((2, 1), 29), ids_BS], dim=1)[:, 1:], 3, 1 << 20)
    assert torch.equal(a, b)
    alone = ngram_buckets(ids_BS[1], 3, 1 << 20)  # the second sequence on its own
    assert torch.equal(a[1], alone)


def test_bucket_counts_count_the_real_tokens():
    ids_BS = _ids(3, 9, 40)
    mask_BS = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) < 0.7
    counts = bucket_counts(ids_BS, 2, 23, token_mask=mask_BS)
    want = [0] * 23
    for b, m in zip(ngram_buckets(ids_BS, 2, 23, token_mask=mask_BS).reshape(-1).tolist(), mask_BS.reshape(-1).tolist()):
        want[b] += m
    assert counts.tolist() == want and counts.dtype == torch.int64 and counts.sum() == mask_BS.sum()


def test_bucket_arguments_are_checked():
    with pytest.raises(ValueError, match="must be < num_buckets=10 .* got 10"):
        ngram_buckets(torch.tensor([3, 10]), 1, 10)
    with pytest.raises(ValueError, match=">= 0, got -5"):
        ngram_buckets(torch.tensor([3, -5]), 2, 10)
    with pytest.raises(ValueError, match="not whole sequences"):
        ngram_buckets(torch.arange(7), 2, 10, seq_len=3)
    with pytest.raises(ValueError, match="ngram must be an int >= 1"):
        ngram_buckets(torch.arange(4), 0, 10)
    with pytest.raises(TypeError, match="integer tensor"):
        ngram_buckets(torch.rand(4), 1, 10)


# --- tables ------------------------------------------------------------------------------------


def test_round_robin_table_closed_form():
    r = _router(HashRouting(table="round_robin", num_buckets=11), E=5, K=3)
    assert r.hash_table.tolist() == [[(v * 3 + j) % 5 for j in range(3)] for v in range(11)]


@pytest.mark.parametrize("E_,K_", [(6, 2), (7, 7)])  # K = E: every row is every expert
def test_random_table_rows_are_k_distinct_experts_and_seeded(E_, K_):
    r = _router(HashRouting(table="random", num_buckets=300, seed=3), E=E_, K=K_)
    t = r.hash_table
    assert t.shape == (300, K_) and t.dtype == torch.int64 and ((t >= 0) & (t < E_)).all()
    assert all(len(set(row)) == K_ for row in t.tolist())
    assert torch.equal(t, _router(HashRouting(table="random", num_buckets=300, seed=3), E=E_, K=K_).hash_table)
    if K_ < E_:
        assert not torch.equal(t, _router(HashRouting(table="random", num_buckets=300, seed=4), E=E_, K=K_).hash_table)
        assert torch.bincount(t.reshape(-1), minlength=E_).min() > 0.6 * 300 * K_ / E_  # uniform-ish


def _max_load(table_VK, counts_V, E_):
    loads = [0.0] * E_
    for v, row in enumerate(table_VK.tolist()):
        for e in row:
            loads[e] += float(counts_V[v])
    return max(loads)


@pytest.mark.parametrize("K_", [1, 2])
def test_balanced_table_is_never_worse_than_random_on_zipf_counts(K_):
    V, E_ = 1000, 16
    counts = (1e6 / torch.arange(1, V + 1, dtype=torch.float64)).round()  # Zipf frequencies
    balanced = _max_load(HashRouting(counts=counts).build_table(E_, K_), counts, E_)
    for seed in range(5):
        rand = _max_load(HashRouting(table="random", num_buckets=V, seed=seed).build_table(E_, K_), counts, E_)
        assert balanced <= rand
    if K_ == 1:
        # no assignment beats max(mean, heaviest id); LPT stays within Graham's 4/3 of it here
        # (not a theorem for every count vector: E+1 equal ids need twice the mean on one expert)
        lower = max(counts.sum().item() / E_, counts.max().item())
        assert balanced <= 4 / 3 * lower


def test_routed_experts_are_the_table_rows_of_the_buckets():
    counts = torch.arange(1, 51, dtype=torch.float64)
    r = _router(HashRouting(counts=counts, ngram=2))
    ids_BS = _ids(3, 8, 1000)
    got = r(torch.randn(24, D), seq_len=8, token_ids=ids_BS.reshape(-1)).indices
    table = r.hash_table.tolist()
    assert got.tolist() == [table[b] for b in _python_buckets(ids_BS, 2, 50)]


def test_user_table_is_validated():
    ok = torch.tensor([[0, 1], [2, 3], [5, 4]])
    assert torch.equal(_router(HashRouting(table=ok)).hash_table, ok)
    for bad, match in [
        (torch.tensor([0, 1]), "2-d tensor"),
        (ok.float(), "integer tensor"),
        (torch.tensor([[0, -1]]), ">= 0, got -1"),
        (torch.tensor([[0, 1], [3, 3]]), r"distinct experts, row 1 is \[3, 3\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            HashRouting(table=bad)
    with pytest.raises(ValueError, match="3 columns, the router's top_k is 2"):
        _router(HashRouting(table=torch.tensor([[0, 1, 2]])))
    with pytest.raises(ValueError, match="< num_experts=6, got 6"):
        _router(HashRouting(table=torch.tensor([[0, 6]])))
    with pytest.raises(ValueError, match="num_buckets=4 but the table's rows is 3"):
        HashRouting(table=ok, num_buckets=4)


def test_configuration_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"needs counts.*bucket_counts\(sample_ids"):
        HashRouting()
    with pytest.raises(ValueError, match="needs num_buckets"):
        HashRouting(table="random")
    with pytest.raises(ValueError, match="used only by table='balanced'"):
        HashRouting(table="round_robin", num_buckets=4, counts=torch.ones(4))
    with pytest.raises(ValueError, match="num_buckets=5 but len\\(counts\\) is 4"):
        HashRouting(counts=torch.ones(4), num_buckets=5)
    with pytest.raises(ValueError, match="weights must be 'unit' or 'router'"):
        HashRouting(table="random", num_buckets=4, weights="softmax")
    with pytest.raises(ValueError, match="table must be one of"):
        HashRouting(table="lpt", num_buckets=4)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        HashRouting(counts=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="null experts"):
        _router(HashRouting(table="random", num_buckets=4), num_null_experts=2)
    with pytest.raises(ValueError, match="group-limited"):
        _router(HashRouting(table="random", num_buckets=4), num_groups=2, top_groups=1)
    with pytest.raises(ValueError, match="top_k <= num_experts"):
        HashRouting(table="random", num_buckets=4).build_table(2, 3)


# --- the policy in a router ------------------------------------------------------------------


def test_missing_token_ids_and_out_of_range_ids_raise():
    r = _router(HashRouting(table="random", num_buckets=10))
    with pytest.raises(ValueError, match=r"HashRouting needs token_ids: pass MoE\(...\)\(x, token_ids=...\)"):
        r(torch.randn(3, D))
    with pytest.raises(ValueError, match="got 12"):
        r(torch.randn(3, D), token_ids=torch.tensor([1, 12, 3]))


def test_unigram_experts_do_not_depend_on_other_tokens():
    r = _router(HashRouting(table="random", num_buckets=100))
    ids = _ids(1, 40, 100).reshape(-1)
    first = r(torch.randn(40, D), token_ids=ids).indices
    other = ids.clone()
    other[1::2] = (other[1::2] + 37) % 100
    again = r(torch.randn(40, D), token_ids=other).indices  # other tokens, other activations
    assert torch.equal(first[0::2], again[0::2])


@pytest.mark.parametrize("K_", [1, 3])  # k = 1: weight exactly 1
def test_unit_weights_are_one_over_k_and_the_gate_never_runs(K_):
    r = _router(HashRouting(table="random", num_buckets=50), K=K_)
    assert not r.selector.needs_logits
    with torch.no_grad():
        r.gate.weight.fill_(float("nan"))  # a gate GEMM would make every weight NaN
    x = torch.randn(9, D, requires_grad=True)
    out = r(x, token_ids=torch.arange(9))
    assert out.scores is None and out.nonfinite_tokens == 0
    assert torch.equal(out.weights, torch.full((9, K_), 1.0 / K_))
    assert torch.equal(out.indices, r.hash_table[:9])


def test_unit_weights_of_a_replayed_row_with_no_expert():
    w = HashRouting.unit_weights(torch.tensor([[0, 1, 2], [4, -1, 5], [-1, -1, -1]]))
    assert torch.equal(w, torch.tensor([[1 / 3] * 3, [0.5, 0.0, 0.5], [0.0] * 3]))


@pytest.mark.parametrize("score,renormalize", [("softmax", True), ("sigmoid", True), ("softmax", False)])
def test_router_weights_are_the_scores_at_the_hashed_experts(score, renormalize):
    r = _router(HashRouting(table="random", num_buckets=30, weights="router"), score=score, renormalize=renormalize)
    assert r.selector.needs_logits
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(2))
    ids = _ids(1, 10, 30).reshape(-1)
    out = r(x, token_ids=ids)
    logits = x.double() @ r.gate.weight.double().T
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    idx = r.hash_table[ids]
    assert torch.equal(out.indices, idx)
    want = scores.gather(1, idx)
    if renormalize:
        want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(out.weights.double(), want, rtol=1e-6, atol=1e-7)
    out.weights.sum().backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0


def test_token_mask_gives_minus_one_and_masked_ids_are_not_checked():
    r = _router(HashRouting(table="random", num_buckets=10))
    ids = torch.tensor([1, 99, 3, -7])  # masked padding ids out of range: fine
    mask = torch.tensor([True, False, True, False])
    out = r(torch.randn(4, D), token_mask=mask, token_ids=ids)
    assert (out.indices[~mask] == -1).all() and (out.weights[~mask] == 0).all()
    assert torch.equal(out.indices[mask], r.hash_table[ids[mask]])


def test_left_padding_does_not_change_an_ngram_routing():
    r = _router(HashRouting(table="random", num_buckets=1 << 16, ngram=3))
    ids = _ids(1, 6, 500).reshape(-1)
    plain = r(torch.randn(6, D), token_ids=ids).indices
    padded = r(torch.randn(9, D), token_ids=torch.cat([torch.full((3,), 77), ids]),
               token_mask=torch.arange(9) >= 3).indices
    assert torch.equal(padded[3:], plain)


def test_zero_tokens():
    for weights in ("unit", "router"):
        r = _router(HashRouting(table="random", num_buckets=10, ngram=2, weights=weights))
        out = r(torch.randn(0, D), seq_len=4, token_ids=torch.zeros(0, dtype=torch.long))
        assert out.indices.shape == (0, K) and out.weights.shape == (0, K)


def test_table_state_dict_dtype_casts_and_copies():
    a = _router(HashRouting(table="random", num_buckets=20, seed=0))
    b = _router(HashRouting(table="random", num_buckets=20, seed=1))
    assert not torch.equal(a.hash_table, b.hash_table)
    b.load_state_dict(a.state_dict())  # a loaded table wins over the one the policy built
    ids = torch.arange(20)
    assert torch.equal(b(torch.randn(20, D), token_ids=ids).indices, a.hash_table)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        c = cast(copy.deepcopy(a))
        assert c.hash_table.dtype == torch.int64 and torch.equal(c.hash_table, a.hash_table)
    c = copy.deepcopy(a)
    assert torch.equal(c.hash_table, a.hash_table) and c.hash_table.data_ptr() != a.hash_table.data_ptr()
    assert torch.equal(c(torch.randn(20, D), token_ids=ids).indices, a.hash_table)


def test_policy_is_a_small_frozen_config_with_a_short_repr():
    user = HashRouting(table=torch.tensor([[0, 1], [2, 3]]))
    p = HashRouting(counts=torch.arange(4.0), ngram=2)
    assert repr(p).startswith("HashRouting(table='balanced', num_buckets=4, counts=<[4] #")
    assert repr(user).startswith("HashRouting(table=<int64 [2, 2] #")
    assert repr(HashRouting(counts=torch.arange(4.0), ngram=2)) == repr(p)  # same values, same repr
    assert repr(HashRouting(counts=torch.arange(1.0, 5.0), ngram=2)) != repr(p)
    assert p == p and p != HashRouting(counts=torch.arange(4.0), ngram=2) and len({p, user}) == 2
    with pytest.raises(AttributeError):
        p.ngram = 3
    q = copy.deepcopy(p)
    assert repr(q) == repr(p) and torch.equal(q.build_table(4, 1), p.build_table(4, 1))
    r = _router(p)  # the router's repr shows the policy's
    assert "counts=<[4] #" in repr(r) and "tensor(" not in repr(r)


def test_hash_routing_combines_with_a_loss_policy():
    r = _router((HashRouting(table="random", num_buckets=10), AuxLoss(1e-2)))
    r.train()
    out = r(torch.randn(8, D), token_ids=torch.arange(8))
    assert out.scores is not None and out.aux_loss > 0  # AuxLoss needs the gate: it runs
    assert torch.equal(out.weights, torch.full((8, K), 0.5)) and torch.equal(out.indices, r.hash_table[:8])


# --- in the layer ----------------------------------------------------------------------------

_MOE_TAKES_IDS = "token_ids" in inspect.signature(moebal.MoE.forward).parameters
needs_moe_ids = pytest.mark.skipif(not _MOE_TAKES_IDS, reason="MoE.forward(token_ids=...) not there yet")


def _layer(policy, K_=K):
    torch.manual_seed(0)
    router = moebal.Router(D, E, K_, balancer=policy)
    return moebal.MoE(D, 16, E, K_, router=router, activation="gelu", backend="torch")


def _reference(moe, x_TD, idx_TK, w_TK):
    w_in, w_out = moe.experts.w_in_EDH.detach().double(), moe.experts.w_out_EFD.detach().double()
    y = torch.zeros_like(x_TD, dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            y[t] += float(w_TK[t, k]) * (activate(x_TD[t].double() @ w_in[e], "gelu") @ w_out[e])
    return y


@needs_moe_ids
@pytest.mark.parametrize("weights", ["unit", "router"])
def test_moe_with_a_hash_router_equals_a_per_token_expert_loop(weights):
    moe = _layer(HashRouting(table="random", num_buckets=1 << 12, ngram=2, weights=weights))
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    ids = _ids(2, 5, 300)
    y = moe(x, token_ids=ids)
    idx = moe.router.hash_table[torch.tensor(_python_buckets(ids, 2, 1 << 12))]
    routing = moe.router(x.reshape(-1, D), seq_len=5, token_ids=ids.reshape(-1))
    assert torch.equal(routing.indices, idx)
    w = torch.full((10, K), 1 / K) if weights == "unit" else routing.weights.detach()
    torch.testing.assert_close(y.reshape(-1, D).double(), _reference(moe, x.reshape(-1, D), idx, w), rtol=1e-5, atol=1e-6)


@needs_moe_ids
def test_unit_weight_layer_stays_finite_with_a_nan_gate_and_gives_it_no_gradient():
    moe = _layer(HashRouting(table="round_robin", num_buckets=64, weights="unit"))
    with torch.no_grad():
        moe.router.gate.weight.fill_(float("nan"))
    moe.train()
    x = torch.randn(3, 4, D, requires_grad=True)
    y = moe(x, token_ids=_ids(3, 4, 64))
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert moe.router.gate.weight.grad is None
    assert torch.isfinite(x.grad).all() and moe.experts.w_in_EDH.grad is not None


@needs_moe_ids
def test_layer_masks_tokens_and_needs_ids():
    moe = _layer(HashRouting(table="random", num_buckets=64))
    x, ids = torch.randn(2, 3, D), _ids(2, 3, 64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    y = moe(x, token_mask=mask, token_ids=ids)
    assert (y[~mask] == 0).all()
    assert torch.equal(moe.last_stats.load.sum(), torch.tensor(int(mask.sum()) * K))
    with pytest.raises(ValueError, match="HashRouting needs token_ids"):
        moe(x)


@pytest.mark.parametrize("weights", ["unit", "router"])
def test_router_compiles_fullgraph_for_two_token_counts(weights):
    import torch._dynamo

    torch._dynamo.reset()
    r = _router(HashRouting(table="random", num_buckets=1 << 10, ngram=3, weights=weights))
    r.train()
    compiled = torch.compile(r, fullgraph=True, dynamic=True, backend="aot_eager")
    for B, S in ((3, 4), (5, 6)):
        x, ids = torch.randn(B * S, D), _ids(B, S, 1000, seed=B).reshape(-1)
        mask = torch.arange(B * S) % 7 != 0
        want = r(x, seq_len=S, token_mask=mask, token_ids=ids)
        got = compiled(x, seq_len=S, token_mask=mask, token_ids=ids)
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.weights, want.weights)


@needs_moe_ids
def test_layer_compiles_fullgraph_once_for_two_shapes():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _layer(HashRouting(table="random", num_buckets=1 << 10, ngram=2))
    eager.train()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, dynamic=True, backend="aot_eager")
    for B, S in ((2, 5), (3, 7)):  # the sequence length moves too: seq_len is symbolic
        x, ids = torch.randn(B, S, D), _ids(B, S, 1000, seed=S)
        torch.testing.assert_close(compiled(x, token_ids=ids), eager(x, token_ids=ids))
    assert counters["stats"]["unique_graphs"] == 1


@needs_moe_ids
@pytest.mark.parametrize("weights", ["unit", "router"])
def test_replayed_routing_gives_the_same_output(weights):
    moe = _layer(HashRouting(table="random", num_buckets=64, weights=weights))
    x, ids = torch.randn(2, 4, D), _ids(2, 4, 64)
    with moebal.record_routing(moe) as rec:
        y = moe(x, token_ids=ids)
    with moebal.replay_routing(moe, rec.indices):
        again = moe(x, token_ids=ids)
    assert torch.equal(again, y)
