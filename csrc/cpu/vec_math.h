// Loops of the CPU kernels written so that the compiler vectorises them: a branch-free float
// exp and lane-array reductions (a plain float reduction loop does not vectorise without
// -ffast-math, which we cannot use because -inf marks masked entries).
#pragma once

#include "isa_prelude.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

// Explicit SIMD vectors (GCC vector extensions) for the loops whose lanes are independent
// problems or entries. Their width is the ISA's register width (SK_VEC_BYTES, set by the
// forward_*.cpp that includes this file): wider generic vectors are split badly by the compiler.
#ifndef SK_VEC_BYTES
#define SK_VEC_BYTES 16
#endif
typedef float VecF __attribute__((vector_size(SK_VEC_BYTES)));
typedef double VecD __attribute__((vector_size(SK_VEC_BYTES)));
typedef int32_t VecI __attribute__((vector_size(SK_VEC_BYTES)));

// A scalar or a vector with every lane set to c.
template <typename V>
struct ElemOf {
  using type = float;  // float and VecF
};
template <>
struct ElemOf<VecD> {
  using type = double;
};
template <>
struct ElemOf<double> {
  using type = double;
};
template <typename V, typename E>
inline V splat(E c) {
  return V{} + static_cast<typename ElemOf<V>::type>(c);
}

// Conversions that read the same for a float and for a vector of floats.
inline int32_t round_to_int(float x) { return static_cast<int32_t>(x); }
inline VecI round_to_int(VecF x) { return __builtin_convertvector(x, VecI); }
inline float to_float(int32_t x) { return static_cast<float>(x); }
inline VecF to_float(VecI x) { return __builtin_convertvector(x, VecF); }
inline float bits_as_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline VecF bits_as_float(VecI b) { return (VecF)b; }
inline int32_t float_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}
inline VecI float_bits(VecF f) { return (VecI)f; }

// exp(x), lane by lane, in a form the vectoriser accepts: x = k ln2 + r with |r| <= ln2/2
// (Cody-Waite split of ln2), exp(r) by its degree-7 Taylor polynomial (truncation < 1e-8
// relative), 2^k built in the exponent bits. Below -87.3 (under FLT_MIN, -inf included) it
// returns 0; inputs are clamped at 88 above, where float exp would overflow anyway. NaN
// propagates (comparisons with NaN are false).
template <typename F>
inline F exp_lanes(F x) {
  F xc = x < -87.3f ? splat<F>(-87.3f) : x;
  xc = xc > 88.0f ? splat<F>(88.0f) : xc;
  const F kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const F r = (xc - kf * 0.693145751953125f) - kf * 1.42860682030941723e-6f;
  F p = splat<F>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return x < -87.3f ? splat<F>(0.0f) : p * bits_as_float((round_to_int(kf) + 127) << 23);
}

// log(x), lane by lane, for finite x >= FLT_MIN (the kernels pass sums of exponentials that
// include exp(0) = 1, or ratios of positive masses): x = 2^e * u with u in [sqrt(1/2), sqrt(2)),
// log u = 2 atanh(t), t = (u - 1) / (u + 1), |t| < 0.172, by its odd series to t^11
// (truncation < 1e-9 relative). NaN propagates.
template <typename F>
inline F log_lanes(F x) {
  const auto bits = float_bits(x);
  auto e = ((bits >> 23) & 0xff) - 127;
  F u = bits_as_float((bits & 0x007fffff) | 0x3f800000);  // u in [1, 2)
  const auto big = u > 1.41421356f;
  u = big ? u * 0.5f : u;
  e = big ? e + 1 : e;
  const F t = (u - 1.0f) / (u + 1.0f);
  const F t2 = t * t;
  F p = splat<F>(1.0f / 11.0f);
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  const F r = to_float(e) * 0.693147180559945309f + 2.0f * t * p;
  return x != x ? x : r;
}

inline float exp_vec(float x) { return exp_lanes(x); }
inline VecF exp_vec(VecF x) { return exp_lanes(x); }
inline float log_vec(float x) { return log_lanes(x); }
inline VecF log_vec(VecF x) { return log_lanes(x); }
inline double exp_vec(double x) { return std::exp(x); }
inline double log_vec(double x) { return std::log(x); }

inline VecD exp_vec(VecD x) {
  for (int l = 0; l < SK_VEC_BYTES / 8; ++l) x[l] = std::exp(x[l]);
  return x;
}

inline VecD log_vec(VecD x) {
  for (int l = 0; l < SK_VEC_BYTES / 8; ++l) x[l] = std::log(x[l]);
  return x;
}

// Whether any lane of a vector comparison's mask is set. Callers OR the masks of a whole
// step together and ask once: a horizontal test per row would cost as much as the row's math.
// The mask is OR-ed as 64-bit words (a lane-by-lane test compiles to a chain of extracts).
template <typename M>
inline bool any_lane(M mask) {
  static_assert(sizeof(M) % sizeof(uint64_t) == 0, "any_lane: mask of whole 64-bit words");
  uint64_t words[sizeof(M) / sizeof(uint64_t)];
  std::memcpy(words, &mask, sizeof(M));
  uint64_t any = 0;
  for (uint64_t w : words) any |= w;
  return any != 0;
}

// inv[a] = 1 / d[a] for a < K float vectors, to within about an ulp. In the AVX-512 build, where
// every lane of every divisor lies in [2^-126, 2^126) (one test for all K), rcp14 refined by two
// Newton steps instead of a division, whose throughput is several cycles (the mHC forward's
// normalisations wait on theirs). Nearly always the rounded reciprocal, but not bit for bit: the
// mHC backward, whose walk back multiplies by the divisors its replay divided by, measured up to
// 1.8x the fp32 error with it, so only the forward without a history takes it. Any lane out of
// range (zero, subnormal, huge, inf or NaN) sends all K to the division. Other builds divide.
template <int K>
inline void reciprocals_vec(const VecF* d, VecF* inv) {
#if SK_VEC_BYTES == 64
  auto in_range = (d[0] >= 0x1p-126f) & (d[0] < 0x1p126f);
  for (int a = 1; a < K; ++a) in_range &= (d[a] >= 0x1p-126f) & (d[a] < 0x1p126f);
  if (!any_lane(~in_range)) {
    for (int a = 0; a < K; ++a) {
      // Fused multiply-adds spelled out rather than left to the compiler's contraction: a Newton
      // step whose residual 1 - d r is rounded after the product stalls near 1 ulp.
      const __m512 dv = (__m512)d[a], one = _mm512_set1_ps(1.0f);
      __m512 r = _mm512_maskz_rcp14_ps(0xFFFF, dv);  // maskz: no GCC 12 warning
      r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(dv, r, one), r);
      inv[a] = (VecF)_mm512_fmadd_ps(r, _mm512_fnmadd_ps(dv, r, one), r);
    }
    return;
  }
#endif
  for (int a = 0; a < K; ++a) inv[a] = 1.0f / d[a];
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

// L lanes of a storage type widened to its accumulation vector, and narrowed back, with the
// values of c10's scalar conversions: a bf16 is the top half of a float, and both narrowings
// round to nearest even. A NaN stays a NaN: bf16 NaNs narrow to c10's 0x7FC0, while the F16C
// instructions keep a NaN's top payload bits where c10 writes sign | 0x7E00 (the only bits that
// differ). bf16 in integer vector operations; fp16 by F16C where the build has it (SK_F16C),
// else lane by lane, as float and double are plain loads and stores.
typedef uint16_t VecU16 __attribute__((vector_size(SK_VEC_BYTES / 2)));
typedef uint32_t VecU32 __attribute__((vector_size(SK_VEC_BYTES)));

template <typename acc_t, typename scalar_t>
inline VecOf<acc_t> load_widened(const scalar_t* src) {
  using V = VecOf<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return loadu(src);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<V, VecF>) {
    VecU16 raw;
    std::memcpy(&raw, src, sizeof(raw));
    return (VecF)(__builtin_convertvector(raw, VecU32) << 16);
#if defined(SK_F16C) && SK_VEC_BYTES == 32
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<V, VecF>) {
    return (VecF)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
#elif defined(SK_F16C) && SK_VEC_BYTES == 64
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<V, VecF>) {
    // The maskz forms: the plain ones start from an undefined register, which GCC 12 warns of.
    return (VecF)_mm512_maskz_cvtph_ps(0xFFFF,
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#endif
  } else {
    V w;
    for (int64_t l = 0; l < kVecLanes<acc_t>; ++l) w[l] = static_cast<acc_t>(src[l]);
    return w;
  }
}

template <typename scalar_t, typename V>
inline void store_narrowed(scalar_t* dst, V w) {
  if constexpr (std::is_same_v<scalar_t, typename ElemOf<V>::type>) {
    storeu(dst, w);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<V, VecF>) {
    const VecU32 u = (VecU32)w;
    const VecU32 rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    const VecU32 bits = w != w ? VecU32{} + 0x7FC0u : rounded;
    const VecU16 out = __builtin_convertvector(bits, VecU16);
    std::memcpy(dst, &out, sizeof(out));
#if defined(SK_F16C) && SK_VEC_BYTES == 32
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<V, VecF>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                     _mm256_cvtps_ph((__m256)w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(SK_F16C) && SK_VEC_BYTES == 64
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<V, VecF>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_maskz_cvtps_ph(0xFFFF, (__m512)w,
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  } else {
    constexpr int64_t L = sizeof(V) / sizeof(w[0]);
    for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<scalar_t>(w[l]);
  }
}

// dst[j] = src[j] converted, for j < len: whole vectors by load_widened / store_narrowed, the
// tail lane by lane (the same values).
template <typename acc_t, typename scalar_t>
inline void widen(const scalar_t* src, acc_t* dst, int64_t len) {
  constexpr int64_t L = kVecLanes<acc_t>;
  int64_t j = 0;
  for (; j + L <= len; j += L) storeu(dst + j, load_widened<acc_t>(src + j));
  for (; j < len; ++j) dst[j] = static_cast<acc_t>(src[j]);
}
template <typename scalar_t, typename acc_t>
inline void narrow(const acc_t* src, scalar_t* dst, int64_t len) {
  constexpr int64_t L = kVecLanes<acc_t>;
  int64_t j = 0;
  for (; j + L <= len; j += L) store_narrowed(dst + j, loadu(src + j));
  for (; j < len; ++j) dst[j] = static_cast<scalar_t>(src[j]);
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
