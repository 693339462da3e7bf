"""OptVQ's vector quantiser (Zhang et al. 2024, Neur-IO/OptVQ; MATH.md section 5): codes assigned
by the streaming Sinkhorn of sinkhorn_ops.sinkhorn_assign, straight-through output."""
from __future__ import annotations

import operator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..optvq import sinkhorn_assign

__all__ = ["SinkhornVectorQuantizer", "codebook_stats"]

_LOSSES = ("l2", "l1", "ce")


@torch.no_grad()
def codebook_stats(indices: Tensor, num_codes: int, distributed: bool | None = None) -> dict:
    """Code usage of a batch: counts (K,), utilisation (fraction of codes used at least once) and
    perplexity exp(-sum p log p) of the usage histogram (K when usage is uniform). Counts are summed
    over ranks under an initialised torch.distributed. No host synchronisation."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).to(torch.float64)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum()  # 0 log 0 = 0
    return {"counts": counts, "utilization": (counts > 0).double().mean(),
            "perplexity": entropy.exp()}


class SinkhornVectorQuantizer(nn.Module):
    """OptVQ's ``VectorQuantizerSinkhorn`` with the Sinkhorn assignment streamed.

    The input (B, C, H, W) or (B, T, C) is split into ``num_head`` heads of C / num_head channels
    that share one codebook; all B * T * heads vectors form one transport problem. The assignment is
    ``sinkhorn_assign`` (L2 distances, not squared; normalisation "all", "dim" or None; S = -eps A;
    ``n_iters`` iterations starting with the codes; argmax of the plan, or a draw with
    ``sample=True``), computed without gradient. Output x + (x_q - x).detach() (straight-through),
    losses as the reference: "l2": mean((x - sg(x_q))^2) + beta mean((x_q - sg(x))^2), "l1" the
    same with absolute values, "ce": cross_entropy(-A, indices) (which forms the N x K distances).

    Defaults follow the issue (argmax, "l2", beta = 0.25, no projection) and MATH.md section 1
    (exact log-domain Sinkhorn); the reference's own defaults are ``sample=True`` (its use_prob),
    loss "ce", beta = 1 and ``use_proj=True``, and its loop adds 1e-8 to every sum it divides by:
    ``guard=1e-8`` reproduces that (see :func:`sinkhorn_ops.sinkhorn_assign`).
    ``nearest_at_eval`` assigns by nearest neighbour in eval mode. Under an initialised
    torch.distributed the column reductions and the "all" statistics are global (the reference
    normalises with per-rank statistics), so every rank must call forward.

    forward returns (x_q, loss, indices) like the reference, with indices (B, heads, H, W) or
    (B, T, heads); ``return_stats=True`` appends :func:`codebook_stats`, which is also kept, after
    every call, in ``last_stats``.
    """

    def __init__(self, n_e: int = 1024, e_dim: int = 128, *, num_head: int = 1,
                 beta: float = 0.25, loss_q_type: str = "l2", epsilon: float = 10.0,
                 n_iters: int = 5, normalize_mode: str | None = "all", sample: bool = False,
                 nearest_at_eval: bool = False, use_proj: bool = False, fix_codes: bool = False,
                 chunk_size: int | None = None, guard: float = 0.0) -> None:
        super().__init__()
        for name, value in (("n_e", n_e), ("e_dim", e_dim), ("num_head", num_head)):
            try:  # Python and NumPy integers
                ok = not isinstance(value, bool) and operator.index(value) >= 1
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"SinkhornVectorQuantizer: expected {name} to be an int >= 1, "
                                 f"got {value!r}")
        n_e, e_dim, num_head = int(n_e), int(e_dim), int(num_head)
        if e_dim % num_head != 0:
            raise ValueError(f"SinkhornVectorQuantizer: expected e_dim divisible by num_head, got "
                             f"{e_dim} and {num_head}")
        if loss_q_type not in _LOSSES:
            raise ValueError(f"SinkhornVectorQuantizer: expected loss_q_type in {_LOSSES}, got "
                             f"{loss_q_type!r}")
        if normalize_mode == "null":  # the reference's spelling of None
            normalize_mode = None
        if normalize_mode not in ("all", "dim", None):
            raise ValueError("SinkhornVectorQuantizer: expected normalize_mode 'all', 'dim' or "
                             f"None, got {normalize_mode!r}")
        self.n_e, self.e_dim, self.num_head = n_e, e_dim, num_head
        self.code_dim = e_dim // num_head
        self.beta, self.loss_q_type = beta, loss_q_type
        self.epsilon, self.n_iters, self.normalize_mode = epsilon, n_iters, normalize_mode
        self.sample, self.nearest_at_eval, self.chunk_size = sample, nearest_at_eval, chunk_size
        self.guard = guard
        self.embedding = nn.Embedding(n_e, self.code_dim)
        self.proj = None
        if use_proj:  # the reference's learnt projection of the codes, same initialisation
            self.proj = nn.Linear(self.code_dim, self.code_dim)
            nn.init.normal_(self.proj.weight, std=self.code_dim ** -0.5)
        if fix_codes:
            self.embedding.weight.requires_grad_(False)
        self.last_stats: dict = {}

    def get_codebook(self) -> Tensor:
        """The (K, code_dim) codes the inputs are matched to (after the projection, if any)."""
        w = self.embedding.weight
        return self.proj(w) if self.proj is not None else w

    def assign(self, x: Tensor, embed: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Indices (N,) of the codes of the (N, code_dim) vectors x."""
        if self.nearest_at_eval and not self.training:  # argmax(-A) = argmin A exactly
            return sinkhorn_assign(x.detach(), embed.detach(), epsilon=1.0, iters=0,
                                   normalize=None, chunk_size=self.chunk_size)
        return sinkhorn_assign(x.detach(), embed.detach(), epsilon=self.epsilon,
                               iters=self.n_iters, normalize=self.normalize_mode,
                               chunk_size=self.chunk_size, sample=self.sample, generator=generator,
                               guard=self.guard)

    def forward(self, x: Tensor, *, return_stats: bool = False,
                generator: torch.Generator | None = None):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x, return_stats, generator)

    def _forward(self, x: Tensor, return_stats: bool, generator):
        # float32, or float64 when the input or the codebook is float64 (as sinkhorn_assign
        # computes); both sides in that dtype (cdist, the "ce" loss, takes one).
        embed = self.get_codebook()
        dtype = torch.float64 if torch.float64 in (x.dtype, embed.dtype) else torch.float32
        x, embed = x.to(dtype), embed.to(dtype)
        image = None
        if x.dim() == 4:  # (B, C, H, W) -> (B, H W, C), as the reference
            b, c, h, w = x.shape
            image = (h, w)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        elif x.dim() != 3:
            raise ValueError("SinkhornVectorQuantizer: expected input (B, C, H, W) or (B, T, C), "
                             f"got {tuple(x.shape)}")
        b, t, c = x.shape
        if c != self.e_dim:
            raise ValueError(f"SinkhornVectorQuantizer: expected {self.e_dim} channels, got {c}")
        flat = x.reshape(-1, self.code_dim)  # heads split the channels and share the codebook
        indices = self.assign(flat, embed, generator)
        x_q = embed[indices]
        loss = self._loss(flat, x_q, embed, indices)
        self.last_stats = codebook_stats(indices, self.n_e)
        out = (flat + (x_q - flat).detach()).view(b, t, c)  # straight-through estimator
        indices = indices.view(b, t, self.num_head)
        if image is not None:
            h, w = image
            out = out.view(b, h, w, c).permute(0, 3, 1, 2)
            indices = indices.view(b, h, w, self.num_head).permute(0, 3, 1, 2)
        result = (out, loss, indices)
        return (*result, self.last_stats) if return_stats else result

    def _loss(self, x: Tensor, x_q: Tensor, embed: Tensor, indices: Tensor) -> Tensor:
        if self.loss_q_type == "l2":
            return (torch.mean((x - x_q.detach()).pow(2))
                    + self.beta * torch.mean((x_q - x.detach()).pow(2)))
        if self.loss_q_type == "l1":
            return (torch.mean((x - x_q.detach()).abs())
                    + self.beta * torch.mean((x_q - x.detach()).abs()))
        return F.cross_entropy(-torch.cdist(x, embed, p=2.0), indices)

    def extra_repr(self) -> str:
        return (f"n_e={self.n_e}, e_dim={self.e_dim}, num_head={self.num_head}, "
                f"epsilon={self.epsilon}, n_iters={self.n_iters}, "
                f"normalize_mode={self.normalize_mode!r}, loss_q_type={self.loss_q_type!r}, "
                f"beta={self.beta}, sample={self.sample}, nearest_at_eval={self.nearest_at_eval}")
