// GoogleTest suite of the mHC C++ API (sinkhorn_ops.h): the two Sinkhorns and the stream mixings
// against their formulas written in ATen here, and their backwards against ATen autograd, on CPU
// and, when one is present, on CUDA.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/variable.h>

#include <string>
#include <vector>

#include "sinkhorn_ops.h"
#include "test_util.h"

namespace {

using test_util::devices;
using test_util::v4_formula;

// Gradients of sum(out * w) with respect to inputs, by ATen autograd through fn.
template <typename Fn>
std::vector<at::Tensor> autograd_grads(Fn fn, std::vector<at::Tensor> inputs, const at::Tensor& w) {
  for (auto& t : inputs) t = t.detach().clone().set_requires_grad(true);
  const auto out = fn(inputs);
  return torch::autograd::grad({(out * w).sum()}, inputs);
}

TEST(MhcApi, V4SinkhornAndItsBackward) {
  at::manual_seed(0);
  for (auto dev : devices()) {
    const auto x = at::randn({5, 4, 4}, at::dtype(at::kDouble).device(dev)) * 2;
    const auto w = at::randn_like(x);
    EXPECT_TRUE(at::allclose(sinkhorn_ops::mhc_v4_sinkhorn(x), v4_formula(x, 20, 1e-6), 1e-12,
                             1e-14))
        << dev;
    const auto want = autograd_grads(
        [](const std::vector<at::Tensor>& in) { return v4_formula(in[0], 20, 1e-6); }, {x}, w);
    EXPECT_TRUE(at::allclose(sinkhorn_ops::mhc_v4_sinkhorn_backward(w, x), want[0], 1e-9, 1e-12))
        << dev;
    EXPECT_THROW(sinkhorn_ops::mhc_v4_sinkhorn(x, 0), c10::ValueError);
  }
}

// The paper's Sinkhorn in ATen, in the log domain: iters column then row LSE normalisations.
at::Tensor paper_formula(const at::Tensor& x, int64_t iters) {
  auto z = x;
  for (int64_t t = 0; t < iters; ++t) {
    z = z - z.logsumexp(-2, true);
    z = z - z.logsumexp(-1, true);
  }
  return z.exp();
}

TEST(MhcApi, PaperSinkhornAndItsBackward) {
  at::manual_seed(2);
  for (auto dev : devices()) {
    // Problem 0 spans more than the linear domain takes (the kernel's log-domain twin).
    auto x = at::randn({5, 4, 4}, at::dtype(at::kDouble).device(dev)) * 2;
    x.select(0, 0).mul_(40);
    const auto w = at::randn_like(x);
    EXPECT_TRUE(at::allclose(sinkhorn_ops::mhc_sinkhorn(x), paper_formula(x, 20), 1e-12, 1e-14))
        << dev;
    const auto want = autograd_grads(
        [](const std::vector<at::Tensor>& in) { return paper_formula(in[0], 20); }, {x}, w);
    EXPECT_TRUE(at::allclose(sinkhorn_ops::mhc_sinkhorn_backward(w, x), want[0], 1e-9, 1e-12))
        << dev;
    EXPECT_THROW(sinkhorn_ops::mhc_sinkhorn(x, 33), c10::ValueError);
  }
}

TEST(MhcApi, StreamMixingsAndTheirBackwards) {
  at::manual_seed(1);
  for (auto dev : devices()) {
    const auto opt = at::dtype(at::kDouble).device(dev);
    const auto x = at::randn({3, 4, 37}, opt), y = at::randn({3, 37}, opt);
    const auto hp = at::rand({3, 4}, opt), hq = at::rand({3, 4}, opt) * 2,
               hr = at::rand({3, 4, 4}, opt);
    auto pre = [](const std::vector<at::Tensor>& in) {
      return (in[1].unsqueeze(-1) * in[0]).sum(-2);
    };
    auto post = [](const std::vector<at::Tensor>& in) {
      return (in[3].unsqueeze(-1) * in[0].unsqueeze(-3)).sum(-2) +
             in[2].unsqueeze(-1) * in[1].unsqueeze(-2);
    };
    EXPECT_TRUE(at::allclose(sinkhorn_ops::mhc_pre_mix(x, hp), pre({x, hp}), 1e-12, 1e-13));
    EXPECT_TRUE(
        at::allclose(sinkhorn_ops::mhc_post_mix(x, y, hq, hr), post({x, y, hq, hr}), 1e-12, 1e-13));
    const auto wp = at::randn({3, 37}, opt), wq = at::randn({3, 4, 37}, opt);
    const auto gp = sinkhorn_ops::mhc_pre_mix_backward(wp, x, hp);
    const auto want_p = autograd_grads(pre, {x, hp}, wp);
    EXPECT_TRUE(at::allclose(gp.x, want_p[0], 1e-12, 1e-13)) << dev;
    EXPECT_TRUE(at::allclose(gp.h_pre, want_p[1], 1e-12, 1e-13)) << dev;
    const auto gq = sinkhorn_ops::mhc_post_mix_backward(wq, x, y, hq, hr);
    const auto want_q = autograd_grads(post, {x, y, hq, hr}, wq);
    EXPECT_TRUE(at::allclose(gq.x, want_q[0], 1e-12, 1e-13)) << dev;
    EXPECT_TRUE(at::allclose(gq.y, want_q[1], 1e-12, 1e-13)) << dev;
    EXPECT_TRUE(at::allclose(gq.h_post, want_q[2], 1e-12, 1e-13)) << dev;
    EXPECT_TRUE(at::allclose(gq.h_res, want_q[3], 1e-12, 1e-13)) << dev;
    EXPECT_THROW(sinkhorn_ops::mhc_pre_mix(x, hp.to(at::kFloat)), c10::TypeError);
  }
}

// The operators carry their autograd in C++ (csrc/ops/mhc_autograd.cpp): differentiating a call
// of the C++ API gives the backward operator's result, and differentiating that raises.
TEST(MhcApi, AutogradOfTheCppApi) {
  at::manual_seed(3);
  for (auto dev : devices()) {
    const auto opt = at::dtype(at::kDouble).device(dev);
    const auto logits = at::randn({5, 4, 4}, opt), w = at::randn({5, 4, 4}, opt);
    const auto paper = autograd_grads(
        [](const std::vector<at::Tensor>& in) { return sinkhorn_ops::mhc_sinkhorn(in[0], 7); },
        {logits}, w);
    EXPECT_TRUE(at::equal(paper[0], sinkhorn_ops::mhc_sinkhorn_backward(w, logits, 7))) << dev;
    const auto v4 = autograd_grads(
        [](const std::vector<at::Tensor>& in) {
          return sinkhorn_ops::mhc_v4_sinkhorn(in[0], 5, 1e-3);
        },
        {logits}, w);
    EXPECT_TRUE(at::equal(v4[0], sinkhorn_ops::mhc_v4_sinkhorn_backward(w, logits, 5, 1e-3)))
        << dev;
    const auto x = at::randn({3, 4, 9}, opt), y = at::randn({3, 9}, opt);
    const auto hp = at::rand({3, 4}, opt), hq = at::rand({3, 4}, opt), hr = at::rand({3, 4, 4}, opt);
    const auto wp = at::randn({3, 9}, opt), wq = at::randn({3, 4, 9}, opt);
    const auto pre = autograd_grads(
        [](const std::vector<at::Tensor>& in) { return sinkhorn_ops::mhc_pre_mix(in[0], in[1]); },
        {x, hp}, wp);
    const auto gp = sinkhorn_ops::mhc_pre_mix_backward(wp, x, hp);
    EXPECT_TRUE(at::equal(pre[0], gp.x) && at::equal(pre[1], gp.h_pre)) << dev;
    const auto post = autograd_grads(
        [](const std::vector<at::Tensor>& in) {
          return sinkhorn_ops::mhc_post_mix(in[0], in[1], in[2], in[3]);
        },
        {x, y, hq, hr}, wq);
    const auto gq = sinkhorn_ops::mhc_post_mix_backward(wq, x, y, hq, hr);
    EXPECT_TRUE(at::equal(post[0], gq.x) && at::equal(post[1], gq.y) &&
                at::equal(post[2], gq.h_post) && at::equal(post[3], gq.h_res))
        << dev;
    // Double backward: both Sinkhorns differentiate twice (a Hessian-vector product against
    // central differences of the gradient).
    const auto leaf = logits.clone().set_requires_grad(true);
    const auto V = at::randn_like(logits);
    const double h = 1e-5;
    const auto g = torch::autograd::grad({(sinkhorn_ops::mhc_sinkhorn(leaf, 7) * w).sum()},
                                         {leaf}, {}, /*retain_graph=*/true,
                                         /*create_graph=*/true)[0];
    EXPECT_TRUE(g.requires_grad()) << dev;
    const auto hv = torch::autograd::grad({(g * V).sum()}, {leaf})[0];
    const auto fd = (sinkhorn_ops::mhc_sinkhorn_backward(w, logits + h * V, 7) -
                     sinkhorn_ops::mhc_sinkhorn_backward(w, logits - h * V, 7)) /
                    (2 * h);
    EXPECT_TRUE(hv.abs().max().item<double>() > 1e-3) << dev;
    EXPECT_TRUE(at::allclose(hv, fd, 1e-5, 1e-7)) << dev << (hv - fd).abs().max();
    const auto g4 = torch::autograd::grad({(sinkhorn_ops::mhc_v4_sinkhorn(leaf, 5) * w).sum()},
                                          {leaf}, {}, /*retain_graph=*/true,
                                          /*create_graph=*/true)[0];
    const auto hv4 = torch::autograd::grad({(g4 * V).sum()}, {leaf})[0];
    const auto fd4 = (sinkhorn_ops::mhc_v4_sinkhorn_backward(w, logits + h * V, 5, 1e-6) -
                      sinkhorn_ops::mhc_v4_sinkhorn_backward(w, logits - h * V, 5, 1e-6)) /
                     (2 * h);
    EXPECT_TRUE(hv4.abs().max().item<double>() > 1e-3) << dev;
    EXPECT_TRUE(at::allclose(hv4, fd4, 1e-5, 1e-7)) << dev << (hv4 - fd4).abs().max();
    // Below autograd (no input requires grad) nothing is recorded.
    EXPECT_FALSE(sinkhorn_ops::mhc_sinkhorn(logits).requires_grad()) << dev;
  }
}

// mHC's mappings from the projections: H_pre, H_post and H_res by their formulas in ATen
// (both variants), the backward against ATen autograd for every weight, and the op's autograd;
// and the coefficient projection against RMSNorm then matmul.
TEST(MhcApi, MappingsAndRmsProjection) {
  at::manual_seed(4);
  for (auto dev : devices()) {
    const auto opt = at::dtype(at::kDouble).device(dev);
    const int64_t n = 4;
    const auto proj = at::randn({6, 2 * n + n * n}, opt);
    std::vector<at::Tensor> in = {proj,
                                  at::full({}, 0.7, opt),
                                  at::full({}, -0.4, opt),
                                  at::full({}, 1.3, opt),
                                  at::randn({n}, opt),
                                  at::randn({n}, opt),
                                  at::randn({n, n}, opt)};
    const auto w_pre = at::randn({6, n}, opt), w_post = at::randn({6, n}, opt),
               w_res = at::randn({6, n, n}, opt);
    for (const char* variant : {"paper", "v4"}) {
      const bool v4 = std::string(variant) == "v4";
      // The three mappings, concatenated, by the formulas.
      auto formula = [&](const std::vector<at::Tensor>& t) {
        const auto pre = t[0].narrow(-1, 0, n), post = t[0].narrow(-1, n, n);
        const auto res = t[0].narrow(-1, 2 * n, n * n).reshape({-1, n, n});
        auto h_pre = at::sigmoid(t[1] * pre + t[4]);
        if (v4) h_pre = h_pre + 1e-6;
        const auto h_post = 2 * at::sigmoid(t[2] * post + t[5]);
        const auto logits = t[3] * res + t[6];
        const auto h_res = v4 ? v4_formula(logits, 20, 1e-6).mT() : paper_formula(logits, 20);
        return at::cat({h_pre, h_post, h_res.flatten(1)}, -1);
      };
      auto fused = [&](const std::vector<at::Tensor>& t) {
        const auto m = sinkhorn_ops::mhc_mappings(t[0], {t[1], t[2], t[3], t[4], t[5], t[6]}, 20,
                                                  1e-6, variant);
        return at::cat({m.pre, m.post, m.res.flatten(1)}, -1);
      };
      const auto w = at::cat({w_pre, w_post, w_res.flatten(1)}, -1);
      EXPECT_TRUE(at::allclose(fused(in), formula(in), 1e-12, 1e-13)) << dev << variant;
      const auto want = autograd_grads(formula, in, w);
      const auto got = sinkhorn_ops::mhc_mappings_backward(
          w_pre, w_post, w_res, proj, {in[1], in[2], in[3], in[4], in[5], in[6]}, 20, 1e-6,
          variant);
      const std::vector<at::Tensor> g = {got.proj,  got.alpha_pre, got.alpha_post, got.alpha_res,
                                         got.b_pre, got.b_post,    got.b_res};
      for (size_t k = 0; k < g.size(); ++k)
        EXPECT_TRUE(at::allclose(g[k], want[k], 1e-9, 1e-11)) << dev << variant << k;
      const auto through = autograd_grads(fused, in, w);
      for (size_t k = 0; k < g.size(); ++k) EXPECT_TRUE(at::equal(through[k], g[k])) << dev << k;
    }
    EXPECT_THROW(sinkhorn_ops::mhc_mappings(proj.narrow(-1, 0, 20),
                                            {in[1], in[2], in[3], in[4], in[5], in[6]}),
                 c10::ValueError);
    const auto x = at::randn({5, 12}, opt), phi = at::randn({12, 3}, opt);
    const auto plain = [](const std::vector<at::Tensor>& t) {
      return at::matmul(t[0] / at::sqrt(t[0].square().mean(-1, true) + 1e-6), t[1]);
    };
    EXPECT_TRUE(at::allclose(sinkhorn_ops::rms_projection(x, phi), plain({x, phi}), 1e-12, 1e-13));
    const auto wy = at::randn({5, 3}, opt);
    const auto ours = autograd_grads(
        [](const std::vector<at::Tensor>& t) { return sinkhorn_ops::rms_projection(t[0], t[1]); },
        {x, phi}, wy);
    const auto ref = autograd_grads(plain, {x, phi}, wy);
    EXPECT_TRUE(at::allclose(ours[0], ref[0], 1e-11, 1e-12) && at::allclose(ours[1], ref[1], 1e-11, 1e-12))
        << dev;
  }
}

// mHC's coefficients from the streams: the same as rms_projection then mhc_mappings, forward, the
// C++ backward against autograd of that composite (x, the three phi, the six weights), and the
// op's own autograd.
TEST(MhcApi, CoefficientsAreRmsProjectionThenMappings) {
  at::manual_seed(5);
  for (auto dev : devices()) {
    const auto opt = at::dtype(at::kDouble).device(dev);
    const int64_t n = 3, D = 12;
    std::vector<at::Tensor> in = {at::randn({2, 4, D}, opt), at::randn({D, n}, opt),
                                  at::randn({D, n}, opt),    at::randn({D, n * n}, opt),
                                  at::full({}, 0.7, opt),    at::full({}, -0.4, opt),
                                  at::full({}, 1.3, opt),    at::randn({n}, opt),
                                  at::randn({n}, opt),       at::randn({n, n}, opt)};
    auto weights = [](const std::vector<at::Tensor>& t) -> sinkhorn_ops::MHCWeights {
      return {t[4], t[5], t[6], t[7], t[8], t[9]};
    };
    auto flat = [](const at::Tensor& pre, const at::Tensor& post, const at::Tensor& res) {
      return at::cat({pre, post, res.flatten(-2)}, -1);
    };
    auto composite = [&](const std::vector<at::Tensor>& t) {
      const auto proj = sinkhorn_ops::rms_projection(t[0], at::cat({t[1], t[2], t[3]}, 1));
      const auto m = sinkhorn_ops::mhc_mappings(proj, weights(t));
      return flat(m.pre, m.post, m.res);
    };
    auto fused = [&](const std::vector<at::Tensor>& t) {
      const auto c = sinkhorn_ops::mhc_coefficients(t[0], {t[1], t[2], t[3]}, weights(t));
      return flat(c.pre, c.post, c.res);
    };
    EXPECT_TRUE(at::allclose(fused(in), composite(in), 1e-12, 1e-13)) << dev;
    const auto w = at::randn({2, 4, 2 * n + n * n}, opt);
    const auto want = autograd_grads(composite, in, w);
    const auto c = sinkhorn_ops::mhc_coefficients(in[0], {in[1], in[2], in[3]}, weights(in));
    const auto got = sinkhorn_ops::mhc_coefficients_backward(
        w.narrow(-1, 0, n), w.narrow(-1, n, n), w.narrow(-1, 2 * n, n * n).unflatten(-1, {n, n}),
        in[0], {in[1], in[2], in[3]}, c.proj, c.norm, weights(in));
    const std::vector<at::Tensor> g = {got.x,         got.phi_pre,   got.phi_post,
                                       got.phi_res,   got.alpha_pre, got.alpha_post,
                                       got.alpha_res, got.b_pre,     got.b_post,
                                       got.b_res};
    for (size_t k = 0; k < g.size(); ++k)
      EXPECT_TRUE(at::allclose(g[k], want[k], 1e-9, 1e-11)) << dev << k;
    const auto through = autograd_grads(fused, in, w);
    for (size_t k = 0; k < g.size(); ++k) EXPECT_TRUE(at::equal(through[k], g[k])) << dev << k;
    EXPECT_THROW(sinkhorn_ops::mhc_coefficients(in[0], {in[1], in[2], in[3]}, weights(in), 0.0),
                 c10::ValueError);
  }
}

}  // namespace
