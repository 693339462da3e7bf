// GoogleTest suite of the public C++ API (csrc/sinkhorn_ops.h) against a slow ATen reference of
// MATH.md section 1 written here, on CPU and, when one is present, on CUDA.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <limits>
#include <vector>

#include "sinkhorn_ops.h"
#include "test_util.h"

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The literal loop of MATH.md section 1 in float64, with the empty-row guard.
at::Tensor reference_plan(const at::Tensor& S, const at::Tensor& log_a, const at::Tensor& log_b,
                          int64_t steps, bool start_row) {
  auto s = S.to(at::kDouble);
  auto f = at::zeros(at::IntArrayRef(s.sizes().data(), s.dim() - 1), s.options());
  std::vector<int64_t> gs(s.sizes().begin(), s.sizes().end() - 2);
  gs.push_back(s.size(-1));
  auto g = at::zeros(gs, s.options());
  auto guard = [](const at::Tensor& lm, const at::Tensor& lse) {
    return at::where(lse == -kInf, at::zeros_like(lse), lm - lse);
  };
  for (int64_t k = 0; k < steps; ++k) {
    if ((k % 2 == 0) == start_row) {
      f = guard(log_a, at::logsumexp(s + g.unsqueeze(-2), -1));
    } else {
      g = guard(log_b, at::logsumexp(s + f.unsqueeze(-1), -2));
    }
  }
  return at::exp(s + f.unsqueeze(-1) + g.unsqueeze(-2));
}

using test_util::devices;

TEST(Sinkhorn, MatchesReferenceWithMarginals) {
  at::manual_seed(0);
  for (auto dev : devices()) {
    auto S = at::randn({3, 17, 9}, at::dtype(at::kDouble).device(dev));
    auto a = at::rand({3, 17}, S.options()) + 0.5;
    auto b = at::rand({3, 9}, S.options()) + 0.5;
    b = b * (a.sum(-1, true) / b.sum(-1, true));
    sinkhorn_ops::SinkhornOptions o;
    o.a = a;
    o.b = b;
    o.steps = 25;
    auto r = sinkhorn_ops::sinkhorn(S, o);
    auto ref = reference_plan(S.cpu(), a.log().cpu(), b.log().cpu(), 25, true);
    EXPECT_TRUE(at::allclose(r.plan.cpu(), ref, 1e-9, 1e-12)) << dev;
    EXPECT_TRUE(at::allclose(r.plan.sum(-1), a, 1e-9, 1e-12)) << "rows exact after a row step";
    EXPECT_EQ(r.steps.cpu().eq(25).all().item<bool>(), true);
  }
}

TEST(Sinkhorn, OneRowStepIsSoftmax) {
  for (auto dev : devices()) {
    auto S = at::randn({4, 5, 6}, at::dtype(at::kFloat).device(dev));
    sinkhorn_ops::SinkhornOptions o;
    o.steps = 1;
    auto P = sinkhorn_ops::sinkhorn(S, o).plan;
    EXPECT_TRUE(at::allclose(P, at::softmax(S, -1), 1e-5, 1e-7)) << dev;
  }
}

TEST(Sinkhorn, EarlyStopPerProblemAndColumnStart) {
  for (auto dev : devices()) {
    auto easy = at::zeros({1, 8, 8}, at::dtype(at::kDouble).device(dev));
    // A fixed problem, drawn on the CPU for every device: about 3% of random 8x8 problems at
    // this scale need more than 500 steps to reach tol (the float64 reference too); this one
    // takes 77.
    at::manual_seed(1);
    auto hard = (at::randn({1, 8, 8}, at::kDouble) * 3).to(dev);
    auto S = at::cat({easy, hard});
    sinkhorn_ops::SinkhornOptions o;
    o.steps = 500;
    o.tol = 1e-9;
    o.start = "col";
    auto r = sinkhorn_ops::sinkhorn(S, o);
    auto steps = r.steps.cpu();
    EXPECT_EQ(steps[0].item<int64_t>(), 1) << "a constant problem is solved by its first step";
    EXPECT_GT(steps[1].item<int64_t>(), 2);
    EXPECT_LT(steps[1].item<int64_t>(), 500);
    EXPECT_TRUE((r.error.cpu() <= 1e-9 * 8).all().item<bool>());
    auto ref = reference_plan(S.cpu(), at::zeros({2, 8}, at::kDouble), at::zeros({2, 8}, at::kDouble),
                              steps[1].item<int64_t>(), false);
    EXPECT_TRUE(at::allclose(r.plan[1].cpu(), ref[1], 1e-10, 1e-12));
  }
}

TEST(Sinkhorn, MaskedPaddingIsExact) {
  for (auto dev : devices()) {
    auto S = at::randn({2, 6, 5}, at::dtype(at::kDouble).device(dev));
    auto mask = at::zeros({6, 5}, at::dtype(at::kBool).device(dev));
    mask.slice(0, 0, 4).slice(1, 0, 3).fill_(true);  // allowed block 4 x 3
    sinkhorn_ops::SinkhornOptions o;
    o.mask = mask;
    o.steps = 300;
    auto P = sinkhorn_ops::sinkhorn(S, o).plan.cpu();
    EXPECT_TRUE(at::isfinite(P).all().item<bool>());
    EXPECT_EQ(P.slice(1, 4).abs().sum().item<double>(), 0.0);
    EXPECT_EQ(P.slice(2, 3).abs().sum().item<double>(), 0.0);
    auto block = P.slice(1, 0, 4).slice(2, 0, 3);
    EXPECT_TRUE(at::allclose(block.sum(-1), at::ones({2, 4}, at::kDouble), 1e-9, 1e-12));
    EXPECT_TRUE(at::allclose(block.sum(-2), at::full({2, 3}, 4.0 / 3.0, at::kDouble), 1e-9, 1e-12));
  }
}

TEST(Sinkhorn, BadArgumentsRaiseNamedErrors) {
  auto S = at::randn({2, 4, 3});
  sinkhorn_ops::SinkhornOptions o;
  o.a = at::ones({2, 5});
  o.b = at::ones({2, 3});
  try {
    sinkhorn_ops::sinkhorn(S, o);
    FAIL() << "expected a ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("sinkhorn: expected a of shape"), std::string::npos) << e.what();
  }
  sinkhorn_ops::SinkhornOptions neg;
  neg.steps = -1;
  EXPECT_THROW(sinkhorn_ops::sinkhorn(S, neg), c10::ValueError);
  EXPECT_THROW(sinkhorn_ops::sinkhorn(at::randn({3}), {}), c10::ValueError);
  EXPECT_THROW(sinkhorn_ops::sinkhorn(at::ones({2, 2}, at::kLong), {}), c10::TypeError);
}

TEST(Sinkhorn, EmptyBatchAndDims) {
  for (auto shape : std::vector<std::vector<int64_t>>{{0, 3, 3}, {2, 0, 3}, {2, 3, 0}}) {
    auto r = sinkhorn_ops::sinkhorn(at::randn(shape), {});
    EXPECT_EQ(r.plan.sizes(), at::IntArrayRef(shape));
    EXPECT_TRUE(at::isfinite(r.f).all().item<bool>());
    EXPECT_TRUE(at::isfinite(r.g).all().item<bool>());
  }
}

}  // namespace

namespace {

// The unrolled backward equals autograd through the reference loop (MATH.md section 2.1), and
// the implicit one agrees with it at convergence with zero row and column sums (section 2.2).
TEST(SinkhornBackward, UnrolledMatchesAutogradAndImplicitAtConvergence) {
  at::manual_seed(1);
  for (auto dev : devices()) {
    auto S = at::randn({2, 5, 4}, at::dtype(at::kDouble).device(dev));
    auto W = at::randn({2, 5, 4}, S.options());
    sinkhorn_ops::SinkhornOptions o;
    o.steps = 7;
    auto fwd = sinkhorn_ops::sinkhorn(S, o);
    auto grads = sinkhorn_ops::sinkhorn_backward(S, o, fwd, W);
    auto Sr = S.cpu().clone().requires_grad_(true);
    auto ref = reference_plan(Sr, at::zeros({2, 5}, at::kDouble),
                              at::full({2, 4}, std::log(5.0 / 4.0), at::kDouble), 7, true);
    (ref * W.cpu()).sum().backward();
    EXPECT_TRUE(at::allclose(grads.scores.cpu(), Sr.grad(), 1e-10, 1e-12)) << dev;

    sinkhorn_ops::SinkhornOptions conv;
    conv.steps = 2000;
    conv.tol = 1e-14;
    auto fc = sinkhorn_ops::sinkhorn(S, conv);
    auto unrolled = sinkhorn_ops::sinkhorn_backward(S, conv, fc, W).scores;
    conv.grad = "implicit";
    auto implicit = sinkhorn_ops::sinkhorn_backward(S, conv, fc, W).scores;
    EXPECT_TRUE(at::allclose(implicit, unrolled, 1e-6, 1e-8)) << dev;
    EXPECT_LT(implicit.sum(-1).abs().max().item<double>(), 1e-10);
    EXPECT_LT(implicit.sum(-2).abs().max().item<double>(), 1e-10);
  }
}

// The operator carries its autograd in C++ (csrc/ops/sinkhorn_autograd.cpp): differentiating a
// call of sinkhorn_ops::sinkhorn gives sinkhorn_backward's gradients, for the scores and for
// broadcast marginals (summed back to their shapes), in both modes, and the gradient itself
// cannot be differentiated (a clear error).
TEST(SinkhornBackward, AutogradOfTheCppApi) {
  at::manual_seed(2);
  for (auto dev : devices()) {
    const auto opt = at::dtype(at::kDouble).device(dev);
    const auto S = at::randn({2, 5, 4}, opt), W = at::randn({2, 5, 4}, opt);
    const auto a = at::rand({5}, opt) + 0.5;
    const auto b = at::full({2, 4}, 1.0, opt) * (a.sum() / 4);
    for (const char* mode : {"unrolled", "implicit"}) {
      sinkhorn_ops::SinkhornOptions o;
      o.steps = std::string(mode) == "unrolled" ? 7 : 500;
      o.grad = mode;
      auto s = S.clone().set_requires_grad(true), la = a.clone().set_requires_grad(true),
           lb = b.clone().set_requires_grad(true);
      o.a = la;
      o.b = lb;
      const auto out = sinkhorn_ops::sinkhorn(s, o);
      EXPECT_FALSE(out.steps.requires_grad()) << mode;
      const auto got = torch::autograd::grad({(out.plan * W).sum()}, {s, la, lb}, {},
                                             /*retain_graph=*/true, /*create_graph=*/true);
      o.a = a;
      o.b = b;
      const auto want = sinkhorn_ops::sinkhorn_backward(S, o, sinkhorn_ops::sinkhorn(S, o), W);
      EXPECT_TRUE(at::allclose(got[0], want.scores, 1e-12, 1e-14)) << dev << mode;
      // Summed over the batch to a's shape (5); b's keeps its own (2, 4).
      EXPECT_TRUE(at::allclose(got[1], want.a.sum(0), 1e-12, 1e-14)) << dev << mode;
      EXPECT_TRUE(at::allclose(got[2], want.b, 1e-12, 1e-14)) << dev << mode;
      // Second order (create_graph): the Hessian-vector product in S against central
      // differences of the first-order gradient.
      const auto V = at::randn_like(S);
      const auto hv = torch::autograd::grad({(got[0] * V).sum()}, {s}, {}, true)[0];
      const double h = 1e-5;
      const auto grad_at = [&](const at::Tensor& x) {
        return sinkhorn_ops::sinkhorn_backward(x, o, sinkhorn_ops::sinkhorn(x, o), W).scores;
      };
      const auto fd = (grad_at(S + h * V) - grad_at(S - h * V)) / (2 * h);
      EXPECT_TRUE(hv.abs().max().item<double>() > 1e-3) << dev << mode;
      EXPECT_TRUE(at::allclose(hv, fd, 1e-5, 1e-7)) << dev << mode << (hv - fd).abs().max();
      // A loss on f alone (no gradient reaches the plan: an absent grad_plan), and only a
      // requiring grad.
      auto s2 = S.clone().set_requires_grad(true);
      auto la2 = a.clone().set_requires_grad(true);
      o.a = la2;
      const auto out2 = sinkhorn_ops::sinkhorn(s2, o);
      const auto by_f = torch::autograd::grad({out2.f.sum()}, {s2}, {}, true)[0];
      const auto by_a = torch::autograd::grad({(out2.plan * W).sum()}, {la2})[0];
      o.a = a;
      const auto fwd = sinkhorn_ops::sinkhorn(S, o);
      const auto want_f =
          sinkhorn_ops::sinkhorn_backward(S, o, fwd, at::zeros_like(S), at::ones_like(fwd.f));
      EXPECT_TRUE(at::allclose(by_f, want_f.scores, 1e-12, 1e-14)) << dev << mode;
      EXPECT_TRUE(at::allclose(by_a, want.a.sum(0), 1e-12, 1e-14)) << dev << mode;
    }
  }
}

}  // namespace

namespace {

// A warm start continues a run: `first` steps, then the rest from their potentials (start
// flipped after an odd count), equals the whole run; autograd reaches f0 and g0.
TEST(Sinkhorn, WarmStartContinuesARun) {
  at::manual_seed(4);
  for (auto dev : devices()) {
    const auto opt = at::dtype(at::kDouble).device(dev);
    const auto S = at::randn({3, 6, 5}, opt) * 2;
    sinkhorn_ops::SinkhornOptions whole, head, tail;
    whole.steps = 12;
    head.steps = 5;
    const auto w = sinkhorn_ops::sinkhorn(S, whole);
    const auto h = sinkhorn_ops::sinkhorn(S, head);
    tail.steps = 7;
    tail.start = "col";
    tail.f0 = h.f;
    tail.g0 = h.g;
    const auto t = sinkhorn_ops::sinkhorn(S, tail);
    EXPECT_TRUE(at::allclose(t.plan, w.plan, 1e-12, 1e-14)) << dev;
    EXPECT_TRUE(at::allclose(t.f, w.f, 1e-12, 1e-12)) << dev;
    EXPECT_TRUE(at::allclose(t.g, w.g, 1e-12, 1e-12)) << dev;
    EXPECT_TRUE(at::allclose(t.error, w.error, 1e-12, 1e-14)) << dev;
    // The gradient reaches the initial potentials (a column-first run reads f0 in its first
    // step), and the manual backward refuses warm-started options.
    auto f0 = h.f.clone().set_requires_grad(true);
    tail.f0 = f0;
    const auto grad = torch::autograd::grad({sinkhorn_ops::sinkhorn(S, tail).plan.square().sum()},
                                            {f0})[0];
    EXPECT_TRUE(grad.abs().max().item<double>() > 0) << dev;
    EXPECT_THROW(sinkhorn_ops::sinkhorn_backward(S, tail, t, at::ones_like(S)), c10::ValueError)
        << dev;
    tail.f0 = at::zeros({3, 2}, opt);
    EXPECT_THROW(sinkhorn_ops::sinkhorn(S, tail), c10::ValueError) << dev;
  }
}

}  // namespace
