// The CPU solver (MATH.md section 1), compiled once per instruction set (forward_*.cpp) with
// internal linkage, so that each copy is vectorised for its ISA and no symbol is shared.
//
// Work mapping: with at least as many problems as threads, each thread solves whole problems
// (no per-step synchronisation); otherwise the problems run one after another and each step is
// split across threads, by rows for a row step and by column chunks for a column step, so that
// every write is owned by one thread. Nothing is allocated per step in the per-problem mode:
// scratch lives in per-thread buffers.
#pragma once

#include "isa_prelude.h"
#include "tiny_solver.h"
#include "vec_math.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit

using sinkhorn::math::neg_inf;

constexpr int64_t kRowBlock = 16;     // rows per block of the column step (stays in L1)
constexpr int64_t kColChunk = 256;    // columns per chunk of the column step and the plan write
constexpr int64_t kGrainElems = 1 << 15;  // elements of work worth a thread

// Per-thread buffers of the inner loops, allocated once (uninitialised) and reused.
template <typename acc_t>
struct Scratch {
  std::unique_ptr<acc_t[]> block, in, out;
  explicit Scratch(int64_t m)
      : block(new acc_t[kRowBlock * kColChunk + kColChunk]),
        in(new acc_t[std::max(m, kColChunk)]),
        out(new acc_t[std::max(m, kColChunk)]) {}
};

template <typename scalar_t, typename acc_t>
struct Solver {
  const sinkhorn::FwdParams& p;
  bool parallel;  // split each step across threads (false inside a per-problem parallel loop)
  Scratch<acc_t>* serial_scratch;  // the buffers of the calling thread when !parallel

  // The buffers of this chunk: the thread's own when serial, a fresh set per parallel chunk.
  template <typename F>
  void with_scratch(const F& fn) const {
    if (!parallel) return fn(*serial_scratch);
    Scratch<acc_t> local(p.m);
    fn(local);
  }

  // Converts S[i, j0:j0+len] to acc_t in `buf`, or points at S when no conversion is needed.
  static const acc_t* row(const scalar_t* S, int64_t m, int64_t i, int64_t j0, int64_t len,
                          acc_t* buf) {
    const scalar_t* src = S + i * m + j0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      widen(src, buf, len);
      return buf;
    }
  }

  template <typename F>
  void for_range(int64_t size, int64_t cost_per_item, const F& fn) const {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, cost_per_item));
    if (parallel) {
      at::parallel_for(0, size, grain, fn);
    } else if (size > 0) {
      fn(0, size);
    }
  }

  // lse[i] = LSE_j (S_ij + g_j) for every row.
  void row_lse(const scalar_t* S, const acc_t* g, acc_t* lse) const {
    const int64_t n = p.n, m = p.m;
    for_range(n, m, [&](int64_t i0, int64_t i1) {
      with_scratch([&](Scratch<acc_t>& sc) {
        for (int64_t i = i0; i < i1; ++i) lse[i] = lse_plus(row(S, m, i, 0, m, sc.in.get()), g, m);
      });
    });
  }

  // lse[j] = LSE_i (S_ij + f_i) for every column: column chunks, rows in blocks whose max is
  // taken first, so each entry costs one exp and S is read from memory once.
  void col_lse(const scalar_t* S, const acc_t* f, acc_t* lse, acc_t* sum) const {
    const int64_t n = p.n, m = p.m;
    const int64_t chunks = (m + kColChunk - 1) / kColChunk;
    for_range(chunks, n * kColChunk, [&](int64_t c0, int64_t c1) {
     with_scratch([&](Scratch<acc_t>& sc) {
      acc_t* buf = sc.block.get();
      acc_t* bmax = buf + kRowBlock * kColChunk;
      const acc_t* rows[kRowBlock];
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kColChunk, w = std::min(kColChunk, m - j0);
        acc_t* mx = lse + j0;
        acc_t* sm = sum + j0;
        std::fill(mx, mx + w, neg_inf<acc_t>());
        std::fill(sm, sm + w, acc_t(0));
        for (int64_t i0 = 0; i0 < n; i0 += kRowBlock) {
          const int64_t r = std::min(kRowBlock, n - i0);
          std::fill(bmax, bmax + w, neg_inf<acc_t>());
          for (int64_t k = 0; k < r; ++k) {
            rows[k] = row(S, m, i0 + k, j0, w, buf + k * kColChunk);
            const acc_t fi = f[i0 + k];
            for (int64_t j = 0; j < w; ++j) {
              const acc_t v = rows[k][j] + fi;
              bmax[j] = (v > bmax[j] || v != v) ? v : bmax[j];
            }
          }
          for (int64_t j = 0; j < w; ++j) {
            const acc_t nm = (bmax[j] > mx[j] || bmax[j] != bmax[j]) ? bmax[j] : mx[j];
            const acc_t scale = exp_vec(mx[j] - nm);
            sm[j] *= (nm == mx[j]) ? acc_t(1) : scale;
            mx[j] = nm;
          }
          for (int64_t k = 0; k < r; ++k) {
            const acc_t fi = f[i0 + k];
            for (int64_t j = 0; j < w; ++j) {
              const acc_t v = rows[k][j] + fi;
              const acc_t e = exp_vec(v - mx[j]);
              sm[j] += (v == neg_inf<acc_t>()) ? acc_t(0) : e;
            }
          }
        }
        for (int64_t j = 0; j < w; ++j) {
          const bool finite_max = mx[j] > neg_inf<acc_t>() && mx[j] < acc_t(INFINITY);
          mx[j] = finite_max ? mx[j] + std::log(sm[j])
                             : (mx[j] == acc_t(INFINITY) ? acc_t(NAN) : mx[j]);
        }
      }
     });
    });
  }

  // Default marginals from the finite pattern of S (MATH.md section 1, masks).
  void default_marginals(const scalar_t* S, acc_t* la, acc_t* lb) const {
    const int64_t n = p.n, m = p.m;
    std::fill(lb, lb + m, acc_t(0));  // first the alive flags of the columns, as 0 or 1
    int64_t rows_alive = 0;
    for (int64_t i = 0; i < n; ++i) {
      bool alive = false;
      const scalar_t* s = S + i * m;
      for (int64_t j = 0; j < m; ++j) {
        const bool a = static_cast<acc_t>(s[j]) != neg_inf<acc_t>();
        alive |= a;
        lb[j] = a ? acc_t(1) : lb[j];
      }
      la[i] = sinkhorn::math::default_log_a<acc_t>(alive);
      rows_alive += alive;
    }
    const int64_t cols_alive = std::count(lb, lb + m, acc_t(1));
    for (int64_t j = 0; j < m; ++j)
      lb[j] = sinkhorn::math::default_log_b<acc_t>(lb[j] == acc_t(1), rows_alive, cols_alive);
  }

  // Writes P = exp(S + f + g) and returns the L1 error of the row (`rows`) or column marginal.
  acc_t write_plan(const scalar_t* S, const acc_t* f, const acc_t* g, const acc_t* la,
                   const acc_t* lb, scalar_t* P, bool rows, acc_t* scratch) const {
    const int64_t n = p.n, m = p.m;
    if (rows) {
      for_range(n, m, [&](int64_t i0, int64_t i1) {
       with_scratch([&](Scratch<acc_t>& sc) {
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t* s = row(S, m, i, 0, m, sc.in.get());
          acc_t* o = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(P + i * m)
                                                     : sc.out.get();
          const acc_t sum = exp_row(s, f[i], g, o, m);
          if constexpr (!std::is_same_v<scalar_t, acc_t>) narrow(o, P + i * m, m);
          scratch[i] = std::abs(sum - sinkhorn::math::exp_(la[i]));
        }
       });
      });
      return sum_of(scratch, n);
    }
    const int64_t chunks = (m + kColChunk - 1) / kColChunk;
    for_range(chunks, n * kColChunk, [&](int64_t c0, int64_t c1) {
     with_scratch([&](Scratch<acc_t>& sc) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kColChunk, w = std::min(kColChunk, m - j0);
        acc_t* cs = scratch + j0;
        std::fill(cs, cs + w, acc_t(0));
        for (int64_t i = 0; i < n; ++i) {
          const acc_t* s = row(S, m, i, j0, w, sc.in.get());
          acc_t* o = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(P + i * m + j0)
                                                     : sc.out.get();
          exp_row(s, f[i], g + j0, o, w);
          for (int64_t j = 0; j < w; ++j) cs[j] += o[j];
          if constexpr (!std::is_same_v<scalar_t, acc_t>) narrow(o, P + i * m + j0, w);
        }
        for (int64_t j = 0; j < w; ++j) cs[j] = std::abs(cs[j] - sinkhorn::math::exp_(lb[j0 + j]));
      }
     });
    });
    return sum_of(scratch, m);
  }

  static acc_t sum_of(const acc_t* x, int64_t len) {
    acc_t s = 0;
    for (int64_t i = 0; i < len; ++i) s += x[i];
    return s;
  }

  // Solves problem b; `work` holds n + m + 2 max(n, m) values.
  void solve(int64_t b, acc_t* work) const {
    const int64_t n = p.n, m = p.m;
    const scalar_t* S = static_cast<const scalar_t*>(p.scores) + b * n * m;
    scalar_t* P = static_cast<scalar_t*>(p.plan) + b * n * m;
    acc_t* f = static_cast<acc_t*>(p.f) + b * n;
    acc_t* g = static_cast<acc_t*>(p.g) + b * m;
    acc_t* la = work;
    acc_t* lb = la + n;
    acc_t* lse = lb + m;                    // LSE of the step in flight
    acc_t* scratch = lse + std::max(n, m);  // sums and error terms
    // Default marginals need the allowed rows and columns. Started with rows and run for two
    // steps or more, the first row step's LSEs (-inf exactly on empty rows, f being 0) and the
    // first column step's (f finite) give them without a separate pass over S.
    const bool from_steps = !p.log_a && p.start_row && p.steps >= 2;
    int64_t rows_alive = 0;
    if (p.log_a) {
      std::copy_n(static_cast<const acc_t*>(p.log_a) + b * n, n, la);
      std::copy_n(static_cast<const acc_t*>(p.log_b) + b * m, m, lb);
    } else if (!from_steps) {
      default_marginals(S, la, lb);
    }
    std::fill(f, f + n, acc_t(0));
    std::fill(g, g + m, acc_t(0));
    acc_t threshold = 0;
    auto set_threshold = [&] {
      acc_t mass = 0;
      for (int64_t i = 0; i < n; ++i) mass += sinkhorn::math::exp_(la[i]);
      threshold = static_cast<acc_t>(p.tol) * mass;
    };
    if (!from_steps) set_threshold();

    int64_t k = 0;
    for (; k < p.steps; ++k) {
      const bool row_step = (k % 2 == 0) == p.start_row;
      const int64_t len = row_step ? n : m;
      acc_t* pot = row_step ? f : g;
      const acc_t* lm = row_step ? la : lb;
      if (row_step) {
        row_lse(S, g, lse);
      } else {
        col_lse(S, f, lse, scratch);
      }
      if (from_steps && k == 0) {
        for (int64_t i = 0; i < n; ++i) {
          const bool alive = lse[i] != neg_inf<acc_t>();
          la[i] = sinkhorn::math::default_log_a<acc_t>(alive);
          rows_alive += alive;
        }
        set_threshold();
      } else if (from_steps && k == 1) {
        const int64_t cols_alive = std::count_if(
            lse, lse + m, [](acc_t v) { return v != neg_inf<acc_t>(); });
        for (int64_t j = 0; j < m; ++j)
          lb[j] = sinkhorn::math::default_log_b<acc_t>(lse[j] != neg_inf<acc_t>(), rows_alive,
                                                       cols_alive);
      }
      if (p.tol > 0 && k >= 1) {
        acc_t err = 0;
        for (int64_t i = 0; i < len; ++i)
          err += sinkhorn::math::marginal_error(lm[i], lse[i], pot[i]);
        if (err <= threshold) {
          static_cast<acc_t*>(p.error)[b] = err;
          p.steps_used[b] = k;
          write_plan(S, f, g, la, lb, P, row_step, scratch);
          return;
        }
      }
      for (int64_t i = 0; i < len; ++i) pot[i] = sinkhorn::math::potential(lm[i], lse[i]);
    }
    // The marginal the last step did not fix; with no step, the one the first would fix.
    const bool last_row = k == 0 ? !p.start_row : ((k - 1) % 2 == 0) == p.start_row;
    static_cast<acc_t*>(p.error)[b] = write_plan(S, f, g, la, lb, P, !last_row, scratch);
    p.steps_used[b] = k;
  }
};

template <typename scalar_t>
void forward(const sinkhorn::FwdParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  if (forward_tiny<scalar_t>(p)) return;
  const int64_t work_len = p.n + p.m + 2 * std::max(p.n, p.m);
  if (p.B >= at::get_num_threads()) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, p.n * p.m));
    at::parallel_for(0, p.B, grain, [&](int64_t b0, int64_t b1) {
      Scratch<acc_t> scratch(p.m);
      Solver<scalar_t, acc_t> solver{p, false, &scratch};
      std::vector<acc_t> work(work_len);
      for (int64_t b = b0; b < b1; ++b) solver.solve(b, work.data());
    });
  } else {
    Solver<scalar_t, acc_t> solver{p, true, nullptr};
    std::vector<acc_t> work(work_len);
    for (int64_t b = 0; b < p.B; ++b) solver.solve(b, work.data());
  }
}

// Runs the forward of every problem of `p` for scores of dtype `dtype`.
void forward_any(const sinkhorn::FwdParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sinkhorn_cpu",
                                  [&] { forward<scalar_t>(p); });
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
