// Plain arguments of the Sinkhorn kernels. No ATen here, so that CUDA kernel files compile on
// their own with nvcc (as FlashAttention's params struct does) and every CI run can build them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sinkhorn {

// Element type of the scores and the plan. The potentials and the error use the accumulation
// type: double for Float64, float otherwise.
enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Bytes of one value of a dtype's accumulation type (double for Float64, float for the others),
// in which the kernels' workspaces are counted.
inline size_t acc_bytes(DType d) { return d == DType::Float64 ? sizeof(double) : sizeof(float); }

// One batched forward call: B independent problems of size n x m, all contiguous.
struct FwdParams {
  const void* scores = nullptr;  // (B, n, m), dtype
  const void* log_a = nullptr;   // (B, n), accumulation type; nullptr: default marginals
  const void* log_b = nullptr;   // (B, m), accumulation type; nullptr: default marginals
  void* plan = nullptr;          // (B, n, m), dtype
  void* f = nullptr;             // (B, n), accumulation type
  void* g = nullptr;             // (B, m), accumulation type
  int64_t* steps_used = nullptr; // (B)
  void* error = nullptr;         // (B), accumulation type
  void* workspace = nullptr;     // device scratch a kernel may ask its launcher for (CUDA)
  // (steps, B, max(n, m)), accumulation type, or nullptr: the LSEs of every step (the unrolled
  // backward's replay on the CUDA large path, launch_large_replay); plan and error unused.
  void* history = nullptr;
  bool staged = false;           // CUDA block kernel: S copied to shared memory (its launcher sets it)
  int64_t B = 0, n = 0, m = 0;
  int64_t steps = 0;             // normalisations (half-iterations) to run at most
  bool start_row = true;         // first step normalises rows (true) or columns (false)
  double tol = 0.0;              // > 0: stop once the unfixed marginal's L1 error <= tol * sum(a)
  DType dtype = DType::Float32;
};

// One batched unrolled backward call (MATH.md section 2.1): every problem replays its forward
// for steps_used[b] steps, recording each step's LSE, then reverses the steps.
struct BwdParams {
  const void* scores = nullptr;      // (B, n, m), dtype; masked entries already -inf
  const void* log_a = nullptr;       // (B, n), accumulation type; nullptr: default marginals
  const void* log_b = nullptr;       // (B, m), accumulation type; nullptr: default marginals
  const void* grad_plan = nullptr;   // (B, n, m), dtype: dL/dP
  const void* grad_f = nullptr;      // (B, n), accumulation type, or nullptr: dL/df (final f)
  const void* grad_g = nullptr;      // (B, m), accumulation type, or nullptr: dL/dg (final g)
  const int64_t* steps_used = nullptr;  // (B): steps the forward ran (each <= max_steps)
  void* grad_scores = nullptr;       // (B, n, m), dtype: dL/dS
  void* grad_log_a = nullptr;        // (B, n), accumulation type: dL/d(log a)
  void* grad_log_b = nullptr;        // (B, m), accumulation type: dL/d(log b)
  void* workspace = nullptr;         // device scratch a kernel may ask its launcher for (CUDA)
  bool staged = false;               // CUDA block kernel: S copied to shared memory (its launcher sets it)
  int64_t B = 0, n = 0, m = 0;
  int64_t max_steps = 0;             // an upper bound of steps_used (the forward's `steps`)
  bool start_row = true;
  DType dtype = DType::Float32;
};

// One reverse step of the unrolled backward composed for large problems
// (ops/sinkhorn_backward_composite.cpp; its CUDA kernels in cuda/large_backward.cu), over B
// problems of n x m, in the accumulation type, with the step's bookkeeping. Row step:
// w_ij = u_i exp(S_ij + before_j - lse_i) (0 on an empty row, lse_i = -inf), dS -= w and
// target_j -= sum_i w_ij. Column step: w_ij = u_j exp(S_ij + before_i - lse_j), dS -= w and
// target_i -= sum_j w_ij.
struct ReverseStepParams {
  const void* S = nullptr;  // (B, n, m)
  void* dS = nullptr;       // (B, n, m), updated
  // The other axis' potential as the step read it, math::potential(other_log_marginal,
  // before_lse): (B, m) for a row step, (B, n) for a column step; before_lse == nullptr (step 0):
  // zero.
  const void* other_log_marginal = nullptr;  // contiguous
  const void* before_lse = nullptr;          // problem b's at before_lse + b * before_stride
  const void* lse = nullptr;  // the step's LSEs: (B, n) row step, (B, m) column step, lse_stride
  int64_t lse_stride = 0, before_stride = 0;
  const int64_t* steps_used = nullptr;  // (B): problem b ran step t iff steps_used[b] > t
  int64_t t = 0;
  // The step's upstream, (B, n) row step, (B, m) column step: read as 0 for the problems that did
  // not run step t; for the others added to grad_log_marginal where the step's LSE is finite and
  // then zeroed (the step overwrote that potential).
  void* u = nullptr;
  void* grad_log_marginal = nullptr;  // the step's axis, updated
  void* target = nullptr;     // the other axis' upstream, (B, m) row step, (B, n) column step, updated
  void* workspace = nullptr;  // the row step's partial sums (reverse_step_workspace_bytes)
  int64_t B = 0, n = 0, m = 0;
  bool row = true;
  DType dtype = DType::Float32;  // the accumulation type: Float32 or Float64
};

// The conjugate-gradient solve of the implicit backward (ops/sinkhorn_implicit.cpp, MATH.md
// section 2.2) on the device (cuda/implicit_cg.cu): for each of B problems, with Pn the plan P
// (n x m, contiguous) or its transpose (flip), N x M, M the solved side, solves
//   (diag(c) - Pn^T diag(rinv) Pn + diag(1 - w) + alpha w w^T) y = rhs
// by Jacobi-preconditioned CG (dinv) from y = 0, as the ATen loop does: at most `iters`
// iterations, a problem stops updating once |res|^2 <= tol^2 |rhs|^2, and the whole solve ends
// once every problem has. Accumulation type throughout; every array contiguous.
struct CgParams {
  const void* P = nullptr;  // (B, n, m)
  const void* rinv = nullptr;   // (B, N)
  const void* c = nullptr;      // (B, M)
  const void* w = nullptr;      // (B, M)
  const void* alpha = nullptr;  // (B)
  const void* dinv = nullptr;   // (B, M)
  const void* rhs = nullptr;    // (B, M)
  void* y = nullptr;            // (B, M), the solution
  void* workspace = nullptr;    // cg_workspace_bytes
  int64_t B = 0, n = 0, m = 0, iters = 0;
  bool flip = false;  // Pn = P^T: N = m, M = n
  double tol = 0.0;
  DType dtype = DType::Float32;  // Float32 or Float64
};

// One batched call of the DeepSeek-V4 mHC Sinkhorn (mhc_v4_math.h): B problems of n x n,
// contiguous, float32 or float64 throughout (the layer runs it in fp32).
struct V4Params {
  const void* logits = nullptr;  // (B, n, n)
  const void* grad = nullptr;    // (B, n, n) dL/dcomb; nullptr: the forward
  void* out = nullptr;           // (B, n, n) comb (forward) or dL/dlogits (backward)
  int64_t B = 0, n = 0;
  int iters = 0;                 // 1 <= iters <= v4::kMaxIters
  double eps = 0.0;
  // The mHC paper's Sinkhorn (column step first, eps = 0): this one on the transpose. Kernels
  // load and store each problem transposed and run a problem that the linear domain cannot take
  // (v4::Problem::needs_log_domain) in the log domain.
  bool paper = false;
  DType dtype = DType::Float32;  // Float32 or Float64
};

// One batched call of mHC's mappings (mhc_mappings_math.h) over T tokens: the forward writes
// H_pre, H_post, H_res from the normalised projections; the backward (grad_pre, grad_post or
// grad_res given; nullptr reads as zeros) writes dL/dproj and each token's partials row (dz and
// its gate sums, mappings::partials). All in
// dtype, contiguous.
struct MappingsParams {
  const void* proj = nullptr;                                      // (T, 2n + n^2)
  const void* alpha[3] = {nullptr, nullptr, nullptr};              // pre, post, res: 1 value each
  const void* bias[3] = {nullptr, nullptr, nullptr};               // pre (n), post (n), res (n, n)
  const void* grad_pre = nullptr, *grad_post = nullptr, *grad_res = nullptr;  // backward
  bool backward = false;
  void* pre = nullptr, *post = nullptr, *res = nullptr;            // forward: (T, n), (T, n), (T, n, n)
  void* grad_proj = nullptr;                                       // backward: (T, 2n + n^2)
  void* partials = nullptr;                                        // backward: (T, partials(n))
  // The RMSNorm folded in (mhc_coefficients) when norm is set: proj holds the raw projections
  // R = x phi, norm the per-token ||x|| over D inputs (T; inv_dim = 1 / D), and the kernels
  // normalise (mhc_mappings_math.h); the backward's grad_proj is then dL/dR and rms_coef (T) the
  // coefficient c of x in dL/dx = dL/dR phi^T - c x.
  const void* norm = nullptr;
  void* rms_coef = nullptr;
  double inv_dim = 0.0;
  double norm_eps = 0.0;
  int64_t T = 0, n = 0;
  int iters = 0;                                                   // 1 <= iters <= v4::kMaxIters
  // DeepSeek-V4's variant (H_pre + eps, H_res = comb^T with eps in every sum) when set, else
  // the paper's (V4Params::paper).
  bool v4 = false;
  double eps = 0.0;
  DType dtype = DType::Float32;                                    // Float32 or Float64
};

// One batched call of an mHC stream mixing (mhc_mix_math.h) over T tokens of n streams of width
// C, all contiguous. The streams, the branch output and their gradients are in dtype; the
// mappings and their gradients in the accumulation type.
struct MixParams {
  bool post = false;                // false: the pre mix (h = H_pre x); true: the post mix
  bool backward = false;            // false: the forward; true: the backward (grad given)
  const void* x = nullptr;          // (T, n, C)
  const void* y = nullptr;          // (T, C) the branch output (post)
  const void* h_pre = nullptr;      // (T, n) (pre)
  const void* h_post = nullptr;     // (T, n) (post)
  const void* h_res = nullptr;      // (T, n, n) (post)
  const void* grad = nullptr;       // dL/d(output): (T, C) pre, (T, n, C) post (backward)
  void* out = nullptr;              // forward: (T, C) pre, (T, n, C) post; backward: dL/dx
  void* grad_y = nullptr;           // (T, C) (post backward)
  void* grad_h_pre = nullptr;       // (T, n) (pre backward)
  void* grad_h_post = nullptr;      // (T, n) (post backward)
  void* grad_h_res = nullptr;       // (T, n, n) (post backward)
  int64_t T = 0, n = 0, C = 0;      // 1 <= n <= mix::kMaxStreams
  DType dtype = DType::Float32;
};

}  // namespace sinkhorn
