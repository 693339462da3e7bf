// The connected components of a plan's support, for the implicit backward (MATH.md section 2.2).
//
// H = [[diag(r), P], [Pᵀ, diag(c)]] has one null direction (1, −1) per connected component of
// the bipartite graph whose edges are the entries with P_ij > 0 (a block-diagonal mask, or a
// peaked plan whose small entries underflowed, splits it). A right-hand side is solvable only when
// it is balanced on every component, and the solution is defined up to adding t_k to x and −t_k
// to y on each component k. `balance` projects a pair (x on the rows, y on the columns)
// orthogonally onto the balanced pairs: on each component, t = (Σ x − Σ y) / (rows + columns)
// leaves x − t and y + t. Rows and columns without mass are their own components and stay zero.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace sinkhorn_ops {
namespace detail {

class SupportComponents {
 public:
  // Every row and column with mass in one component (exact when the support is connected).
  SupportComponents(const at::Tensor& row_mass, const at::Tensor& col_mass);
  // The components of P > 0 (B, N, M), found by label propagation in ATen ops without host
  // synchronisation: a fixed number of rounds, each a min over the neighbours on both sides,
  // root hooking and pointer jumping. A problem whose labels did not settle (an edge joining
  // two labels) in that many rounds falls back to one component, which is exact for a
  // connected support and wrong for a split one: see the round count in the .cpp.
  static SupportComponents of(const at::Tensor& P, const at::Tensor& row_mass,
                              const at::Tensor& col_mass);

  // (x - t on the rows with mass, y + t on the columns with mass), 0 elsewhere.
  std::pair<at::Tensor, at::Tensor> balance(const at::Tensor& x, const at::Tensor& y) const;

  // (B, K, K), K the rows (rows) or the columns: 1 where two of them share a component, in
  // dtype; undefined when every row and column with mass is taken as one component.
  at::Tensor same_component(bool rows, at::ScalarType dtype) const;

 private:
  at::Tensor wr_, wc_;  // (B, N), (B, M) 1 where a row or column has mass, accumulation type
  at::Tensor labels_;   // (B, N + M) int64 component of every row then column; undefined: one
};

}  // namespace detail
}  // namespace sinkhorn_ops
