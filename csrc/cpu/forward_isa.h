// The per-ISA builds of the CPU kernels (Sinkhorn forward and backward, mHC) and the choice
// between them at run time.
#pragma once

#include <ATen/ATen.h>

#include "../sinkhorn_params.h"

namespace sinkhorn_ops {
namespace cpu {

void forward_default(const sinkhorn::FwdParams& p, at::ScalarType dtype);
void forward_avx2(const sinkhorn::FwdParams& p, at::ScalarType dtype);
void forward_avx512(const sinkhorn::FwdParams& p, at::ScalarType dtype);
void backward_default(const sinkhorn::BwdParams& q, at::ScalarType dtype);
void backward_avx2(const sinkhorn::BwdParams& q, at::ScalarType dtype);
void backward_avx512(const sinkhorn::BwdParams& q, at::ScalarType dtype);
void mhc_v4_default(const sinkhorn::V4Params& p);
void mhc_v4_avx2(const sinkhorn::V4Params& p);
void mhc_v4_avx512(const sinkhorn::V4Params& p);
void mhc_mix_default(const sinkhorn::MixParams& p, at::ScalarType dtype);
void mhc_mix_avx2(const sinkhorn::MixParams& p, at::ScalarType dtype);
void mhc_mix_avx512(const sinkhorn::MixParams& p, at::ScalarType dtype);
void mhc_mappings_default(const sinkhorn::MappingsParams& p);
void mhc_mappings_avx2(const sinkhorn::MappingsParams& p);
void mhc_mappings_avx512(const sinkhorn::MappingsParams& p);

}  // namespace cpu
}  // namespace sinkhorn_ops
