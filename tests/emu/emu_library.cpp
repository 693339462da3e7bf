// The operator library of the emulated CUDA build (tests/emu): sinkhorn_ops' schemas under the
// namespace sinkhorn_emu. csrc/cuda/sinkhorn_cuda.cpp, rewritten by build.py, registers the CUDA
// glue and kernels for them, on the CPU dispatch key.
#include "ops/schema.h"

TORCH_LIBRARY(sinkhorn_emu, m) { sinkhorn_ops::detail::define_ops(m); }
