// Environment switches of the kernels' paths (read once by their callers, into a static).
#pragma once

#include <cstdlib>
#include <cstring>

namespace sinkhorn {

// Whether the environment variable `name` is set to exactly `value`.
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

}  // namespace sinkhorn
