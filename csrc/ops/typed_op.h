// A typed handle of one of the library's operators, for calling it through the dispatcher (the
// C++ API, sinkhorn_op.cpp and mhc_api.cpp, and the autograd registrations).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace sinkhorn_ops {
namespace detail {

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace detail
}  // namespace sinkhorn_ops
