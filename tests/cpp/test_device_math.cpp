// The per-problem math of the CUDA fast paths, run on the host: TinyProblem (tiny_problem.h, the
// CUDA tiny forward's and backward's thread-per-problem solver) against the CPU operator, and the V4 mHC
// Sinkhorn (mhc_v4_math.h, a CUDA thread per problem) against the literal formula in ATen and
// finite differences, and the paper's Sinkhorn on the same header (linear and log domain)
// against the CPU operator. Without a GPU this is what checks those kernels' arithmetic; their
// indexing and launches are checked only where a GPU runs the Python suite.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "mhc_v4_math.h"
#include "sinkhorn_ops.h"
#include "test_util.h"
#include "tiny_problem.h"

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Case {
  int64_t n, m, steps;
  bool start_row, marginals, masked;
  double tol;
  double scale = 2;  // of the random scores
};

// A batch of B random float64 problems for case c: the masks (a masked entry, an empty row in
// problem 1, an empty column in problem 2) and marginals it asks for, and its options.
struct Batch {
  at::Tensor S, a, b;
  sinkhorn_ops::SinkhornOptions o;
};

Batch make_batch(const Case& c, int64_t B, int64_t seed) {
  at::manual_seed(seed);
  Batch t;
  t.S = at::randn({B, c.n, c.m}, at::kDouble) * c.scale;
  if (c.masked) {
    t.S.index_put_({0, 0, 0}, -kInf);
    t.S.select(0, 1).select(0, c.n - 1).fill_(-kInf);
    t.S.select(0, 2).select(1, 0).fill_(-kInf);
  }
  t.o.steps = c.steps;
  t.o.start = c.start_row ? "row" : "col";
  t.o.tol = c.tol;
  if (c.marginals) {
    t.a = at::rand({B, c.n}, at::kDouble) + 0.5;
    t.b = at::rand({B, c.m}, at::kDouble) + 0.5;
    t.b = t.b * (t.a.sum(-1, true) / t.b.sum(-1, true));
    t.o.a = t.a;
    t.o.b = t.b;
  }
  return t;
}

// Problem p of the batch as a TinyProblem: padded scores and the marginals (or the defaults).
template <int NMAX>
sinkhorn::TinyProblem<NMAX, double> tiny_problem(const Batch& t, const Case& c, int64_t p) {
  sinkhorn::TinyProblem<NMAX, double> q;
  q.reset(static_cast<int>(c.n), static_cast<int>(c.m));
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.m; ++j) q.s[i * NMAX + j] = t.S[p][i][j].item<double>();
  if (c.marginals) {
    for (int64_t i = 0; i < c.n; ++i) q.la[i] = std::log(t.a[p][i].item<double>());
    for (int64_t j = 0; j < c.m; ++j) q.lb[j] = std::log(t.b[p][j].item<double>());
  } else {
    q.default_marginals();
  }
  return q;
}

// Solves every problem of a batch with TinyProblem<NMAX, double> (solve, or with `scaled` the
// scaling form solve_scaled of the CUDA tiny forward) and compares the plan, potentials, steps
// and error with the CPU operator.
template <int NMAX>
void check_against_operator(const Case& c, bool scaled = false) {
  const int64_t B = 23;
  const auto t = make_batch(c, B, c.n * 100 + c.m * 10 + c.steps);
  const auto r = sinkhorn_ops::sinkhorn(t.S, t.o);
  for (int64_t p = 0; p < B; ++p) {
    auto q = tiny_problem<NMAX>(t, c, p);
    double error = -1;
    const int64_t used = scaled ? q.solve_scaled(c.steps, c.start_row, c.tol, &error)
                                : q.solve(c.steps, c.start_row, c.tol, &error);
    EXPECT_EQ(used, r.steps[p].item<int64_t>()) << "problem " << p;
    EXPECT_NEAR(error, r.error[p].item<double>(), 1e-10) << "problem " << p;
    for (int64_t i = 0; i < c.n; ++i) {
      EXPECT_NEAR(q.f[i], r.f[p][i].item<double>(), 1e-9) << "f, problem " << p;
      for (int64_t j = 0; j < c.m; ++j)
        EXPECT_NEAR(q.plan(static_cast<int>(i), static_cast<int>(j)),
                    r.plan[p][i][j].item<double>(), 1e-11)
            << "P, problem " << p << " entry " << i << ", " << j;
    }
    for (int64_t j = 0; j < c.m; ++j)
      EXPECT_NEAR(q.g[j], r.g[p][j].item<double>(), 1e-9) << "g, problem " << p;
  }
}

TEST(TinyProblem, MatchesTheCpuOperator) {
  const std::vector<Case> cases = {
      {4, 4, 40, false, false, false, 0.0},  // mHC
      {4, 4, 0, true, false, false, 0.0},    // no step: P = exp(S)
      {3, 2, 7, true, true, false, 0.0},     // rectangular, user marginals
      {4, 3, 9, false, false, true, 0.0},    // masks: an empty row, an empty column
      {2, 4, 500, true, false, false, 1e-6}, // early stopping
  };
  for (const auto& c : cases) check_against_operator<4>(c);
  const std::vector<Case> wide = {
      {8, 8, 40, false, false, false, 0.0},
      {5, 8, 11, true, true, true, 0.0},
      {8, 1, 3, true, false, false, 0.0},
      {7, 6, 300, false, true, false, 1e-7},
  };
  for (const auto& c : wide) check_against_operator<8>(c);
}

TEST(TinyProblem, ScalingFormMatchesTheCpuOperator) {
  const std::vector<Case> cases = {
      {4, 4, 40, false, false, false, 0.0},          // mHC: refreshes at steps 16 and 32
      {4, 4, 0, true, false, false, 0.0},            // no step
      {4, 4, 1, true, false, false, 0.0},            // the exact step 0 alone
      {3, 2, 7, true, true, false, 0.0},             // rectangular, user marginals
      {4, 3, 9, false, false, true, 0.0},            // an empty row, an empty column
      {2, 4, 500, true, false, false, 1e-6},         // early stopping on scaled steps
      {4, 4, 60, false, false, false, 0.0, 40.0},    // wide scores: sums under the floor
      {4, 4, 300, true, true, true, 1e-9, 300.0},    // extreme, to convergence
      // Extreme scores between refreshes: lines whose sums underflow, ratios whose products
      // leave their range.
      {4, 4, 10, true, false, false, 0.0, 300.0},
      {4, 4, 15, false, true, false, 0.0, 600.0},
  };
  for (const auto& c : cases) check_against_operator<4>(c, true);
  const std::vector<Case> wide = {
      {8, 8, 40, false, false, false, 0.0},
      {5, 8, 11, true, true, true, 0.0},
      {7, 6, 300, false, true, false, 1e-7},
      {8, 8, 50, true, false, true, 0.0, 60.0},
      {8, 8, 13, true, false, true, 0.0, 400.0},
  };
  for (const auto& c : wide) check_against_operator<8>(c, true);
}

// TinyProblem::backward against the CPU operator's unrolled backward, with per-problem step
// counts from an early-stopped forward, upstream gradients for P, f and g, and masks.
template <int NMAX>
void check_backward_against_operator(const Case& c) {
  const int64_t B = 17;
  const auto t = make_batch(c, B, c.n * 100 + c.m * 10 + c.steps + 1);
  const auto r = sinkhorn_ops::sinkhorn(t.S, t.o);
  const auto G = at::randn_like(t.S), Gf = at::randn({B, c.n}, at::kDouble),
             Gg = at::randn({B, c.m}, at::kDouble);
  const auto grads = sinkhorn_ops::sinkhorn_backward(t.S, t.o, r, G, Gf, Gg);
  // d log a from d a: the operator returns dL/da = dL/d(log a) / a.
  const auto dla_ref = c.marginals ? grads.a * t.a : at::Tensor();
  const auto dlb_ref = c.marginals ? grads.b * t.b : at::Tensor();
  std::vector<double> hist(sinkhorn::TinyProblem<NMAX, double>::kMaxBackwardSteps * NMAX);
  for (int64_t p = 0; p < B; ++p) {
    auto q = tiny_problem<NMAX>(t, c, p);
    double ds[NMAX * NMAX] = {}, uf[NMAX] = {}, ug[NMAX] = {}, dla[NMAX], dlb[NMAX];
    for (int64_t i = 0; i < c.n; ++i)
      for (int64_t j = 0; j < c.m; ++j) ds[i * NMAX + j] = G[p][i][j].item<double>();
    for (int64_t i = 0; i < c.n; ++i) uf[i] = Gf[p][i].item<double>();
    for (int64_t j = 0; j < c.m; ++j) ug[j] = Gg[p][j].item<double>();
    q.backward(r.steps[p].item<int64_t>(), c.start_row, hist.data(), ds, uf, ug, dla, dlb);
    for (int64_t i = 0; i < c.n; ++i) {
      for (int64_t j = 0; j < c.m; ++j)
        EXPECT_NEAR(ds[i * NMAX + j], grads.scores[p][i][j].item<double>(), 1e-10)
            << "dS, problem " << p << " entry " << i << ", " << j;
      if (c.marginals) EXPECT_NEAR(dla[i], dla_ref[p][i].item<double>(), 1e-10) << "problem " << p;
    }
    if (c.marginals)
      for (int64_t j = 0; j < c.m; ++j)
        EXPECT_NEAR(dlb[j], dlb_ref[p][j].item<double>(), 1e-10) << "problem " << p;
  }
}

TEST(TinyProblem, BackwardMatchesTheCpuOperator) {
  check_backward_against_operator<4>({4, 4, 40, false, false, false, 0.0});
  check_backward_against_operator<4>({3, 4, 9, true, true, true, 0.0});
  check_backward_against_operator<4>({4, 2, 60, true, false, false, 1e-4});
  check_backward_against_operator<8>({8, 8, 40, false, true, false, 0.0});
  check_backward_against_operator<8>({5, 7, 33, true, false, true, 1e-6});
}

// The scalar functions a CUDA thread gives mhc_v4_math.h (mhc_problem.cuh's DeviceOps), on the
// host.
template <typename T>
struct HostOps {
  using E = T;
  static T exp(T x) { return std::exp(x); }
  static T log(T x) { return std::log(x); }
  static T max(T a, T b) { return a > b ? a : b; }
  template <int K>
  static void reciprocals(const T* d, T* inv) {  // the CUDA side's, bit for bit
    for (int a = 0; a < K; ++a) inv[a] = T(1) / d[a];
  }
  template <int K>
  static void forward_reciprocals(const T* d, T* inv) {  // the CUDA side's: the same
    reciprocals<K>(d, inv);
  }
};

template <int N>
void check_v4(int iters, double eps) {
  using Problem = sinkhorn::v4::Problem<N, double, HostOps<double>>;
  at::manual_seed(N * 7 + iters);
  const auto x = at::randn({N, N}, at::kDouble) * 3;
  const auto w = at::randn({N, N}, at::kDouble);
  const auto ref = test_util::v4_formula(x, iters, eps);
  double c[N * N], xs[N * N], g[N * N];
  std::vector<double> hist(sinkhorn::v4::normalisations(iters) * N);
  for (int k = 0; k < N * N; ++k) xs[k] = c[k] = x.view(-1)[k].item<double>();
  Problem::forward(c, iters, eps, nullptr);
  for (int k = 0; k < N * N; ++k) EXPECT_NEAR(c[k], ref.view(-1)[k].item<double>(), 1e-14);
  // Gradient of L = sum(w * comb) against central differences of the literal formula.
  for (int k = 0; k < N * N; ++k) g[k] = w.view(-1)[k].item<double>();
  Problem::backward(xs, g, iters, eps, hist.data());
  const double h = 1e-6;
  for (int k = 0; k < N * N; ++k) {
    auto xp = x.clone(), xm = x.clone();
    xp.view(-1)[k] += h;
    xm.view(-1)[k] -= h;
    const double fd = ((test_util::v4_formula(xp, iters, eps) - test_util::v4_formula(xm, iters, eps)) * w)
                          .sum()
                          .item<double>() /
                      (2 * h);
    EXPECT_NEAR(g[k], fd, 1e-7) << "n " << N << " entry " << k;
  }
}

TEST(MhcV4Math, ForwardAndBackwardOnTheHost) {
  check_v4<1>(20, 1e-6);
  check_v4<2>(1, 1e-6);
  check_v4<4>(20, 1e-6);
  check_v4<4>(5, 1e-2);
  check_v4<8>(32, 1e-6);
}

// The paper's Sinkhorn as a CUDA thread runs it (mhc_v4.cu with V4Params::paper; scalar T, so
// the domain test is a bool where the CPU has lane masks): the problem transposed, eps = 0, the
// log-domain twin where needs_log_domain says so; against the log-domain operator on the same
// values, forward and unrolled gradient. scale spreads the logits; masked adds a -inf entry and
// a dead row.
template <int N, typename T>
void check_paper(double scale, int iters, bool masked, bool want_log) {
  using Problem = sinkhorn::v4::Problem<N, T, HostOps<T>>;
  const at::ScalarType st = std::is_same_v<T, float> ? at::kFloat : at::kDouble;
  at::manual_seed(N * 11 + iters);
  auto H = (at::randn({1, N, N}, at::kDouble) * scale).to(st).to(at::kDouble);
  if (masked) {
    H.index_put_({0, 0, N - 1}, -kInf);
    H.select(1, 1).fill_(-kInf);
  }
  const auto w = at::randn({1, N, N}, at::kDouble);
  sinkhorn_ops::SinkhornOptions o;
  o.steps = 2 * iters;
  o.start = "col";
  const auto r = sinkhorn_ops::sinkhorn(H, o);
  const auto want = sinkhorn_ops::sinkhorn_backward(H, o, r, w).scores;
  T x[N * N], c[N * N], g[N * N];
  std::vector<T> hist(sinkhorn::v4::normalisations(iters) * N);
  auto at_t = [](const at::Tensor& t, int k) {  // entry k of the transpose
    return t.view(-1)[sinkhorn::v4::transposed(k, N)].item<double>();
  };
  for (int k = 0; k < N * N; ++k) c[k] = x[k] = static_cast<T>(at_t(H, k));
  const bool in_log = Problem::needs_log_domain(x);
  EXPECT_EQ(in_log, want_log) << "n " << N << " scale " << scale;
  if (in_log) {
    Problem::log_forward(c, iters);
  } else {
    Problem::forward(c, iters, T(0), nullptr);
  }
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  for (int k = 0; k < N * N; ++k) EXPECT_NEAR(c[k], at_t(r.plan, k), tol) << "n " << N << " " << k;
  for (int k = 0; k < N * N; ++k) g[k] = static_cast<T>(at_t(w, k));
  if (in_log) {
    Problem::log_backward(x, g, iters, hist.data());
  } else {
    Problem::backward(x, g, iters, T(0), hist.data());
  }
  const double gtol = tol * (1 + want.abs().max().item<double>());
  for (int k = 0; k < N * N; ++k) EXPECT_NEAR(g[k], at_t(want, k), gtol) << "n " << N << " " << k;
}

TEST(MhcPaperMath, LinearAndLogDomainOnTheHostAsACudaThread) {
  check_paper<4, double>(1.0, 20, false, false);
  check_paper<4, double>(40.0, 20, false, true);
  check_paper<4, double>(1.0, 20, true, true);
  check_paper<4, float>(1.0, 20, false, false);
  check_paper<4, float>(40.0, 20, false, true);
  check_paper<4, float>(1.0, 20, true, true);
  check_paper<2, double>(100.0, 3, false, true);
  check_paper<8, float>(1.0, 32, false, false);
  check_paper<8, double>(1.0, 7, true, true);
}

TEST(MhcPaperMath, NonFiniteLogitsGiveNaNOverTheProblem) {
  using Problem = sinkhorn::v4::Problem<4, float, HostOps<float>>;
  for (float bad : {std::nanf(""), static_cast<float>(kInf)}) {
    float c[16];
    for (int k = 0; k < 16; ++k) c[k] = 0.1f * static_cast<float>(k % 5);
    c[6] = bad;
    EXPECT_TRUE(Problem::needs_log_domain(c));
    Problem::log_forward(c, 20);
    for (int k = 0; k < 16; ++k) EXPECT_TRUE(std::isnan(c[k])) << bad << " entry " << k;
  }
}

}  // namespace
