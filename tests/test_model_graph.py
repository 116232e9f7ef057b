"""Dense patch-graph ops against trusted references: brute-force kNN, dgl.nn.ChebConv
(dgl 1.1.3) and dgl.laplacian_lambda_max. (ViG's max-relative conv is tested in test_baselines.)"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from multifusion.model.graph import (
    ChebConv,
    PatchGraphEncoder,
    add_virtual_node,
    knn_adjacency,
    knn_graph,
    laplacian_lambda_max,
)


def _dgl():
    os.environ.setdefault("DGLBACKEND", "pytorch")
    import dgl  # the test oracle (dev dependency, dgl==1.1.3)

    return dgl


def _random_symmetric_graphs(B: int, N: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """(B, N, N) random undirected graphs without self loops, every node with an edge."""
    upper = (torch.rand(B, N, N, generator=gen) < p).float().triu(1)
    ring = torch.roll(torch.eye(N), 1, dims=1).expand(B, N, N)  # guarantees degree >= 1
    adj = torch.maximum(upper + upper.transpose(1, 2), torch.maximum(ring, ring.transpose(1, 2)))
    return adj * (1 - torch.eye(N))


def _to_dgl(dgl, adj: torch.Tensor):
    """One (N, N) dense adjacency, adj[i, j] = edge j -> i, as a DGLGraph."""
    dst, src = adj.nonzero(as_tuple=True)
    return dgl.graph((src, dst), num_nodes=adj.shape[0])


def test_knn_graph_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=gen)
    idx = knn_graph(x, 5)
    assert idx.shape == (3, 20, 5)
    for b in range(3):
        for i in range(20):
            sims = [(F.cosine_similarity(x[b, i], x[b, j], dim=0).item(), j) for j in range(20) if j != i]
            expected = [j for _, j in sorted(sims, reverse=True)[:5]]
            assert idx[b, i].tolist() == expected


def test_knn_graph_clamps_k_to_other_nodes():
    x = torch.randn(2, 4, 6)
    idx = knn_graph(x, 8)
    assert idx.shape == (2, 4, 3)
    for i in range(4):
        assert sorted(idx[0, i].tolist()) == [j for j in range(4) if j != i]


def test_knn_adjacency_is_symmetric_without_self_loops():
    idx = knn_graph(torch.randn(2, 10, 4), 3)
    adj = knn_adjacency(idx)
    assert torch.equal(adj, adj.transpose(1, 2))
    assert adj.diagonal(dim1=1, dim2=2).sum() == 0
    for b in range(2):
        for i in range(10):
            assert adj[b, i, idx[b, i]].eq(1).all()
    directed = knn_adjacency(idx, symmetric=False)
    assert directed.sum(-1).eq(3).all()


def test_virtual_node_is_linked_to_every_patch():
    adj = knn_adjacency(knn_graph(torch.randn(2, 9, 4), 3))
    with_vn = add_virtual_node(adj)
    assert with_vn.shape == (2, 10, 10)
    assert torch.equal(with_vn[:, :9, :9], adj)
    assert with_vn[:, 9, :9].eq(1).all() and with_vn[:, :9, 9].eq(1).all()
    assert with_vn[:, 9, 9].eq(0).all()
    encoder = PatchGraphEncoder(dim=4, k=3, cheb_k=2, layers=1, dropout=0.0, lambda_max=None)
    graph, _ = encoder.build_graph(torch.randn(2, 9, 4))
    assert graph[:, 9, :9].eq(1).all() and graph[:, :9, 9].eq(1).all()


def test_laplacian_lambda_max_matches_dgl():
    dgl = _dgl()
    adj = add_virtual_node(_random_symmetric_graphs(4, 11, 0.3, torch.Generator().manual_seed(1)))
    ours = laplacian_lambda_max(adj)
    for b in range(4):
        ref = dgl.laplacian_lambda_max(_to_dgl(dgl, adj[b]))[0]
        assert ours[b].item() == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("exact_lambda", [False, True])
def test_chebconv_matches_dgl(k: int, exact_lambda: bool):
    dgl = _dgl()
    from dgl.nn import ChebConv as DGLChebConv

    gen = torch.Generator().manual_seed(10 + k)
    B, N, c_in, c_out = 3, 13, 6, 5
    adj = add_virtual_node(_random_symmetric_graphs(B, N - 1, 0.25, gen))
    x = torch.randn(B, N, c_in, generator=gen)
    ours = ChebConv(c_in, c_out, k)
    ref = DGLChebConv(c_in, c_out, k, activation=None)
    ref.linear.load_state_dict(ours.linear.state_dict())
    lam = laplacian_lambda_max(adj) if exact_lambda else None
    out = ours(x, adj, lam)  # (B, N, c_out)

    batched = dgl.batch([_to_dgl(dgl, adj[b]) for b in range(B)])
    ref_lam = dgl.laplacian_lambda_max(batched) if exact_lambda else [2.0] * B
    expected = ref(batched, x.reshape(B * N, c_in), lambda_max=ref_lam).view(B, N, c_out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_chebconv_matches_dgl_on_directed_graph_with_explicit_lambda():
    dgl = _dgl()
    from dgl.nn import ChebConv as DGLChebConv

    gen = torch.Generator().manual_seed(3)
    N = 9
    adj = (torch.rand(N, N, generator=gen) < 0.35).float() * (1 - torch.eye(N))  # directed
    x = torch.randn(1, N, 4, generator=gen)
    ours = ChebConv(4, 3, 3)
    ref = DGLChebConv(4, 3, 3, activation=None)
    ref.linear.load_state_dict(ours.linear.state_dict())
    out = ours(x, adj.unsqueeze(0), torch.tensor([1.7]))
    expected = ref(_to_dgl(dgl, adj), x[0], lambda_max=[1.7])
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-4)


def test_patch_graph_encoder_gradients_and_shape():
    encoder = PatchGraphEncoder(dim=8, k=4, cheb_k=3, layers=2, dropout=0.0, lambda_max=None)
    patches = torch.randn(3, 16, 8, requires_grad=True)
    virtual = torch.randn(3, 8, requires_grad=True)
    e_vn = encoder(patches, virtual)
    assert e_vn.shape == (3, 8) and torch.isfinite(e_vn).all()
    e_vn.square().sum().backward()
    assert patches.grad.abs().sum() > 0 and virtual.grad.abs().sum() > 0
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
