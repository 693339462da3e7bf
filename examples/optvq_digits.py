"""Nearest-neighbour VQ against OptVQ's Sinkhorn quantiser in a small VQ autoencoder on
scikit-learn's bundled digits (no download). Both runs share the seed, the initial weights and the
training budget; only the code assignment differs. Prints codebook utilisation, perplexity and
reconstruction error, and writes examples/output/optvq_digits.png.

    python examples/optvq_digits.py [--steps 1500] [--codes 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import os
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from sinkhorn_ops.nn import SinkhornVectorQuantizer, codebook_stats

# Plots go to examples/output, or to $SINKHORN_EXAMPLES_OUTPUT (the smoke tests' temporary folder).
OUTPUT = pathlib.Path(os.environ.get("SINKHORN_EXAMPLES_OUTPUT",
                                   pathlib.Path(__file__).resolve().parent / "output"))
TOKENS, CODE_DIM = 4, 8  # each image becomes 4 latent vectors of 8 channels


def load_data(seed: int) -> tuple[Tensor, Tensor]:
    """Digits as (N, 64) pixels in [0, 1]; a fixed 80/20 split."""
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    return x[perm[n_test:]], x[perm[:n_test]]


class VQAutoencoder(nn.Module):
    """MLP encoder to (TOKENS, CODE_DIM) latents, a quantiser, MLP decoder."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, TOKENS * CODE_DIM))
        self.quantizer = quantizer
        self.decoder = nn.Sequential(nn.Linear(TOKENS * CODE_DIM, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = self.encoder(x).view(-1, TOKENS, CODE_DIM)
        z_q, vq_loss, idx = self.quantizer(z)
        return self.decoder(z_q.reshape(len(x), -1)), vq_loss, idx


def train(model: VQAutoencoder, train_x: Tensor, test_x: Tensor, steps: int, seed: int) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    curve = {"step": [], "recon": [], "perplexity": [], "utilization": []}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = train_x[torch.randint(0, len(train_x), (256,), generator=gen)]
        recon, vq_loss, _ = model(batch)
        rec = (recon - batch).pow(2).mean()
        opt.zero_grad()
        (rec + vq_loss).backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            stats = model.quantizer.last_stats
            curve["step"].append(step)
            curve["recon"].append(rec.item())
            curve["perplexity"].append(stats["perplexity"].item())
            curve["utilization"].append(stats["utilization"].item())
    model.eval()
    with torch.no_grad():
        recon, _, idx = model(test_x)
    stats = codebook_stats(idx, model.quantizer.n_e)
    return {"curve": curve, "seconds": time.perf_counter() - t0,
            "test_recon": (recon - test_x).pow(2).mean().item(),
            "test_utilization": stats["utilization"].item(),
            "test_perplexity": stats["perplexity"].item(), "counts": stats["counts"],
            "recon_images": recon[:8]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; 1 avoids OpenMP contention on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, test_x = load_data(args.seed)
    # Nearest neighbour is the same module with no Sinkhorn iteration, no normalisation and
    # epsilon = 1: argmax_k(-A_ik) = argmin_k A_ik exactly.
    nearest = VQAutoencoder(SinkhornVectorQuantizer(args.codes, CODE_DIM, n_iters=0,
                                                    normalize_mode=None, epsilon=1.0))
    sinkhorn = copy.deepcopy(nearest)
    sinkhorn.quantizer = SinkhornVectorQuantizer(args.codes, CODE_DIM)  # OptVQ: eps 10, 5 iters
    sinkhorn.quantizer.load_state_dict(nearest.quantizer.state_dict())
    runs = {}
    for name, model in (("nearest-neighbour VQ", nearest), ("Sinkhorn VQ (OptVQ)", sinkhorn)):
        torch.manual_seed(args.seed)
        runs[name] = r = train(model, train_x, test_x, args.steps, args.seed)
        last = r["curve"]
        print(f"{name:22s} train: utilisation {last['utilization'][-1]:.3f}, perplexity "
              f"{last['perplexity'][-1]:.1f}, recon MSE {last['recon'][-1]:.4f} | test: "
              f"utilisation {r['test_utilization']:.3f}, perplexity {r['test_perplexity']:.1f} "
              f"of {args.codes}, recon MSE {r['test_recon']:.4f} | {r['seconds']:.1f} s")
    plot(runs, test_x, args.codes)


def plot(runs: dict, test_x: Tensor, codes: int) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for name, r in runs.items():
        c = r["curve"]
        axes[0, 0].plot(c["step"], c["recon"], label=name)
        axes[0, 1].plot(c["step"], c["perplexity"], label=name)
        axes[0, 2].plot(torch.sort(r["counts"], descending=True).values, label=name)
    axes[0, 0].set(title="train reconstruction MSE", xlabel="step", yscale="log")
    axes[0, 1].set(title=f"train code perplexity (max {codes})", xlabel="step")
    axes[0, 2].set(title="test code usage, sorted", xlabel="code rank", ylabel="count",
                   yscale="symlog")
    for ax in axes[0]:
        ax.legend()
    rows = [test_x[:8]] + [r["recon_images"] for r in runs.values()]
    titles = ["test digits"] + [f"{name}: recon" for name in runs]
    for ax, imgs, title in zip(axes[1], rows, titles):
        grid = imgs.clamp(0, 1).view(8, 8, 8).permute(1, 0, 2).reshape(8, 64)
        ax.imshow(grid, cmap="gray_r")
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    OUTPUT.mkdir(exist_ok=True)
    fig.savefig(OUTPUT / "optvq_digits.png", dpi=110)
    print(f"wrote {OUTPUT / 'optvq_digits.png'}")


if __name__ == "__main__":
    main()
