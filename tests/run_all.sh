#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, builds the extension, runs
# pytest, builds and runs the GoogleTest suite (CTest), and compiles every CUDA source.
# Fails when any part fails.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "torch==2.13.0" numpy pytest hypothesis pot expecttest ninja cmake \
  scikit-learn matplotlib
if ! [ -f /usr/include/gtest/gtest.h ]; then
  apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null
fi

echo "== build (pip install --no-build-isolation -e .)"
python -m pip install -q --no-build-isolation -e .

echo "== pytest"
python -m pytest tests -q

echo "== GoogleTest (CMake + CTest)"
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake -j2
ctest --test-dir build/cmake --output-on-failure

echo "== CUDA compile check"
bash tests/cuda_compile_check.sh

# The GPU-session scripts run only on a lent GPU machine, once per session: a syntax error there
# would waste the session's device time, so they are parsed here.
echo "== benchmark scripts parse"
for f in benchmarks/*.sh; do bash -n "$f"; done
python -m py_compile benchmarks/*.py
