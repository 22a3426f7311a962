"""LIMoE's entropies and Hash Layers' balanced table (moebal.functional), against closed
forms, float64 loops and a brute-force optimum."""
import itertools
import math

import pytest
import torch

from moebal.functional import balanced_hash_table, global_entropy, local_entropy


def _h64(p):  # float64 entropy of one distribution, as a loop
    return -sum(float(x) * math.log(float(x)) for x in p if x > 0)


def test_entropy_closed_forms():
    E = 6
    one_hot = torch.eye(E)[torch.tensor([0, 3, 3, 5])]
    assert local_entropy(one_hot).item() == 0.0
    torch.testing.assert_close(local_entropy(torch.full((5, E), 1 / E)), torch.tensor(math.log(E)))
    torch.testing.assert_close(global_entropy(torch.eye(E)), torch.tensor(math.log(E)))  # uniform marginal
    assert global_entropy(torch.eye(E)[torch.zeros(7, dtype=torch.long)]).item() == 0.0  # all on one expert
    empty = torch.zeros(0, E)
    assert local_entropy(empty).item() == 0.0 and global_entropy(empty).item() == 0.0
    nobody = torch.zeros(3, dtype=torch.bool)
    assert local_entropy(torch.rand(3, E), nobody).item() == 0.0 == global_entropy(torch.rand(3, E), nobody).item()


def test_entropies_equal_float64_loops_with_a_mask():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(40, 8, generator=g) * 3, dim=-1)
    mask = torch.rand(40, generator=g) > 0.4
    p[~mask] = float("nan")  # tokens that do not count may hold anything
    kept = p[mask].double()
    want_local = sum(_h64(row) for row in kept) / len(kept)
    want_global = _h64(kept.mean(dim=0))
    assert abs(local_entropy(p, mask).item() - want_local) < 1e-5
    assert abs(global_entropy(p, mask).item() - want_global) < 1e-5


def test_entropies_have_finite_gradients_at_saturated_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [0.0, 0.0, 0.0]], requires_grad=True)
    p = torch.softmax(logits, dim=-1)  # exact zeros and ones
    (local_entropy(p) + global_entropy(p)).backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_masks_are_checked():
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape \\[4\\]"):
        local_entropy(torch.rand(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="probs must be"):
        global_entropy(torch.rand(4))


def _loads(table, counts, E):
    loads = torch.zeros(E, dtype=torch.float64)
    for v in range(table.shape[0]):
        for e in table[v].tolist():
            loads[e] += float(counts[v])
    return loads


@pytest.mark.parametrize("E,K", [(4, 1), (5, 2), (8, 3), (3, 3)])
def test_hash_table_is_k_distinct_valid_experts_and_counts_every_id(E, K):
    counts = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(E + K)).float()
    table = balanced_hash_table(counts, E, K)
    assert table.shape == (37, K) and table.dtype == torch.int64
    assert ((table >= 0) & (table < E)).all()
    assert all(len(set(row)) == K for row in table.tolist())
    assert abs(_loads(table, counts, E).sum().item() - K * counts.sum().item()) < 1e-6


@pytest.mark.parametrize("seed", range(12))
def test_k1_table_is_within_grahams_bound_of_the_optimum(seed):
    """Brute force over every assignment of 7 ids to 3 experts (3^7 = 2187)."""
    counts = torch.randint(1, 20, (7,), generator=torch.Generator().manual_seed(seed)).float()
    E = 3
    best = min(
        max(sum(float(counts[v]) for v in range(7) if a[v] == e) for e in range(E))
        for a in itertools.product(range(E), repeat=7)
    )
    got = _loads(balanced_hash_table(counts, E), counts, E).max().item()
    assert got <= (4 / 3 - 1 / (3 * E)) * best + 1e-9


def test_balanced_table_beats_random_tables_on_zipf_counts():
    V, E, K = 500, 16, 2
    counts = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)  # Zipf frequencies
    balanced = _loads(balanced_hash_table(counts, E, K), counts, E).max()
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        rand = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)])
        assert balanced <= _loads(rand, counts, E).max()


def test_hash_table_checks_its_arguments():
    with pytest.raises(ValueError, match="counts must be finite and >= 0"):
        balanced_hash_table(torch.tensor([1.0, -1.0]), 2)
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        balanced_hash_table(torch.ones(3), 2, 3)
    with pytest.raises(ValueError, match="num_experts must be an int >= 1"):
        balanced_hash_table(torch.ones(3), 0)


def _group_limited_reference(logits, bias, K, G, top_groups, score):
    """float64 loops: DeepSeek-V3 group-limited top-k (ties -> lower index)."""
    s = torch.softmax(logits.double(), -1) if score == "softmax" else torch.sigmoid(logits.double())
    sel = s + bias.double()
    T, E = sel.shape
    n = E // G
    out = []
    for t in range(T):
        gs = []
        for g in range(G):
            vals = sorted(sel[t, g * n:(g + 1) * n].tolist(), reverse=True)
            gs.append(sum(vals[: min(2, n)]))
        groups = sorted(range(G), key=lambda g: (-gs[g], g))[:top_groups]
        eligible = [e for e in range(E) if e // n in groups]
        out.append(sorted(eligible, key=lambda e: (-float(sel[t, e]), e))[:K])
    return torch.tensor(out)


@pytest.mark.parametrize("E,G,top_groups,K", [(8, 4, 2, 2), (16, 8, 3, 4), (6, 3, 1, 2), (12, 4, 4, 3), (6, 6, 2, 2)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_group_limited_topk_equals_a_float64_loop(E, G, top_groups, K, score):
    from moebal.functional import topk_routing

    g = torch.Generator().manual_seed(E * 10 + G)
    logits = torch.randn(50, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.1
    w, idx = topk_routing(logits, K, score, bias=bias, renormalize=False, num_groups=G, top_groups=top_groups)
    assert torch.equal(idx, _group_limited_reference(logits, bias, K, G, top_groups, score))
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    assert torch.equal(w, scores.gather(1, idx))  # unbiased scores, as without groups


def test_group_limited_arguments_are_checked():
    from moebal.functional import topk_routing

    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="num_groups \\(3\\) must divide num_experts \\(8\\)"):
        topk_routing(x, 2, num_groups=3, top_groups=1)
    with pytest.raises(ValueError, match="top_groups must be <= num_groups"):
        topk_routing(x, 2, num_groups=4, top_groups=5)
    with pytest.raises(ValueError, match="top_k \\(5\\) must be <= top_groups"):
        topk_routing(x, 5, num_groups=4, top_groups=2)


def test_router_with_groups_routes_within_the_chosen_groups():
    from moebal import LinearAssignment, LossFree, Router

    torch.manual_seed(3)
    r = Router(16, 8, 2, score="sigmoid", balancer=LossFree(), num_groups=4, top_groups=2)
    x = torch.randn(30, 16)
    routing = r(x)
    logits = x @ r.gate.weight.t()
    want = _group_limited_reference(logits, torch.zeros(8), 2, 4, 2, "sigmoid")
    assert torch.equal(routing.indices, want)
    with pytest.raises(ValueError, match="does not apply to LinearAssignment"):
        Router(16, 8, 2, balancer=LinearAssignment(), num_groups=4, top_groups=2)
