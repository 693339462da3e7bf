"""Stability demo for mHC (MATH.md section 4): one small character-level language model trained
three times, same seed, data and budget, with (1) plain residuals, (2) unconstrained
hyper-connections (H_res = α·mat(x'φ_res) + b_res, identity-initialised bias, no Sinkhorn) and
(3) mHC. It prints the final losses and the Amax gain magnitude of the composite residual map
∏ H_res over all layers, and saves a plot to examples/output/mhc_stability.png.

The text is the Python standard library's own source (json, email, argparse), so it runs
offline. CPU only, a few minutes:  python examples/mhc_stability.py [--steps 400]
"""
from __future__ import annotations

import argparse
import email
import json
import math
import os
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import nn

from sinkhorn_ops.nn import ManifoldConstrainedHyperConnections, expand_streams, reduce_streams

# Plots go to examples/output, or to $SINKHORN_EXAMPLES_OUTPUT (the smoke tests' temporary folder).
OUTPUT = pathlib.Path(os.environ.get("SINKHORN_EXAMPLES_OUTPUT",
                                   pathlib.Path(__file__).resolve().parent / "output"))


def load_text() -> str:
    """The .py sources of three standard-library packages, in a fixed order."""
    parts = []
    for module in (json, email, argparse):
        path = pathlib.Path(module.__file__)
        files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
        parts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return "\n".join(parts)


class UnconstrainedHyperConnections(ManifoldConstrainedHyperConnections):
    """The ablation: the same parametrisation and the same H_pre, H_post, but H_res is the raw
    matrix α_res·mat(x'φ_res) + b_res with b_res initialised to the identity (no Sinkhorn)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.b_res.copy_(torch.eye(self.num_streams))

    def residual_matrix(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm, self.heads = nn.LayerNorm(dim), heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, h):
        b, t, c = h.shape
        q, k, v = self.qkv(self.norm(h)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, t, c))


def mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                         nn.Linear(4 * dim, dim))


class CharLM(nn.Module):
    """Pre-norm transformer; each sub-layer (attention, MLP) sits in one residual connection of
    the chosen kind: "residual" (x + F(x)), "hc" or "mhc" (n streams)."""

    def __init__(self, vocab, kind, *, dim=64, layers=4, heads=4, context=64, streams=4):
        super().__init__()
        self.kind, self.streams = kind, streams
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        branches = [m for _ in range(layers) for m in (CausalSelfAttention(dim, heads), mlp(dim))]
        if kind == "residual":
            self.blocks = nn.ModuleList(branches)
        else:
            cls = ManifoldConstrainedHyperConnections if kind == "mhc" else \
                UnconstrainedHyperConnections
            self.blocks = nn.ModuleList(cls(streams, dim, branch=b) for b in branches)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens, collect_h_res=None):
        h = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        if self.kind == "residual":
            for block in self.blocks:
                h = h + block(h)
        else:
            x = expand_streams(h, self.streams)
            for block in self.blocks:
                branch_input, maps = block.width_connection(x)
                if collect_h_res is not None:
                    collect_h_res.append(maps.res.detach())
                x = block.depth_connection(x, block.branch(branch_input), maps)
            h = reduce_streams(x)
        return self.head(self.norm(h))


def amax_gain(h_res_per_layer) -> tuple[float, float]:
    """Amax gain magnitude of the composite map A = H_L ⋯ H_1 (x_L = A x_0) per token: the larger
    of max_i Σ_j |A_ij| and max_j Σ_i |A_ij|. Returns (mean over tokens, max over tokens)."""
    composite = None
    for h in h_res_per_layer:
        h = h.double()
        composite = h if composite is None else h @ composite
    a = composite.abs()
    gain = torch.maximum(a.sum(-1).amax(-1), a.sum(-2).amax(-1))
    return gain.mean().item(), gain.max().item()


def train(kind, data, vocab, args, eval_batch):
    torch.manual_seed(args.seed)
    model = CharLM(vocab, kind, context=args.context)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    history = {"step": [], "loss": [], "val": [], "gain_mean": [], "gain_max": []}
    start, loss_ema = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 20)  # short warmup, then constant
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=gen)
        x = torch.stack([data[i:i + args.context] for i in idx])
        y = torch.stack([data[i + 1:i + args.context + 1] for i in idx])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                h_res = []
                ex, ey = eval_batch
                val = F.cross_entropy(model(ex, h_res).flatten(0, 1), ey.flatten()).item()
            gain = amax_gain(h_res) if h_res else (1.0, 1.0)
            for key, value in zip(history, (step, loss_ema, val, *gain)):
                history[key].append(value)
            print(f"  [{kind:8s}] step {step:4d}  train {loss_ema:.3f}  val {val:.3f}  "
                  f"Amax gain mean {gain[0]:.3g} max {gain[1]:.3g}", flush=True)
    history["seconds"] = time.perf_counter() - start
    history["params"] = sum(p.numel() for p in model.parameters())
    return history


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (kind, h) in enumerate(results.items()):
        color = f"C{i}"
        ax1.plot(h["step"], h["loss"], color=color, label=f"{kind} (train, EMA)")
        ax1.plot(h["step"], h["val"], "--", color=color, label=f"{kind} (val)")
        ax2.plot(h["step"], h["gain_max"], color=color, label=f"{kind} (max over tokens)")
        ax2.plot(h["step"], h["gain_mean"], ":", color=color, label=f"{kind} (mean)")
    ax1.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="Loss")
    ax2.set(xlabel="step", ylabel="Amax gain of ∏ H_res", yscale="log",
            title="Composite residual map gain")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared machine, intra-op threads that wait for busy cores made a training
    # step 5 to 20 times slower than a single thread.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    text = load_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    gen = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, len(val_data) - args.context - 1, (32,), generator=gen)
    eval_batch = (torch.stack([val_data[i:i + args.context] for i in idx]),
                  torch.stack([val_data[i + 1:i + args.context + 1] for i in idx]))
    print(f"data: {len(text)} characters of json/email/argparse sources, vocabulary {len(chars)}; "
          f"torch threads {torch.get_num_threads()}")

    results = {}
    for kind in ("residual", "hc", "mhc"):
        results[kind] = train(kind, train_data, len(chars), args, eval_batch)
    path = OUTPUT / "mhc_stability.png"
    plot(results, path)

    print("\n==================== mHC stability demo: summary ====================")
    print(f"model: 4 blocks x (attention, MLP) = 8 residual connections, width 64, context "
          f"{args.context}, n = 4 streams; {args.steps} steps of batch {args.batch}, AdamW lr "
          f"{args.lr}, seed {args.seed}, CPU")
    print("Amax gain: composite ∏ H_res over the 8 connections, per token, max(largest |row| "
          "sum, largest |column| sum); mean and max over the 2048 tokens of a fixed val batch")
    print(f"{'variant':10s} {'params':>8s} {'train loss':>11s} {'val loss':>9s} "
          f"{'gain mean':>10s} {'gain max':>10s} {'time s':>7s}")
    for kind, h in results.items():
        print(f"{kind:10s} {h['params']:8d} {h['loss'][-1]:11.4f} {h['val'][-1]:9.4f} "
              f"{h['gain_mean'][-1]:10.4g} {h['gain_max'][-1]:10.4g} {h['seconds']:7.1f}")
    print(f"(train loss: EMA(0.9) of the batch losses; ln(vocab) = {math.log(len(chars)):.3f})")
    print(f"plot: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
