"""DistributedDataParallel over the layers (Sinkformer attention and mHC), on two gloo processes:
each rank's gradients, all-reduced through the operators' autograd nodes, equal the
single-process gradients of the whole batch; the same with torch.compile."""

import os

import pytest
import torch

from conftest import gloo_group, run_on_gloo
from sinkhorn_ops import nn as snn

F64 = torch.float64
WORLD, BATCH, TOKENS, DIM, STREAMS = 2, 4, 5, 8, 4


class _Model(torch.nn.Module):
    """expand -> mHC(attention) -> mHC(MLP) -> reduce, in float64."""

    def __init__(self):
        super().__init__()
        attn = snn.SinkhornMultiheadAttention(DIM, 2, batch_first=True, dtype=F64, steps=3)
        self.attn = snn.ManifoldConstrainedHyperConnections(
            STREAMS, DIM, _SelfAttention(attn), alpha_init=0.3, dtype=F64)
        mlp = torch.nn.Sequential(torch.nn.Linear(DIM, 2 * DIM, dtype=F64), torch.nn.GELU(),
                                  torch.nn.Linear(2 * DIM, DIM, dtype=F64))
        self.mlp = snn.ManifoldConstrainedHyperConnections(STREAMS, DIM, mlp, variant="v4",
                                                           alpha_init=0.3, dtype=F64)

    def forward(self, x):
        h = snn.expand_streams(x, STREAMS)
        return snn.reduce_streams(self.mlp(self.attn(h)))


class _SelfAttention(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.inner = attn

    def forward(self, x):
        return self.inner(x, x, x, need_weights=False)[0]


def _data():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(BATCH, TOKENS, DIM, dtype=F64, generator=g),
            torch.randn(BATCH, TOKENS, DIM, dtype=F64, generator=g))


def _model():
    torch.manual_seed(8)
    return _Model()


def _loss(model, x, y):
    return (model(x) - y).square().mean()


def _worker(rank, port, path, compiled):
    from torch.nn.parallel import DistributedDataParallel as DDP

    with gloo_group(rank, WORLD, port):
        model = DDP(_model())
        step = torch.compile(model) if compiled else model
        x, y = _data()
        _loss(step, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]).backward()
        torch.save({k: p.grad for k, p in model.module.named_parameters()},
                   os.path.join(path, f"{rank}.pt"))


@pytest.mark.parametrize("compiled", [False, True])
def test_ddp_gradients_equal_the_whole_batch(compiled):
    ranks = run_on_gloo(_worker, WORLD, compiled)
    model = _model()
    _loss(model, *_data()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        for grads in ranks:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
