// Loops of the CPU kernels written so that the compiler vectorises them: a branch-free float
// exp and lane-array reductions (a plain float reduction loop does not vectorise without
// -ffast-math, which we cannot use because -inf marks masked entries).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../sinkhorn_math.h"

namespace sinkhorn_ops {
namespace cpu {

// exp(x) for float in a form the vectoriser accepts: x = k ln2 + r with |r| <= ln2/2 (Cody-Waite
// split of ln2), exp(r) by its degree-7 Taylor polynomial (truncation < 1e-8 relative), 2^k built
// in the exponent bits. Below -87.3 (under FLT_MIN, -inf included) it returns 0; inputs are
// clamped at 88 above, where float exp would overflow anyway. NaN propagates.
inline float exp_vec(float x) {
  float xc = x < -87.3f ? -87.3f : x;  // comparisons with NaN are false: NaN stays NaN
  xc = xc > 88.0f ? 88.0f : xc;
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - kf * 0.693145751953125f) - kf * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

inline double exp_vec(double x) {
  return std::exp(x);
}

// Number of independent accumulators in a reduction: wide enough for AVX-512 floats.
constexpr int64_t kLanes = 16;

// max over j of x_j = s_j + pot_j, NaN-sticky so that a NaN score poisons its own row.
template <typename T>
T max_plus(const T* s, const T* pot, int64_t len) {
  T lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = sinkhorn::math::neg_inf<T>();
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const T v = s[j + l] + pot[j + l];
      lanes[l] = (v > lanes[l] || v != v) ? v : lanes[l];
    }
  T mx = sinkhorn::math::neg_inf<T>();
  for (; j < len; ++j) {
    const T v = s[j] + pot[j];
    mx = (v > mx || v != v) ? v : mx;
  }
  for (int64_t l = 0; l < kLanes; ++l) mx = (lanes[l] > mx || lanes[l] != lanes[l]) ? lanes[l] : mx;
  return mx;
}

// sum over j of exp(s_j + pot_j - shift); -inf terms (masked) add 0 even when shift is -inf.
template <typename T>
T sum_exp_plus(const T* s, const T* pot, T shift, int64_t len) {
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const T v = s[j + l] + pot[j + l];
      const T e = exp_vec(v - shift);  // computed unconditionally: a select, not a branch
      lanes[l] += (v == sinkhorn::math::neg_inf<T>()) ? T(0) : e;
    }
  T sum = 0;
  for (; j < len; ++j) {
    const T v = s[j] + pot[j];
    sum += (v == sinkhorn::math::neg_inf<T>()) ? T(0) : exp_vec(v - shift);
  }
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// LSE_j (s_j + pot_j), two passes over a row that sits in L1.
template <typename T>
T lse_plus(const T* s, const T* pot, int64_t len) {
  const T mx = max_plus(s, pot, len);
  if (!(mx > sinkhorn::math::neg_inf<T>()) || mx == static_cast<T>(INFINITY)) {
    // Empty row (-inf), NaN, or a +inf score (exp(inf - inf) would be NaN: say so explicitly).
    return mx == static_cast<T>(INFINITY) ? static_cast<T>(NAN) : mx;
  }
  return mx + std::log(sum_exp_plus(s, pot, mx, len));
}

// Writes out_j = exp(s_j + f + pot_j) and returns their sum.
template <typename T>
T exp_row(const T* s, T f, const T* pot, T* out, int64_t len) {
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const T e = exp_vec(s[j + l] + f + pot[j + l]);
      out[j + l] = e;
      lanes[l] += e;
    }
  T sum = 0;
  for (; j < len; ++j) {
    out[j] = exp_vec(s[j] + f + pot[j]);
    sum += out[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

}  // namespace cpu
}  // namespace sinkhorn_ops
