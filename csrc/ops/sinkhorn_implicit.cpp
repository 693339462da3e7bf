// The implicit-function-theorem backward of the Sinkhorn operator (MATH.md section 2.2), in
// ATen ops, so one implementation serves every device (CompositeExplicitAutograd). Its memory
// does not depend on the number of forward steps: it needs only the plan.
//
// With r = P 1, c = P^T 1 and Gamma = Gbar * P, it solves
//   [diag(r) P; P^T diag(c)] [x; y] = [Gamma 1 + dL/df; Gamma^T 1 + dL/dg]
// through the Schur complement on the smaller side, then dS = P * (Gbar - x (+) y), da = x,
// db = y. The null space (1, -1) is handled by projecting the right-hand side and by adding
// alpha w w^T (w = the columns with mass) to the Schur matrix, which keeps its solution exact
// (the right-hand side is orthogonal to w) and makes it positive definite.
#include <ATen/ATen.h>

#include <cmath>

#include "sinkhorn_backward.h"

namespace sinkhorn_ops {
namespace detail {
namespace {

// Min side above which "implicit" switches from the dense solve to conjugate gradients.
constexpr int64_t kDenseMaxSide = 256;

at::Tensor bmv(const at::Tensor& A, const at::Tensor& v) {  // (B, p, q) x (B, q) -> (B, p)
  return at::bmm(A, v.unsqueeze(-1)).squeeze(-1);
}

at::Tensor bdot(const at::Tensor& u, const at::Tensor& v) {  // per problem, kept as (B, 1)
  return (u * v).sum(-1, /*keepdim=*/true);
}

// num / den, 0 where den is 0 (and a derivative that is 0 there, not NaN).
at::Tensor safe_div(const at::Tensor& num, const at::Tensor& den) {
  const auto zero = den == 0;
  return (num / den.masked_fill(zero, 1)).masked_fill(zero, 0);
}

struct Schur {
  at::Tensor P, rinv, c, w, alpha;  // P (B, N, M) with M the solved side

  // (diag(c) - P^T diag(1/r) P + diag(1 - w) + alpha w w^T) y, matrix-free: two passes over P.
  at::Tensor apply(const at::Tensor& y) const {
    const auto Pt = P.transpose(1, 2);
    return c * y - bmv(Pt, rinv * bmv(P, y)) + (1 - w) * y + alpha * w * bdot(w, y);
  }

  at::Tensor dense() const {
    const auto Pt = P.transpose(1, 2);
    return at::diag_embed(c + (1 - w)) - at::bmm(Pt * rinv.unsqueeze(1), P) +
           alpha.unsqueeze(-1) * w.unsqueeze(-1) * w.unsqueeze(-2);
  }

  at::Tensor diagonal() const {
    return c - (P * P * rinv.unsqueeze(-1)).sum(1) + (1 - w) + alpha * w * w;
  }
};

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
  // Project the right-hand side orthogonally to the null space (1, -1) of the rows and columns
  // with mass; the others carry no plan and get no adjoint.
  rx = rx * wr;
  ry = ry * wc;
  const auto delta = safe_div(rx.sum(-1, true) - ry.sum(-1, true),
                              wr.sum(-1, true) + wc.sum(-1, true));
  rx = rx - delta * wr;
  ry = ry + delta * wc;

  // Solve on the smaller side: transpose so that the solved side M <= N.
  const bool flip = m > n;
  const auto Pn = flip ? P.transpose(1, 2) : P;
  const auto rN = flip ? c : r, cM = flip ? r : c;
  const auto rxN = flip ? ry : rx, ryM = flip ? rx : ry;
  const auto wM = flip ? wr : wc;
  const int64_t side = flip ? n : m;
  Schur A{Pn, safe_div(at::ones_like(rN), rN), cM, wM,
          safe_div(cM.sum(-1, true), wM.sum(-1, true))};
  const auto rhs = ryM - bmv(Pn.transpose(1, 2), rxN * A.rinv);
  // Differentiable: the dense solve whatever the solver, whose derivative is exact. Autograd
  // through the CG iterations is not: at a zero right-hand side (a zero upstream gradient, as
  // in torch.autograd.functional.hvp) they stop before the first step, and their derivative
  // with respect to that right-hand side comes out 0 instead of the system's inverse.
  const bool dense = differentiable || solver == "implicit_dense" ||
                     (solver == "implicit" && side <= kDenseMaxSide);
  at::Tensor yM;
  if (B == 0 || side == 0) {
    yM = at::zeros_like(rhs);
  } else if (differentiable) {
    // Through the inverse: the forward-mode AD of linalg_solve is wrong under vmap with
    // batched tangents (vmap of jacfwd, so vmap of torch.func.hessian; torch 2.13), inv's is
    // not. The matrix is positive definite for a connected support (the rank-one term fixes its
    // null space); this is the second order's solve, dense whatever the side.
    yM = bmv(std::get<0>(at::linalg_inv_ex(A.dense(), /*check_errors=*/false)), rhs);
  } else if (dense) {
    yM = std::get<0>(at::linalg_solve_ex(A.dense(), rhs, /*left=*/true, /*check_errors=*/false));
  } else {
    yM = conjugate_gradients(A, rhs, cg_tol, cg_max_iter, flip);
  }
  const auto xN = (rxN - bmv(Pn, yM)) * A.rinv;
  // The solution orthogonal to the null space (1, -1) over the rows and columns with mass (the
  // pseudo-inverse's): dL/da and dL/db are defined up to (t, -t) (MATH.md section 2.2), and in
  // this gauge they are the exact transpose of forward mode's (sinkhorn_autograd.cpp), for
  // every change of the marginals, balanced or not.
  const auto shift = safe_div((flip ? yM : xN).sum(-1, true) - (flip ? xN : yM).sum(-1, true),
                              wr.sum(-1, true) + wc.sum(-1, true));
  const auto x = ((flip ? yM : xN) - shift) * wr, y = ((flip ? xN : yM) + shift) * wc;
  const auto dS = P * (Gbar - x.unsqueeze(-1) - y.unsqueeze(-2));
  return {dS.to(plan.scalar_type()).contiguous().view(sizes), x.contiguous().view(fs),
          y.contiguous().view(gs)};
}

}  // namespace detail
}  // namespace sinkhorn_ops
