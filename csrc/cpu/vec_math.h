// Loops of the CPU kernels written so that the compiler vectorises them: a branch-free float
// exp and lane-array reductions (a plain float reduction loop does not vectorise without
// -ffast-math, which we cannot use because -inf marks masked entries).
#pragma once

#include "isa_prelude.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

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

// log(x) for float in vectorisable form, for finite x >= FLT_MIN (the kernels pass sums of
// exponentials that include exp(0) = 1): x = 2^e * u with u in [sqrt(1/2), sqrt(2)),
// log u = 2 atanh(t), t = (u - 1) / (u + 1), |t| < 0.172, by its odd series to t^11
// (truncation < 1e-9 relative). NaN propagates.
inline float log_vec(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t ubits = (bits & 0x007fffff) | 0x3f800000;  // u in [1, 2)
  float u;
  std::memcpy(&u, &ubits, sizeof(u));
  const bool big = u > 1.41421356f;
  u = big ? 0.5f * u : u;
  e = big ? e + 1 : e;
  const float t = (u - 1.0f) / (u + 1.0f);
  const float t2 = t * t;
  float p = 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  const float r = static_cast<float>(e) * 0.693147180559945309f + 2.0f * t * p;
  return x != x ? x : r;
}

inline double log_vec(double x) {
  return std::log(x);
}

// Explicit SIMD vectors (GCC vector extensions, lowered to whatever the ISA of the translation
// unit offers) for the tiny-problem path, where the lanes are independent problems.
// Their width is the ISA's register width (SK_VEC_BYTES, set by the forward_*.cpp that includes
// this file): wider generic vectors are split badly by the compiler.
#ifndef SK_VEC_BYTES
#define SK_VEC_BYTES 16
#endif
typedef float VecF __attribute__((vector_size(SK_VEC_BYTES)));
typedef double VecD __attribute__((vector_size(SK_VEC_BYTES)));
typedef int32_t VecI __attribute__((vector_size(SK_VEC_BYTES)));

template <typename V>
inline V splat(typename std::remove_reference<decltype(V{}[0])>::type c) {
  return V{} + c;
}

// exp_vec and log_vec above, lane by lane in one vector.
inline VecF exp_vec(VecF x) {
  VecF xc = x < -87.3f ? splat<VecF>(-87.3f) : x;
  xc = xc > 88.0f ? splat<VecF>(88.0f) : xc;
  const VecF kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const VecF r = (xc - kf * 0.693145751953125f) - kf * 1.42860682030941723e-6f;
  VecF p = splat<VecF>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VecI bits = (__builtin_convertvector(kf, VecI) + 127) << 23;
  return x < -87.3f ? splat<VecF>(0.0f) : p * (VecF)bits;
}

inline VecF log_vec(VecF x) {
  const VecI bits = (VecI)x;
  VecI e = ((bits >> 23) & 0xff) - 127;
  const VecI ubits = (bits & 0x007fffff) | 0x3f800000;
  VecF u = (VecF)ubits;
  const auto big = u > 1.41421356f;
  u = big ? u * 0.5f : u;
  e = big ? e + 1 : e;
  const VecF t = (u - 1.0f) / (u + 1.0f);
  const VecF t2 = t * t;
  VecF p = splat<VecF>(1.0f / 11.0f);
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  const VecF r = __builtin_convertvector(e, VecF) * 0.693147180559945309f + 2.0f * t * p;
  return x != x ? x : r;
}

inline VecD exp_vec(VecD x) {
  for (int l = 0; l < SK_VEC_BYTES / 8; ++l) x[l] = std::exp(x[l]);
  return x;
}

inline VecD log_vec(VecD x) {
  for (int l = 0; l < SK_VEC_BYTES / 8; ++l) x[l] = std::log(x[l]);
  return x;
}

// The SIMD vector of an accumulation type, its lane count, unaligned loads and stores.
template <typename T>
using VecOf = std::conditional_t<std::is_same_v<T, double>, VecD, VecF>;
template <typename T>
constexpr int64_t kVecLanes = sizeof(VecOf<T>) / sizeof(T);

template <typename T>
inline VecOf<T> loadu(const T* p) {
  VecOf<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void storeu(T* p, VecOf<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// max over j of x_j = s_j + pot_j, NaN-sticky so that a NaN score poisons its own row.
template <typename T>
T max_plus(const T* s, const T* pot, int64_t len) {
  using V = VecOf<T>;
  constexpr int64_t L = kVecLanes<T>;
  V vm = splat<V>(sinkhorn::math::neg_inf<T>());
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    const V v = loadu(s + j) + loadu(pot + j);
    vm = (v > vm || v != v) ? v : vm;
  }
  T mx = sinkhorn::math::neg_inf<T>();
  for (; j < len; ++j) {
    const T v = s[j] + pot[j];
    mx = (v > mx || v != v) ? v : mx;
  }
  for (int64_t l = 0; l < L; ++l) mx = (vm[l] > mx || vm[l] != vm[l]) ? vm[l] : mx;
  return mx;
}

// sum over j of exp(s_j + pot_j - shift); -inf terms (masked) add 0 even when shift is -inf.
template <typename T>
T sum_exp_plus(const T* s, const T* pot, T shift, int64_t len) {
  using V = VecOf<T>;
  constexpr int64_t L = kVecLanes<T>;
  const V ninf = splat<V>(sinkhorn::math::neg_inf<T>()), zero = splat<V>(0);
  V acc = zero;
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    const V v = loadu(s + j) + loadu(pot + j);
    acc += v == ninf ? zero : exp_vec(v - shift);
  }
  T sum = 0;
  for (; j < len; ++j) {
    const T v = s[j] + pot[j];
    const T e = exp_vec(v - shift);
    sum += (v == sinkhorn::math::neg_inf<T>()) ? T(0) : e;
  }
  for (int64_t l = 0; l < L; ++l) sum += acc[l];
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
  using V = VecOf<T>;
  constexpr int64_t L = kVecLanes<T>;
  V acc = splat<V>(0);
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    const V e = exp_vec(loadu(s + j) + f + loadu(pot + j));
    storeu(out + j, e);
    acc += e;
  }
  T sum = 0;
  for (; j < len; ++j) {
    out[j] = exp_vec(s[j] + f + pot[j]);
    sum += out[j];
  }
  for (int64_t l = 0; l < L; ++l) sum += acc[l];
  return sum;
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
