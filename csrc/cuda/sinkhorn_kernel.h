// Entry points of the CUDA kernels: the forward (sinkhorn_kernel.cu, tiny_forward.cu,
// large_forward.cu), the unrolled backward (sinkhorn_backward.cu, tiny_backward.cu), the V4 mHC
// Sinkhorn (mhc_v4.cu) and the mHC stream mixings (mhc_mix.cu). Plain params only, no ATen, so
// the kernel files compile standalone with nvcc and the ATen glue stays in sinkhorn_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "../sinkhorn_params.h"

namespace sinkhorn {

// Bytes of device scratch that launch_forward(p) expects in p.workspace (may be 0).
size_t forward_workspace_bytes(const FwdParams& p);

// Enqueues the forward of all p.B problems on `stream`. Never synchronises; launch errors are
// left for the caller to collect (cudaGetLastError). Does nothing when p.B == 0.
void launch_forward(const FwdParams& p, cudaStream_t stream);

// Bytes of device scratch that launch_backward(p) expects in p.workspace (may be 0). It grows as
// B * max_steps * max(n, m): the LSE of every replayed step (MATH.md section 2.1).
size_t backward_workspace_bytes(const BwdParams& p);

// Enqueues the unrolled backward (MATH.md section 2.1) of all p.B problems on `stream`: fills
// grad_scores, grad_log_a and grad_log_b. Never synchronises; launch errors are left for the
// caller to collect. Does nothing when p.B == 0.
void launch_backward(const BwdParams& p, cudaStream_t stream);

// The tiny path of the forward (tiny_forward.cu): n, m <= 8, a thread per problem in registers.
// Whether p takes it (launch_forward decides with it; SINKHORN_CUDA_FORWARD=block or =large turns
// the path off, for tests and benchmarks of the other paths), and its launch (no workspace).
bool tiny_forward_applies(const FwdParams& p);
void launch_tiny_forward(const FwdParams& p, cudaStream_t stream);

// The large-problem path of the forward (large_forward.cu): n * m >= 2^20, every step spread
// over the whole GPU by a few kernels per step. SINKHORN_CUDA_FORWARD=block turns it off,
// SINKHORN_CUDA_FORWARD=large forces it at any size (for tests and benchmarks).
bool large_forward_applies(const FwdParams& p);
size_t large_forward_workspace_bytes(const FwdParams& p);
void launch_large_forward(const FwdParams& p, cudaStream_t stream);

// One reverse step of the composite unrolled backward (large_backward.cu): a thread per column
// over a strip of rows (row step, the strips' column sums then merged) or a warp per row
// (column step), about one read of S and one read and write of dS. Whether a call fits the grid
// (B and the row strips at most 65535), its workspace, and its launch.
bool reverse_step_fits(const ReverseStepParams& p);
size_t reverse_step_workspace_bytes(const ReverseStepParams& p);
void launch_reverse_step(const ReverseStepParams& p, cudaStream_t stream);

// The implicit backward's conjugate gradients in one cooperative kernel (implicit_cg.cu), which
// ends on the device once every problem has converged: its workspace, and its launch, false
// when it did not launch (no cooperative launch on the device, or a failed one outside a graph
// capture; the caller then runs the ATen loop). Never synchronises.
size_t cg_workspace_bytes(const CgParams& p);
bool launch_cg(const CgParams& p, cudaStream_t stream);

// The tiny path of the unrolled backward (tiny_backward.cu): n, m <= 8 (4 in float64) and
// max_steps <= 64, a thread per problem. SINKHORN_CUDA_BACKWARD=block (or =composite, which
// forces the composite backward at any size) turns it off. No workspace.
bool tiny_backward_applies(const BwdParams& p);
void launch_tiny_backward(const BwdParams& p, cudaStream_t stream);

// Enqueues the DeepSeek-V4 mHC Sinkhorn (mhc_v4.cu): the forward when p.grad is null, else the
// backward. p.n <= v4::kMaxN and p.iters <= v4::kMaxIters (checked at the front door). Never
// synchronises. Does nothing when p.B == 0.
void launch_mhc_v4(const V4Params& p, cudaStream_t stream);

// Enqueues an mHC stream mixing (mhc_mix.cu), forward or backward as p says. p.n <= 8 (checked
// at the front door). Never synchronises. Does nothing when p.T == 0.
void launch_mhc_mix(const MixParams& p, cudaStream_t stream);

// Enqueues mHC's per-token mappings (mhc_mappings.cu), forward or backward as p.backward says.
// p.n <= v4::kMaxN and p.iters <= v4::kMaxIters (checked at the front door). Never synchronises.
// Does nothing when p.T == 0.
void launch_mhc_mappings(const MappingsParams& p, cudaStream_t stream);

}  // namespace sinkhorn
