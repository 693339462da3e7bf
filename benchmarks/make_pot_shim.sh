#!/usr/bin/env bash
# Builds .pot/ (ignored) from the POT installed here, for gpu_check.sh on a device machine that
# has no POT and no wheel of it for its Python: POT's pure-Python sources, its three compiled
# modules replaced by stubs that raise (ot.bregman.sinkhorn_log, the function the benchmarks
# compare against, uses none of them). Carry it with the device call: carry [".pot"].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
src="$(python -c 'import ot, os; print(os.path.dirname(ot.__file__))')"
grep -qx "/.pot/" .git/info/exclude 2>/dev/null || echo "/.pot/" >>.git/info/exclude
rm -rf .pot && mkdir -p .pot
(cd "$(dirname "$src")" && tar --exclude='*.so' --exclude='__pycache__' -cf - ot) |
  (cd .pot && tar xf -)
stub='def _missing(*args, **kwargs):
    raise NotImplementedError("a compiled POT module, left out of this benchmark copy")
'
names="emd_1d_sorted = emd_c = emd_c_sparse = emd_c_lazy = check_result"
printf '%s%s\n' "$stub" "$names = _missing" >.pot/ot/lp/emd_wrap.py
printf '%s%s\n' "$stub" "partial_wasserstein_1d_cy = _missing" >.pot/ot/partial/partial_cython.py
printf '%s%s\n' "$stub" "bsp_solve_c = merge_bijections_c = _missing" >.pot/ot/bsp/bsp_wrap.py
PYTHONPATH=.pot python -c 'import ot; print("POT", ot.__version__, "sources in .pot/ (stubbed)")'
