"""Streaming Sinkhorn assignment (MATH.md sections 1 and 5): OptVQ's code assignment and SwAV's
balanced self-labelling, with the N x K score matrix rebuilt chunk by chunk and never held whole."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SinkhornAssignment",
    "balanced_assignment",
    "optvq_normalize_reference",
    "optvq_sinkhorn_reference",
    "sinkhorn_assign",
    "swav_sinkhorn_reference",
]

# Default chunk, in score entries: on GPUs 2^24 (64 MiB in fp32; 1024 rows of a 16384-code book),
# a GEMM large enough to run at full speed; on CPUs 2^21 (8 MiB), so the chunk's ~10 elementwise
# passes run from cache (measured 2x faster than 2^24 at N = K = 4096).
_CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 21}
# The row log-sum-exp needs the chunk intact afterwards (the column step reuses it), so it works on
# row slices of 1/_ROW_SPLIT of the chunk: its scratch stays an eighth of the chunk buffer.
_ROW_SPLIT = 8
_NORMALIZE_MODES = ("all", "dim", None)


class SinkhornAssignment(NamedTuple):
    """Result of ``sinkhorn_assign(..., return_potentials=True)``."""

    indices: Tensor  # (N,) int64: the code of every vector
    g: Tensor  # (K,) accumulation dtype: column potential after the last column step


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_distributed(distributed: bool | None) -> bool:
    if distributed is None:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sinkhorn_assign: distributed=True needs an initialised torch.distributed")
    return bool(distributed)


def _chunk_rows(n: int, k: int, chunk_size: int | None, op: str, device: torch.device) -> int:
    if chunk_size is None:
        elements = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"])
        return max(1, min(max(n, 1), elements // max(k, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: expected chunk_size a positive int or None, got {chunk_size!r}")
    return min(chunk_size, max(n, 1))


def _row_lse(s: Tensor, g: Tensor) -> Tensor:
    """LSE_k (s_ik + g_k) for every row of s, leaving s intact; scratch of s.shape[0]/8 rows."""
    out = s.new_empty(s.shape[0])
    step = max(1, -(-s.shape[0] // _ROW_SPLIT))
    for lo in range(0, s.shape[0], step):
        t = s[lo:lo + step] + g
        mx = t.amax(1, keepdim=True)
        out[lo:lo + step] = mx.squeeze(1) + t.sub_(mx).exp_().sum(1).log_()
    return out


class _ColumnLSE:
    """Running LSE_i over row chunks of every column: a running max and a sum rescaled to it."""

    def __init__(self, k: int, like: Tensor) -> None:
        self.max = like.new_full((k,), -math.inf)
        self.sum = like.new_zeros(k)

    def add(self, v: Tensor) -> None:
        """Folds in the chunk v (rows x K), which it overwrites."""
        cmax = v.amax(0)
        csum = v.sub_(cmax).exp_().sum(0)
        new = torch.maximum(self.max, cmax)
        self.sum = self.sum * _rescale(self.max, new) + csum * _rescale(cmax, new)
        self.max = new

    def result(self, distributed: bool) -> Tensor:
        if distributed:  # MAX of the running maxima, then SUM of the sums rescaled to it
            new = self.max.clone()
            dist.all_reduce(new, op=dist.ReduceOp.MAX)
            self.sum = self.sum * _rescale(self.max, new)
            dist.all_reduce(self.sum, op=dist.ReduceOp.SUM)
            self.max = new
        return self.max + self.sum.log()


def _rescale(old: Tensor, new: Tensor) -> Tensor:
    # exp(old - new); 0 where old is -inf (nothing seen), including -inf - -inf on an empty rank.
    return torch.where(torch.isneginf(old), 0.0, (old - new).exp())


def _global_count(n: int, device: torch.device, distributed: bool) -> float:
    if not distributed:
        return float(n)
    t = torch.tensor([float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def _streaming_sinkhorn(fill: Callable[[Tensor, int, int], Tensor], n: int, k: int, *,
                        iters: int, chunk: int, dtype: torch.dtype, device: torch.device,
                        distributed: bool, guard: float = 0.0) -> Tensor:
    """g after `iters` column steps (starting with columns, a = 1, b = N/K; MATH.md section 1).

    fill(buf, lo, hi) writes the scores of rows lo..hi-1 into buf[: hi - lo] and returns that view.
    Each step is one pass over the chunks: the row step of the chunk (with the previous g) is local,
    then the chunk's contribution to the column LSE, summed over chunks and ranks.

    guard > 0 replays the published kernel-domain loop with its guards in the log domain: the
    reference keeps Q = exp(S + f + g) scaled to total mass 1, and divides by (sum + guard), so
    g_k -= log(exp(g_k + LSE_i(S_ik + f_i)) + guard) + log K, the same for f with N, after
    f = -log(sum(exp S) + guard). With guard = 0 this is section 1 with f shifted by -log N.
    """
    g = torch.zeros(k, dtype=dtype, device=device)
    if iters == 0:
        return g
    n_all = _global_count(n, device, distributed)
    log_b, log_n, log_k = math.log(n_all / k), math.log(n_all), math.log(k)
    log_guard = math.log(guard) if guard > 0 else None
    buf = torch.empty((chunk, k), dtype=dtype, device=device)
    f = torch.zeros(n, dtype=dtype, device=device)
    for step in range(iters):
        col = _ColumnLSE(k, g)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            s = fill(buf, lo, hi)
            if step > 0:  # row step f_i = log 1 - LSE_k (S_ik + g_k)
                r = _row_lse(s, g)
                f[lo:hi] = -r if log_guard is None else (
                    f[lo:hi] - torch.logaddexp(f[lo:hi] + r, _full(r, log_guard)) - log_n)
            col.add(s.add_(f[lo:hi, None]))
        lse = col.result(distributed)
        if log_guard is None:
            g = log_b - lse
            continue
        if step == 0:  # the published loop first scales Q to total mass 1 (guarded)
            c = torch.logaddexp(torch.logsumexp(lse, 0), _full(lse[0], log_guard))
            lse = lse - c
            f.fill_(-c)
        g = g - torch.logaddexp(g + lse, _full(lse, log_guard)) - log_k
    return g


def _full(like: Tensor, value: float) -> Tensor:
    return torch.full_like(like, value)


def _assign_pass(fill, n: int, k: int, g: Tensor, *, chunk: int, sample: bool,
                 generator: torch.Generator | None) -> Tensor:
    """index_i = argmax_k (S_ik + g_k) (MATH.md section 5), or a draw from the plan's row i."""
    idx = torch.empty(n, dtype=torch.int64, device=g.device)
    buf = torch.empty((min(chunk, max(n, 1)), k), dtype=g.dtype, device=g.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        s = fill(buf, lo, hi).add_(g)
        if sample:  # the plan's row i is softmax_k(S_ik + g_k); multinomial takes it unnormalised
            s.sub_(s.amax(1, keepdim=True)).exp_()
            idx[lo:hi] = torch.multinomial(s, 1, generator=generator).squeeze(1)
        else:
            idx[lo:hi] = s.argmax(1)
    return idx


class _Distances:
    """Fills chunks of S = -epsilon * normalise(A), A_ik = ||x_i - e_k||_2 from the GEMM form."""

    def __init__(self, x: Tensor, codebook: Tensor, epsilon: float, normalize: str | None,
                 dtype: torch.dtype) -> None:
        self.x = x
        self.e = codebook.to(dtype)
        self.ee = (self.e * self.e).sum(1)
        self.dtype = dtype
        self.epsilon = epsilon
        self.normalize = normalize
        self.affine = None  # S = scale * A + shift for "all" (0-d float64 tensors)

    def distances(self, buf: Tensor, lo: int, hi: int) -> Tensor:
        xc = self.x[lo:hi].to(self.dtype)
        a = torch.addmm(self.ee[None, :], xc, self.e.t(), beta=1.0, alpha=-2.0, out=buf[:hi - lo])
        # Rounding can make ||x||^2 + ||e||^2 - 2 x.e slightly negative for x = e: clamp before sqrt.
        return a.add_((xc * xc).sum(1, keepdim=True)).clamp_(min=0.0).sqrt_()

    def fit(self, n: int, chunk: int, distributed: bool) -> None:
        """Mean, unbiased std and min of A in one streaming pass (Chan et al.'s pairwise update of
        per-chunk Welford statistics, in float64), reduced over ranks when distributed."""
        if self.normalize != "all":
            return
        dev = self.e.device
        count, mean = 0, torch.zeros((), dtype=torch.float64, device=dev)
        m2 = torch.zeros((), dtype=torch.float64, device=dev)
        amin = torch.full((), math.inf, dtype=self.dtype, device=dev)
        buf = torch.empty((chunk, self.e.shape[0]), dtype=self.dtype, device=dev)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            a = self.distances(buf, lo, hi)
            var_c, mean_c = torch.var_mean(a, correction=0)
            n_c = a.numel()
            delta = mean_c.double() - mean
            total = count + n_c
            mean = mean + delta * (n_c / total)
            m2 = m2 + var_c.double() * n_c + delta * delta * (count * n_c / total)
            count = total
            amin = torch.minimum(amin, a.min())
        if distributed:
            sums = torch.stack([torch.tensor(float(count), dtype=torch.float64, device=dev),
                                mean * count])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            g_mean = sums[1] / sums[0]
            m2 = m2 + count * (mean - g_mean) ** 2
            dist.all_reduce(m2, op=dist.ReduceOp.SUM)
            dist.all_reduce(amin, op=dist.ReduceOp.MIN)
            count, mean = sums[0], g_mean
        # torch.std is unbiased (N K - 1); the reference normalises with it.
        std = (m2 / max(float(count) - 1.0, 1.0)).sqrt()
        # The normalised matrix's min is the normalised min ((a - mean) / den is monotone), and
        # S = -eps ((A - mean) / den - min) = scale A + shift folds into two passes over a chunk.
        den = std + 1e-6
        self.affine = (-self.epsilon / den, self.epsilon * (mean / den + (amin.double() - mean) / den))

    def scores(self, buf: Tensor, lo: int, hi: int) -> Tensor:
        a = self.distances(buf, lo, hi)
        if self.normalize == "all":
            scale, shift = self.affine
            return a.mul_(scale.to(a.dtype)).add_(shift.to(a.dtype))
        if self.normalize == "dim":
            return a.mul_(-self.epsilon / math.sqrt(self.e.shape[1]))
        return a.mul_(-self.epsilon)


def _check_iter_args(op: str, iters, epsilon) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{op}: expected iters a non-negative int, got {iters!r}")
    if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"{op}: expected epsilon a positive finite number, got {epsilon!r}")


@torch.no_grad()
def sinkhorn_assign(
    x: Tensor,
    codebook: Tensor,
    *,
    epsilon: float = 10.0,
    iters: int = 5,
    normalize: str | None = "all",
    chunk_size: int | None = None,
    sample: bool = False,
    generator: torch.Generator | None = None,
    return_potentials: bool = False,
    distributed: bool | None = None,
    guard: float = 0.0,
):
    """OptVQ's Sinkhorn code assignment (MATH.md section 5), streamed over row chunks.

    A_ik = ||x_i - e_k||_2 (not squared) is rebuilt per chunk from one GEMM; it is normalised
    ("all": (A - mean) / (std + 1e-6) then minus its min; "dim": A / sqrt(d); None: as is); then
    ``iters`` Sinkhorn iterations, column step first, on S = -epsilon * A with a = 1 and b = N/K in
    the log domain (section 1: the same as ``sinkhorn(S, 1, N/K, steps=2 * iters, start="col")``),
    and index_i = argmax_k (S_ik + g_k), which needs only g, never the plan. ``iters=0`` with
    ``normalize=None`` is the nearest-neighbour assignment.

    Memory: one chunk_size x K buffer in the accumulation dtype, plus a chunk_size/8 x K scratch
    for the row log-sum-exp and O((N + K) d) for the inputs; never the N x K matrix. Time: one
    GEMM pass for the "all" statistics, one per iteration and one for the assignment.

    Args:
        x: (N, d) vectors, floating point; computed in float32 (float64 for float64).
        codebook: (K, d) codes on x's device.
        epsilon: inverse temperature (OptVQ's 10), S = -epsilon * A.
        iters: Sinkhorn iterations (each a column then a row normalisation; the row step of the
            last one is implied by the argmax).
        normalize: "all", "dim" or None, as in the reference.
        chunk_size: rows per chunk; default 2^21 / K on CPU, 2^24 / K on GPU.
        sample: draw index_i from the plan's row i (the reference's ``use_prob``) instead of argmax.
        generator: random generator for ``sample``.
        return_potentials: return ``SinkhornAssignment(indices, g)``.
        distributed: sum the column (per-code) reductions and the "all" statistics over the ranks
            of torch.distributed, N being the global count; row steps stay local. Default: when
            torch.distributed is initialised with more than one rank. Every rank must call it.
        guard: 0 (default) runs MATH.md section 1 exactly. The published loop adds 1e-8 to every
            sum it divides by; ``guard=1e-8`` replays that in the log domain (without its
            underflow). The guard matters for codes or vectors whose kernel mass falls near 1e-8
            (far from all data under epsilon = 10): it leaves them nearly unnormalised, where
            exact Sinkhorn forces mass b = N/K onto them, and it can change assignments.

    Returns:
        (N,) int64 indices, or ``SinkhornAssignment(indices, g)`` (with guard > 0, g is in the
        published loop's gauge, Q = N exp(S + f + g)).
    """
    op = "sinkhorn_assign"
    if not isinstance(x, Tensor) or not isinstance(codebook, Tensor):
        raise TypeError(f"{op}: expected x and codebook to be tensors, got "
                        f"{type(x).__name__} and {type(codebook).__name__}")
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"{op}: expected x of shape (N, d) and codebook of shape (K, d), got "
                         f"{tuple(x.shape)} and {tuple(codebook.shape)}")
    if not x.is_floating_point() or not codebook.is_floating_point():
        raise TypeError(f"{op}: expected floating-point x and codebook, got {x.dtype} and "
                        f"{codebook.dtype}")
    if x.device != codebook.device:
        raise ValueError(f"{op}: expected codebook on x's device {x.device}, got {codebook.device}")
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: expected a codebook with at least one code, got K = 0")
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"{op}: expected normalize 'all', 'dim' or None, got {normalize!r}")
    _check_iter_args(op, iters, epsilon)
    if not isinstance(guard, (int, float)) or not guard >= 0 or not math.isfinite(guard):
        raise ValueError(f"{op}: expected guard a finite number >= 0, got {guard!r}")
    n, k = x.shape[0], codebook.shape[0]
    distributed = _use_distributed(distributed) and iters > 0
    if n == 0 and not distributed:
        idx = torch.empty(0, dtype=torch.int64, device=x.device)
        g = torch.zeros(k, dtype=_accumulation_dtype(x.dtype), device=x.device)
        return SinkhornAssignment(idx, g) if return_potentials else idx
    chunk = _chunk_rows(n, k, chunk_size, op, x.device)
    dtype = _accumulation_dtype(torch.promote_types(x.dtype, codebook.dtype))
    src = _Distances(x, codebook, float(epsilon), normalize, dtype)
    src.fit(n, chunk, distributed)
    g = _streaming_sinkhorn(src.scores, n, k, iters=iters, chunk=chunk, dtype=dtype,
                            device=x.device, distributed=distributed, guard=float(guard))
    idx = _assign_pass(src.scores, n, k, g, chunk=chunk, sample=sample, generator=generator)
    return SinkhornAssignment(idx, g) if return_potentials else idx


@torch.no_grad()
def balanced_assignment(
    scores: Tensor,
    *,
    iters: int = 3,
    epsilon: float = 0.05,
    chunk_size: int | None = None,
    distributed: bool | None = None,
) -> Tensor:
    """SwAV / SeLa balanced soft assignment (MATH.md section 1, table row OptVQ / SwAV).

    Q = exp(scores / epsilon), ``iters`` times normalise every prototype (column) to 1/K then every
    sample (row) to 1/N, rows finally times N: in the log domain, S = scores / epsilon, a = 1,
    b = N/K, 2 * iters steps starting with the columns. Runs on the same streaming machinery as
    :func:`sinkhorn_assign` (one chunk buffer besides the output), with the column reductions
    summed over ranks under torch.distributed.

    Args:
        scores: (N, K) sample-prototype similarities (SwAV: normalised features times prototypes).
        iters: Sinkhorn iterations (SwAV: 3).
        epsilon: temperature (SwAV: 0.05).
        chunk_size: rows per chunk; default 2^21 / K on CPU, 2^24 / K on GPU.
        distributed: as in :func:`sinkhorn_assign`.

    Returns:
        Q of shape (N, K), float32 (float64 for float64 scores), every row summing to 1.
    """
    op = "balanced_assignment"
    if not isinstance(scores, Tensor):
        raise TypeError(f"{op}: expected scores to be a tensor, got {type(scores).__name__}")
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"{op}: expected scores of shape (N, K) with K >= 1, got "
                         f"{tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{op}: expected floating-point scores, got {scores.dtype}")
    _check_iter_args(op, iters, epsilon)
    n, k = scores.shape
    distributed = _use_distributed(distributed) and iters > 0
    chunk = _chunk_rows(n, k, chunk_size, op, scores.device)
    dtype = _accumulation_dtype(scores.dtype)

    def fill(buf: Tensor, lo: int, hi: int) -> Tensor:
        return buf[:hi - lo].copy_(scores[lo:hi]).div_(epsilon)

    g = _streaming_sinkhorn(fill, n, k, iters=iters, chunk=chunk, dtype=dtype,
                            device=scores.device, distributed=distributed)
    q = torch.empty((n, k), dtype=dtype, device=scores.device)
    for lo in range(0, n, chunk):  # final row step, written straight into the output
        hi = min(n, lo + chunk)
        rows = fill(q[lo:hi], lo, hi).add_(g)
        rows.sub_(rows.amax(1, keepdim=True)).exp_()
        rows.div_(rows.sum(1, keepdim=True))
    return q


def optvq_sinkhorn_reference(cost: Tensor, epsilon: float = 10.0, iters: int = 5,
                             guard: float = 1e-8) -> Tensor:
    """The published OptVQ loop, transcribed for tests and benchmarks (kernel domain; underflows
    for large epsilon * cost): Q = exp(-epsilon * cost), iters times {columns to 1/K, rows to 1/N}
    with `guard` added to every sum (1e-8 as published; 0 gives exact Sinkhorn), finally rows
    times N. Returns Q (N, K)."""
    q = torch.exp(-cost * epsilon)
    n, k = q.shape
    q = q / (q.sum() + guard)
    for _ in range(iters):
        q = q / (q.sum(0, keepdim=True) + guard) / k
        q = q / (q.sum(1, keepdim=True) + guard) / n
    return q * n


def optvq_normalize_reference(a: Tensor, mode: str | None, dim: int) -> Tensor:
    """The reference's cost normalisation: "all", "dim" or None."""
    if mode == "all":
        a = (a - a.mean()) / (a.std() + 1e-6)
        return a - a.min()
    if mode == "dim":
        return a / math.sqrt(dim)
    return a


def swav_sinkhorn_reference(scores: Tensor, epsilon: float = 0.05, iters: int = 3) -> Tensor:
    """SwAV's distributed_sinkhorn on one process, transcribed (kernel domain). Returns Q (N, K)."""
    q = torch.exp(scores / epsilon).t()
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / n
    return (q * n).t()
