"""The examples still run against the package (smoke tests on tiny budgets; their results are
the examples' own business): an API change that breaks one fails here."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, args", [
    ("demo.py", []),
    ("digits_attention.py", ["--epochs", "1"]),
    ("mhc_stability.py", ["--steps", "4", "--eval-every", "2", "--batch", "4", "--context", "16"]),
    ("optvq_digits.py", ["--steps", "5", "--codes", "16"]),
])
def test_example_runs(script, args, tmp_path):
    env = dict(os.environ, SINKHORN_EXAMPLES_OUTPUT=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    if script != "demo.py":
        assert list(tmp_path.glob("*.png")), "the example wrote no plot"
