// The implicit-function-theorem backward of the Sinkhorn operator (MATH.md section 2.2), in
// ATen ops, so one implementation serves every device (CompositeExplicitAutograd). Its memory
// does not depend on the number of forward steps: it needs only the plan.
//
// With r = P 1, c = P^T 1 and Gamma = Gbar * P, it solves
//   [diag(r) P; P^T diag(c)] [x; y] = [Gamma 1 + dL/df; Gamma^T 1 + dL/dg]
// through the Schur complement on the smaller side, then dS = P * (Gbar - x (+) y), da = x,
// db = y. The system has a null direction (1, -1) per connected component of the plan's support
// (support_components.h): the right-hand side is projected onto the balanced pairs (per
// component when dL/df or dL/dg come, since Gamma's sums are balanced on every component by
// themselves), the Schur matrix gets alpha w w^T (w = the columns with mass; one such term a
// component in the dense solve when the components were found), which fixes the null
// directions exactly, and the solution is returned in the min-norm gauge. A plan whose support
// is split, or joined only through entries near the underflow threshold (a peaked plan in
// float32), leaves the Schur matrix singular to working precision, where a plain LU divides by
// a zero pivot (NaN gradients from finite scores) and conjugate gradients can take a huge
// step: the dense solve adds a ridge of side * eps * alpha and refines against the matrix
// without it, the conjugate gradients run on a ridge of eps * alpha.
#include <ATen/ATen.h>

#include <cmath>
#include <functional>
#include <limits>
#include <tuple>

#include "safe_div.h"
#include "sinkhorn_backward.h"
#include "support_components.h"

namespace sinkhorn_ops {
namespace detail {
namespace {

// Min side above which "implicit" switches from the dense solve to conjugate gradients.
constexpr int64_t kDenseMaxSide = 256;
// Largest side whose dense solve factors by LU; Cholesky above (see dense_solve).
constexpr int64_t kLuMaxSide = 128;

at::Tensor bmv(const at::Tensor& A, const at::Tensor& v) {  // (B, p, q) x (B, q) -> (B, p)
  return at::bmm(A, v.unsqueeze(-1)).squeeze(-1);
}

at::Tensor bdot(const at::Tensor& u, const at::Tensor& v) {  // per problem, kept as (B, 1)
  return (u * v).sum(-1, /*keepdim=*/true);
}

struct Schur {
  at::Tensor P, rinv, c, w, alpha;  // P (B, N, M) with M the solved side
  // (B, M, M) 1 where two columns share a component of the support, or undefined (one
  // component): the dense matrix's rank-one term is then one a component, alpha w_k w_k^T,
  // which fixes every null direction of a split support, not only the whole support's.
  at::Tensor same;

  // (diag(c) - P^T diag(1/r) P + diag(1 - w) + alpha w w^T) y, matrix-free: two passes over P.
  at::Tensor apply(const at::Tensor& y) const {
    const auto Pt = P.transpose(1, 2);
    return c * y - bmv(Pt, rinv * bmv(P, y)) + (1 - w) * y + alpha * w * bdot(w, y);
  }

  at::Tensor dense() const {
    const auto Pt = P.transpose(1, 2);
    auto rank_one = alpha.unsqueeze(-1) * w.unsqueeze(-1) * w.unsqueeze(-2);
    if (same.defined()) rank_one = rank_one * same;
    return at::diag_embed(c + (1 - w)) - at::bmm(Pt * rinv.unsqueeze(1), P) + rank_one;
  }

  at::Tensor diagonal() const {
    return c - (P * P * rinv.unsqueeze(-1)).sum(1) + (1 - w) + alpha * w * w;
  }
};

double machine_eps(at::ScalarType acc) {
  return acc == at::kDouble ? std::numeric_limits<double>::epsilon()
                            : std::numeric_limits<float>::epsilon();
}

CgSolver& cg_solver(c10::DeviceType device) {
  static CgSolver solvers[static_cast<int>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)] = {};
  return solvers[static_cast<int>(device)];
}

// Jacobi-preconditioned conjugate gradients, a fixed number of iterations on the device; a
// problem whose residual is below tol * |rhs| stops updating (no host synchronisation). A
// device's registered solver (flip: A.P is the plan's transpose) takes the call first.
at::Tensor conjugate_gradients(const Schur& A, const at::Tensor& rhs, double tol, int64_t iters,
                               bool flip) {
  const auto d = A.diagonal();
  const auto dinv = safe_div(at::ones_like(d), d.clamp_min(0));
  if (const CgSolver solver = cg_solver(rhs.device().type())) {
    const auto y = at::empty(rhs.sizes(), rhs.options());  // contiguous, as the solver writes it
    const CgSystem system{(flip ? A.P.transpose(1, 2) : A.P).contiguous(),
                          flip,
                          A.rinv.contiguous(),
                          A.c.contiguous(),
                          A.w.contiguous(),
                          A.alpha.reshape({-1}).contiguous(),
                          dinv.contiguous(),
                          rhs.contiguous(),
                          tol,
                          iters};
    if (solver(system, y)) return y;
  }
  auto y = at::zeros_like(rhs);
  auto res = rhs.clone();
  auto z = dinv * res;
  auto p = z.clone();
  auto rz = bdot(res, z);
  const auto stop = tol * tol * bdot(rhs, rhs);
  for (int64_t it = 0; it < iters; ++it) {
    const auto active = (bdot(res, res) > stop).to(rhs.scalar_type());
    const auto Ap = A.apply(p);
    const auto step = active * safe_div(rz, bdot(p, Ap));
    y = y + step * p;
    res = res - step * Ap;
    z = dinv * res;
    const auto rz_next = bdot(res, z);
    p = z + safe_div(rz_next, rz) * p;
    rz = rz_next;
  }
  return y;
}

// The Cholesky factor of the ridged Schur matrix, which is symmetric positive definite (the
// Schur complement of a PSD H plus the rank-one terms and the ridge). Used above kLuMaxSide,
// not LU: on the CPU, torch 2.13's batched LU (MKL getrf, two or more threads) hangs from sides
// of about 160 after "Parameter 6 was incorrect on entry to SLASWP", as plain torch.linalg.solve
// and torch.linalg.inv do (129 ran). A problem whose ridged matrix is not positive definite to
// working precision (not seen in the cases tried) takes the factor of a ridge a thousand times
// larger. Below kLuMaxSide the LU is kept: the two factors and their solves cost 2.6 times the
// LU's time at 64 x 128 x 128 on the CPU (tril inside cholesky_ex, 5 ms a call there).
// Where info can be read without a host synchronisation (readable_on_host: the CPU) and every
// factor succeeded, the wider one is not computed (it was half the factorisations' time).
at::Tensor cholesky_factor(const at::Tensor& matrix, const at::Tensor& ridge) {
  const auto [factor, info] =
      at::linalg_cholesky_ex(matrix + ridge, /*upper=*/false, /*check_errors=*/false);
  if (readable_on_host(info) && !info.any().item<bool>()) return factor;
  const auto [wider, unused] =
      at::linalg_cholesky_ex(matrix + ridge * 1000, /*upper=*/false, /*check_errors=*/false);
  return at::where((info == 0).view({-1, 1, 1}), factor, wider);
}

// The dense solve of A y = rhs, A = Schur::dense(): an LU (up to kLuMaxSide) or Cholesky factor
// of A + mu I, mu = side * eps * alpha (the mean mass of a column), then two steps of
// iterative refinement against A itself. On the directions where A's eigenvalues are well above
// mu this converges to A's own solution (each step shrinks the error by mu / (lambda + mu));
// directions at or below rounding level, whose right-hand side is rounding too for a balanced
// right-hand side, stay bounded instead of dividing by a zero pivot, and they change dS only
// through entries of P near zero.
// Differentiable: through the explicit inverse of A + mu I, out of place, by linalg_inv_ex up to
// kLuMaxSide and by cholesky_solve of the identity above. Not linalg_solve, whose forward-mode
// AD is wrong under vmap with batched tangents (vmap of jacfwd), nor cholesky_inverse, whose
// forward-mode AD under vmap disagrees with reverse mode (torch 2.13).
at::Tensor dense_solve(const Schur& A, const at::Tensor& rhs, bool differentiable) {
  const auto matrix = A.dense();
  const int64_t M = rhs.size(-1);
  const auto ridge = at::diag_embed(
      (A.alpha * (static_cast<double>(M) * machine_eps(rhs.scalar_type()))).expand_as(rhs));
  std::function<at::Tensor(const at::Tensor&)> solve;
  if (differentiable) {
    const auto inv =
        M <= kLuMaxSide
            ? std::get<0>(at::linalg_inv_ex(matrix + ridge, /*check_errors=*/false))
            : at::cholesky_solve(at::eye(M, matrix.options()).expand_as(matrix),
                                 cholesky_factor(matrix, ridge), /*upper=*/false);
    solve = [inv](const at::Tensor& v) { return bmv(inv, v); };
  } else if (M <= kLuMaxSide) {
    const auto [lu, pivots, info] =
        at::linalg_lu_factor_ex(matrix + ridge, /*pivot=*/true, /*check_errors=*/false);
    solve = [lu = lu, pivots = pivots](const at::Tensor& v) {
      return at::linalg_lu_solve(lu, pivots, v.unsqueeze(-1)).squeeze(-1);
    };
  } else {
    const auto factor = cholesky_factor(matrix, ridge);
    solve = [factor](const at::Tensor& v) {
      return at::cholesky_solve(v.unsqueeze(-1), factor, /*upper=*/false).squeeze(-1);
    };
  }
  auto y = solve(rhs);
  for (int refine = 0; refine < 2; ++refine) y = y + solve(rhs - bmv(matrix, y));
  return y;
}

}  // namespace

void register_cg_solver(c10::DeviceType device, CgSolver solver) { cg_solver(device) = solver; }

BackwardResult sinkhorn_backward_implicit(const at::Tensor& grad_plan,
                                          const c10::optional<at::Tensor>& grad_f,
                                          const c10::optional<at::Tensor>& grad_g,
                                          const at::Tensor& plan, c10::string_view solver,
                                          double cg_tol, int64_t cg_max_iter, bool differentiable) {
  TORCH_CHECK_VALUE(plan.dim() >= 2, "sinkhorn_backward_implicit: expected plan (..., n, m), got ",
                    plan.sizes());
  TORCH_CHECK_VALUE(grad_plan.sizes() == plan.sizes(),
                    "sinkhorn_backward_implicit: expected grad_plan of shape ", plan.sizes(),
                    ", got ", grad_plan.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(plan.scalar_type()),
                   "sinkhorn_backward_implicit: expected a floating-point plan, got ",
                   plan.scalar_type());
  TORCH_CHECK_VALUE(grad_plan.device() == plan.device(),
                    "sinkhorn_backward_implicit: expected grad_plan on ", plan.device(), ", got ",
                    grad_plan.device());
  for (const auto& [name, grad, side] : {std::tuple{"grad_f", &grad_f, plan.size(-2)},
                                         std::tuple{"grad_g", &grad_g, plan.size(-1)}}) {
    if (!grad->has_value() || !(*grad)->defined()) continue;
    std::vector<int64_t> want(plan.sizes().begin(), plan.sizes().end() - 2);
    want.push_back(side);
    TORCH_CHECK_VALUE((*grad)->sizes() == at::IntArrayRef(want),
                      "sinkhorn_backward_implicit: expected ", name, " of shape ",
                      at::IntArrayRef(want), ", got ", (*grad)->sizes());
    TORCH_CHECK_VALUE((*grad)->device() == plan.device(), "sinkhorn_backward_implicit: expected ",
                      name, " on ", plan.device(), ", got ", (*grad)->device());
  }
  check_grad_options(solver, cg_tol, cg_max_iter);
  TORCH_CHECK_VALUE(solver != "unrolled",
                    "sinkhorn_backward_implicit: expected an implicit solver, got \"unrolled\"");
  const auto acc = accumulation_type(plan.scalar_type());
  const auto sizes = plan.sizes();
  const std::vector<int64_t> batch(sizes.begin(), sizes.end() - 2);
  const int64_t n = sizes[sizes.size() - 2], m = sizes[sizes.size() - 1];
  const int64_t B = c10::multiply_integers(batch);
  std::vector<int64_t> fs(batch), gs(batch);
  fs.push_back(n);
  gs.push_back(m);

  const auto P = plan.to(acc).reshape({B, n, m});
  const auto Gbar = grad_plan.to(acc).reshape({B, n, m});
  const auto Gamma = Gbar * P;
  const auto r = P.sum(-1), c = P.sum(-2);
  const auto wr = (r > 0).to(acc), wc = (c > 0).to(acc);
  auto rx = Gamma.sum(-1), ry = Gamma.sum(-2);
  if (grad_f.has_value() && grad_f->defined()) rx = rx + grad_f->to(acc).reshape({B, n});
  if (grad_g.has_value() && grad_g->defined()) ry = ry + grad_g->to(acc).reshape({B, m});
  // Project the right-hand side onto the balanced pairs; the rows and columns without mass
  // carry no plan and get no adjoint. Gamma's sums are balanced on every component of the
  // support by themselves, dL/df and dL/dg need not be: then the components are found. The
  // differentiable solve finds them too: its explicit inverse needs a matrix without null
  // directions (with one rank-one term for a split support it lost about 1e-3 in float64).
  const bool potentials = (grad_f.has_value() && grad_f->defined()) ||
                          (grad_g.has_value() && grad_g->defined());
  const auto components = potentials || differentiable ? SupportComponents::of(P, wr, wc)
                                                       : SupportComponents(wr, wc);
  std::tie(rx, ry) = components.balance(rx, ry);

  // Solve on the smaller side: transpose so that the solved side M <= N.
  const bool flip = m > n;
  const auto Pn = flip ? P.transpose(1, 2) : P;
  const auto rN = flip ? c : r, cM = flip ? r : c;
  const auto rxN = flip ? ry : rx, ryM = flip ? rx : ry;
  const auto wM = flip ? wr : wc;
  const int64_t side = flip ? n : m;
  // Differentiable: the dense solve whatever the solver, whose derivative is exact. Autograd
  // through the CG iterations is not: at a zero right-hand side (a zero upstream gradient, as
  // in torch.autograd.functional.hvp) they stop before the first step, and their derivative
  // with respect to that right-hand side comes out 0 instead of the system's inverse.
  const bool dense = differentiable || solver == "implicit_dense" ||
                     (solver == "implicit" && side <= kDenseMaxSide);
  // The per-component rank-one mask (B, M, M) only for the dense matrix: the conjugate
  // gradients keep one term and never form M x M.
  Schur A{Pn, safe_div(at::ones_like(rN), rN), cM, wM,
          safe_div(cM.sum(-1, true), wM.sum(-1, true)),
          dense ? components.same_component(flip, acc) : at::Tensor()};
  const auto rhs = ryM - bmv(Pn.transpose(1, 2), rxN * A.rinv);
  at::Tensor yM;
  if (B == 0 || side == 0) {
    yM = at::zeros_like(rhs);
  } else if (dense) {
    yM = dense_solve(A, rhs, differentiable);
  } else {
    // The iterations on A + eps alpha I: where A is singular to working precision, p^T A p
    // can round to zero or below and a step blow up (float32 with a cg_tol it cannot reach
    // gave gradients of 18 for 0.25); this ridge kept every step finite in the cases tried and
    // moves the solution by about eps relative to the smallest eigenvalue that matters.
    Schur ridged = A;
    ridged.c = A.c + A.alpha * machine_eps(rhs.scalar_type());
    yM = conjugate_gradients(ridged, rhs, cg_tol, cg_max_iter, flip);
  }
  const auto xN = (rxN - bmv(Pn, yM)) * A.rinv;
  // The solution in the min-norm gauge (the pseudo-inverse's): dL/da and dL/db are defined up
  // to (t, -t) on each component (MATH.md section 2.2), and in this gauge they are the exact
  // transpose of forward mode's (sinkhorn_autograd.cpp), for every change of the marginals,
  // balanced or not.
  const auto [x, y] = components.balance(flip ? yM : xN, flip ? xN : yM);
  const auto dS = P * (Gbar - x.unsqueeze(-1) - y.unsqueeze(-2));
  return {dS.to(plan.scalar_type()).contiguous().view(sizes), x.contiguous().view(fs),
          y.contiguous().view(gs)};
}

}  // namespace detail
}  // namespace sinkhorn_ops
