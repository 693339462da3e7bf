"""Deployment: torch.export of a model with Sinkhorn attention, an mHC layer and the OT operator
(static and dynamic shapes, eval and train mode), and an AOTInductor package of it run back."""

import os
import tempfile

import torch

import sinkhorn_ops as so
from sinkhorn_ops import nn as snn


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = snn.SinkhornMultiheadAttention(8, 2, batch_first=True, steps=3)
        self.mhc = snn.ManifoldConstrainedHyperConnections(4, 8, torch.nn.Linear(8, 8),
                                                           alpha_init=0.3)

    def forward(self, x):
        y = self.attn(x, x, x, need_weights=False)[0]
        y = snn.reduce_streams(self.mhc(snn.expand_streams(y, 4)))
        return y + so.sinkhorn(x @ x.mT, steps=5, tol=1e-4).sum(-1, keepdim=True)


def test_export_static_and_dynamic_shapes():
    model = _Model().eval()
    x = torch.randn(2, 5, 8)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")},)
    ep = torch.export.export(model, (x,), dynamic_shapes=dims)
    other = torch.randn(3, 7, 8)
    torch.testing.assert_close(ep.module()(other), model(other), rtol=0, atol=0)
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"sinkhorn_ops.sinkhorn.default", "sinkhorn_ops.mhc_coefficients.default"} <= names
    # Train mode exports too (the modules take their training paths).
    torch.export.export(_Model().train(), (x,))


def test_aot_inductor_package_runs_back():
    model = _Model().eval()
    x = torch.randn(2, 5, 8)
    ep = torch.export.export(model, (x,))
    with tempfile.TemporaryDirectory() as path:
        package = torch._inductor.aoti_compile_and_package(
            ep, package_path=os.path.join(path, "model.pt2"))
        loaded = torch._inductor.aoti_load_package(package)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
