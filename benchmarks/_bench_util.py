"""Shared benchmark helpers: environment header, timing quantiles, peak memory, CSV and markdown."""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Self, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

# Repeat policy: time `budget_s` worth of calls, clamped to [min_reps, max_reps]; a warm-up call
# slower than `slow_s` is the only sample, so a run stays within minutes on a shared 2-core machine.
# paired_rounds: rounds of paired_ratio for the targets.
QUICK = dict(budget_s=1.0, min_reps=3, max_reps=20, slow_s=5.0, paired_rounds=3)
FULL = dict(budget_s=5.0, min_reps=5, max_reps=100, slow_s=30.0, paired_rounds=7)


def bench_parser(doc: str | None, quick_help: str | None = None,
                 out: bool = True) -> argparse.ArgumentParser:
    """The benchmarks' common arguments: --device, --out (unless out is False) and, with
    quick_help, --quick. Parse with parse_bench_args."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    if out:
        p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    if quick_help is not None:
        p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def parse_bench_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """p's arguments; --device cuda without CUDA is a usage error."""
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    return args


def compiled_call(fn: Callable, call: Callable[[Callable], object],
                  device: str) -> tuple[Callable[[], object], float]:
    """torch.compile of fn with a fresh dynamo cache (no recompile limit, no stale guards), as
    the no-argument call lambda: call(compiled) to time, and the seconds of its first call (the
    compilation), which that call then excludes."""
    torch._dynamo.reset()
    compiled = torch.compile(fn)

    def run() -> object:
        return call(compiled)

    t0 = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return run, time.perf_counter() - t0


def git_commit() -> str:
    """Short HEAD hash; 'uncommitted' when there is no commit or the tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
    except (subprocess.CalledProcessError, OSError):
        return "uncommitted"
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, OSError):
        dirty = True
    return f"uncommitted (on {head})" if dirty else head


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, str]:
    """What a reader needs to reproduce or compare a table."""
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "threads": str(torch.get_num_threads()),
        "cpus": str(os.cpu_count()),
        "load average (start)": load_average(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    if device == "cuda":
        env["cuda"] = str(torch.version.cuda)
    return env


def load_average() -> str:
    """1, 5 and 15-minute load averages: other processes skew CPU timings, and this shows it."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)  # CPU allocator failures are plain RuntimeErrors
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text))


def free_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def copy_fn(nbytes: int, device: str) -> Callable[[], object]:
    """A device-to-device copy that reads nbytes / 2 and writes nbytes / 2: the bandwidth baseline
    of a kernel that must move nbytes (timed in the same run as the kernel)."""
    src = torch.empty(max(1, nbytes // 8), dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


_L2_FLUSH: dict[str, torch.Tensor] = {}


def _flush_cache(device: str) -> None:
    # Writing 256 MiB evicts the GPU L2 (50 MiB on H100) so no call reads its inputs from cache.
    if device == "cuda":
        buf = _L2_FLUSH.setdefault(device, torch.empty(64 << 20, dtype=torch.int32, device=device))
        buf.zero_()


def time_ms(fn: Callable[[], object], device: str, policy: dict,
            warm_s: float | None = None) -> list[float]:
    """Wall time in ms of each repeat of fn() after warm-up; CUDA calls are timed with events.
    warm_s: seconds a call of fn that the caller just made took; it stands for the first warm-up."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    first = warm_s
    if first is None:
        t0 = time.perf_counter()
        fn()  # first warm-up: allocations, lazy initialisation, autotuning
        sync()
        first = time.perf_counter() - t0
    if first > policy["slow_s"]:  # one more call costs more than any warm-up effect it removes
        return [first * 1e3]
    if first < 0.05:  # fast calls: more warm-up so caches and allocator reach steady state
        for _ in range(max(1, int(0.1 / max(first, 1e-6)))):
            fn()
        sync()
    reps = int(policy["budget_s"] / max(first, 1e-9))
    reps = max(policy["min_reps"], min(policy["max_reps"], reps))
    return [call_ms(fn, device) for _ in range(reps)]


def call_ms(fn: Callable[[], object], device: str) -> float:
    """One call of fn in ms, from a cold cache: CUDA events on the GPU, wall time on the CPU."""
    _flush_cache(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def paired_ratio(ours: Callable[[], object], base: Callable[[], object], device: str,
                 ms: tuple[float, float], rounds: int,
                 budget_ms: float = 1000.0) -> tuple[float, float, float]:
    """base time / ours time, the two timed in alternation: each round times a few calls of ours,
    then of base (each side's median; as many calls as fit budget_ms at the p50s in ms, 1 to 5),
    so a machine whose speed drifts (a shared host) slows both sides of a round alike. Returns
    the median, min and max of the rounds' ratios."""
    reps = [max(1, min(5, int(budget_ms / max(t, 1e-6)))) for t in ms]
    ratios = []
    for _ in range(rounds):
        mine, theirs = (float(np.median([call_ms(fn, device) for _ in range(k)]))
                        for fn, k in zip((ours, base), reps))
        ratios.append(theirs / mine)
    return float(np.median(ratios)), min(ratios), max(ratios)


# A result row's paired fields (set_paired), and the legend line of the tables that use them.
PAIRED_FIELDS = dict(paired_speedup=None, paired_min=None, paired_max=None)
PAIRED_LEGEND = ("- target: judged on the paired ratio, the median over rounds that time ours "
                 "and the target's baseline in alternation (benchmarks/_bench_util.py "
                 "paired_ratio; rounds' range in brackets), not on the ×X column, whose p50s "
                 "come from different minutes of a shared host.")


def set_paired(base_row: dict, ours: Callable[[], object], base: Callable[[], object],
               device: str, ours_ms: float, policy: dict) -> None:
    """Fills base_row's paired fields: paired_ratio of base against ours, policy's rounds."""
    base_row.update(zip(("paired_speedup", "paired_min", "paired_max"), paired_ratio(
        ours, base, device, (ours_ms, base_row["ms_p50"]), policy["paired_rounds"])))


def target_cell(base_row: dict, need: float, base: str) -> str:
    """"≥need× base: met / NOT met / no data", judged on the paired ratio when base_row has one
    (else its p50 speedup), with the paired median and the rounds' range."""
    got = base_row.get("paired_speedup") or base_row.get("speedup")
    verdict = "no data" if got is None else ("met" if got >= need else "NOT met")
    text = f"≥{need:g}× {base}: {verdict}"
    if base_row.get("paired_speedup"):
        text += (f" (paired {base_row['paired_speedup']:.1f}×, rounds "
                 f"{base_row['paired_min']:.1f}–{base_row['paired_max']:.1f})")
    return text


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """Liger-style p20, p50, p80."""
    p20, p50, p80 = np.percentile(np.asarray(samples, dtype=np.float64), [20, 50, 80])
    return float(p20), float(p50), float(p80)


def peak_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated by one call beyond what was live before it; None on CPU."""
    if device != "cuda":
        return None
    free_memory(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ATen operators that move or compute no data (views, metadata, allocation): not counted as work.
_NO_WORK = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view",
            "aten::_unsafe_view", "aten::as_strided", "aten::t", "aten::transpose",
            "aten::expand", "aten::reshape", "aten::_reshape_alias", "aten::resolve_conj",
            "aten::resolve_neg", "aten::detach", "aten::select", "aten::narrow", "aten::slice",
            "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::permute",
            "aten::lift_fresh", "aten::result_type", "aten::split", "aten::split_with_sizes",
            "aten::unflatten", "aten::flatten", "aten::contiguous", "aten::to", "aten::_to_copy",
            "aten::broadcast_to", "aten::numpy_T", "aten::matrix_H", "aten::mT", "aten::unbind",
            "aten::set_", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense"}


# Operators of ours that launch nothing themselves (their ATen ops are counted instead).
_COMPOSITE = {"sinkhorn_ops::rms_projection"}


def launches(fn: Callable[[], object], device: str) -> int:
    """Units of device work in one call of fn. On CUDA: the kernels, copies and memsets it
    launched (the profiler's device events). On the CPU: each innermost operator of ours that
    runs a kernel (sinkhorn_ops::..., the innermost of a nested call), plus each innermost ATen
    operator that computes or copies (no views, allocations or metadata). On a host-bound call
    each costs about a launch's host time, so this counts what fusion removes."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: caches, lazy initialisation
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    ours = "sinkhorn_ops::"

    def work(e) -> bool:
        return e.name.startswith(("aten::", ours)) and e.name not in _NO_WORK

    def any_below(e, pred) -> bool:
        return any(pred(c) or any_below(c, pred) for c in e.cpu_children)

    count = 0
    for e in events:
        if e.name.startswith(ours):
            count += e.name not in _COMPOSITE and not any_below(e, lambda c: c.name.startswith(ours))
        elif work(e):
            count += not any(work(c) for c in e.cpu_children)
    return count


def fmt(x: object, digits: int = 3) -> str:
    """Compact cell text: significant digits for floats, '—' for missing values."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or x == "":
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    return str(x)


def write_csv(path: Path, rows: list[dict], env: dict[str, str]) -> None:
    """One row per measurement, each carrying the environment so files can be concatenated."""
    fields = list(dict.fromkeys(k for r in rows for k in r)) + list(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: _csv_cell(v) for k, v in r.items()}, **env})


def _csv_cell(v: object) -> object:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: Path, title: str, env: dict[str, str], body: Sequence[str]) -> None:
    text = [f"# {title}", ""] + [f"- **{k}**: `{v}`" for k, v in env.items()] + [""] + list(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text).rstrip() + "\n")


def write_results(out: Path, stem: str, title: str, rows: list[dict], env: dict[str, str],
                  body: Sequence[str]) -> None:
    """Writes <out>/<stem>.csv and <out>/<stem>.md (the environment closed by the end-of-run load
    average) and prints the markdown."""
    env["load average (end, includes this run)"] = load_average()
    csv_path = out / f"{stem}.csv"
    md_path = csv_path.with_suffix(".md")
    write_csv(csv_path, rows, env)
    write_markdown(md_path, title, env, body)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")


class SavedBytes:
    """Context manager: bytes of the distinct storages autograd saves for backward while it is
    active (torch.autograd.graph.saved_tensors_hooks), each storage counted once and whole, a
    saved input included. Device-agnostic; read .nbytes after the block."""

    def __init__(self) -> None:
        self.nbytes = 0
        self._seen: dict[tuple[str, int], object] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in self._seen:  # holding the storage keeps its address from being reused
            self._seen[key] = storage
            self.nbytes += storage.nbytes()
        return t

    def __enter__(self) -> Self:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._seen.clear()
