"""One line naming what an extension build depends on: the sources (csrc/ and setup.py, by
content), torch (version and commit), Python (major.minor) and the CUDA architectures.
benchmarks/device_prebuild.sh writes it next to the extension it builds for the device
machines; benchmarks/gpu_check.sh there uses that extension only when its own line is the same.

    python benchmarks/device_stamp.py
"""
import hashlib
import os
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def source_digest() -> str:
    h = hashlib.sha256()
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file())
    for path in [*files, ROOT / "setup.py"]:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


if __name__ == "__main__":
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    print(f"src={source_digest()} torch={torch.__version__} torch_git={torch.version.git_version[:12]} "
          f"python={sys.version_info[0]}.{sys.version_info[1]} arch={arch}")
