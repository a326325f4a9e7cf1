"""Reference selection: prototype positions, causality, and hand-computed references."""

import pytest
import torch

from deltakv.reference import (
    ReferenceSpec, prototype_mask, prototype_positions, select_references, select_references_from,
    sliding_average,
)


def brute_force_cluster(spec: ReferenceSpec, kv: torch.Tensor) -> torch.Tensor:
    """Loop-per-token reference, written independently of the vectorised code."""
    T, _ = kv.shape
    out = torch.zeros_like(kv)
    protos = [j for j in range(T) if j < spec.num_sinks or (spec.stride and (j - spec.num_sinks) % spec.stride == 0)]
    for t in range(T):
        cands = [j for j in protos if j < t]
        if not cands:
            continue
        scores = []
        for j in cands:
            a, b = kv[t].double(), kv[j].double()
            if spec.metric == "l2":
                s = -((a - b) ** 2).sum()
            elif spec.metric == "dot":
                s = (a * b).sum()
            else:
                s = (a * b).sum() / (a.norm() * b.norm())
            scores.append(float(s))
        order = sorted(range(len(cands)), key=lambda i: -scores[i])[: spec.top_k]
        if spec.weighting == "mean":
            w = [1.0 / len(order)] * len(order)
        else:
            m = max(scores[i] for i in order)
            e = [torch.exp(torch.tensor((scores[i] - m) / spec.temperature, dtype=torch.float64)) for i in order]
            w = [float(x / sum(e)) for x in e]
        out[t] = sum(wi * kv[cands[i]] for wi, i in zip(w, order))
    return out


def test_stride_and_prototype_positions():
    spec = ReferenceSpec(num_sinks=4, cluster_ratio=0.25)
    assert spec.stride == 4
    assert prototype_positions(spec, 20).tolist() == [0, 1, 2, 3, 4, 8, 12, 16]
    assert prototype_mask(spec, 6, offset=14).tolist() == [False, False, True, False, False, False]
    assert ReferenceSpec(cluster_ratio=0.1).stride == 10
    assert ReferenceSpec(cluster_ratio=0.3).stride == 3  # round(3.33)
    assert ReferenceSpec(num_sinks=2, cluster_ratio=0.0).is_prototype(torch.arange(6)).tolist() == [True, True] + [False] * 4


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
@pytest.mark.parametrize("weighting", ["mean", "softmax"])
def test_cluster_reference_matches_brute_force(metric, weighting):
    torch.manual_seed(0)
    spec = ReferenceSpec(num_sinks=2, cluster_ratio=0.2, metric=metric, top_k=3, weighting=weighting, temperature=2.0)
    kv = torch.randn(40, 6)
    got = select_references(spec, kv)
    torch.testing.assert_close(got, brute_force_cluster(spec, kv), atol=1e-5, rtol=1e-5)


def test_reference_is_causal_under_future_perturbation():
    torch.manual_seed(1)
    spec = ReferenceSpec(num_sinks=3, cluster_ratio=0.2, top_k=2)
    kv = torch.randn(2, 50, 8)
    ref = select_references(spec, kv)
    t = 31
    perturbed = kv.clone()
    perturbed[:, t:] += 100 * torch.randn_like(perturbed[:, t:])
    ref2 = select_references(spec, perturbed)
    torch.testing.assert_close(ref2[:, :t], ref[:, :t])
    # and no prototype is ever its own (or a later token's) reference: token 0 has none at all
    assert ref[:, 0].abs().sum() == 0
    for e2e_spec in [ReferenceSpec(kind="e2e", top_k=4)]:
        r1, r2 = select_references(e2e_spec, kv), select_references(e2e_spec, perturbed)
        torch.testing.assert_close(r2[:, :t], r1[:, :t])


def test_fewer_prototypes_than_top_k_and_none_kind():
    spec = ReferenceSpec(num_sinks=1, cluster_ratio=0.0, top_k=4)
    kv = torch.arange(12.0).view(4, 3)
    ref = select_references(spec, kv)
    assert torch.equal(ref[0], torch.zeros(3))
    assert torch.equal(ref[1:], kv[:1].expand(3, 3))  # only the sink is available
    assert torch.equal(select_references(ReferenceSpec(kind="none"), kv), torch.zeros_like(kv))


def test_sliding_average_by_hand():
    kv = torch.arange(10.0).view(5, 2)
    got = sliding_average(kv, 2)
    want = torch.stack([torch.zeros(2), kv[0], (kv[0] + kv[1]) / 2, (kv[1] + kv[2]) / 2, (kv[2] + kv[3]) / 2])
    torch.testing.assert_close(got, want)


def test_select_from_explicit_prototypes_matches_full_sequence():
    """The engine's decode-time call (prototypes held separately) equals the training-time call."""
    torch.manual_seed(2)
    spec = ReferenceSpec(num_sinks=4, cluster_ratio=0.125, top_k=2)
    kv = torch.randn(3, 70, 16)  # e.g. [kv_heads or batch, T, D]
    full = select_references(spec, kv)
    pos = prototype_positions(spec, 70)
    q = torch.tensor([45, 69])
    got = select_references_from(spec, kv[:, q], q, kv[:, pos], pos)
    torch.testing.assert_close(got, full[:, q])


def test_bad_spec_errors():
    with pytest.raises(ValueError, match="metric"):
        ReferenceSpec(metric="manhattan")
    with pytest.raises(ValueError, match="kind"):
        ReferenceSpec(kind="cluster")
    with pytest.raises(ValueError, match="Unknown reference fields"):
        ReferenceSpec.from_dict({"sinks": 3})
