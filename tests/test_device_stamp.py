"""benchmarks/device_stamp.py: the device run uses a prebuilt extension only when the stamp it
computes there equals the one written at the build, so the stamp must change with any source the
extension is built from (a stale extension would be tested and timed in place of the code)."""
import importlib.util
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_stamp():
    spec = importlib.util.spec_from_file_location("device_stamp", ROOT / "benchmarks" / "device_stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_digest_follows_every_source(tmp_path, monkeypatch):
    stamp = load_stamp()
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "a.h").write_text("int a;\n")
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("int k;\n")
    (tmp_path / "setup.py").write_text("setup()\n")
    monkeypatch.setattr(stamp, "ROOT", tmp_path)
    first = stamp.source_digest()
    assert stamp.source_digest() == first  # deterministic
    seen = {first}
    for path, text in (("csrc/cuda/k.cu", "int k2;\n"), ("setup.py", "setup(x=1)\n"),
                       ("csrc/a.h", "int a;\n\n")):
        (tmp_path / path).write_text(text)
        seen.add(stamp.source_digest())
    (tmp_path / "csrc" / "b.h").write_text("")  # a new file
    seen.add(stamp.source_digest())
    shutil.move(tmp_path / "csrc" / "b.h", tmp_path / "csrc" / "c.h")  # a renamed one
    seen.add(stamp.source_digest())
    assert len(seen) == 6, seen


def test_the_stamp_of_this_tree_names_torch_and_python(capsys):
    import runpy
    import sys

    import torch

    runpy.run_path(str(ROOT / "benchmarks" / "device_stamp.py"), run_name="__main__")
    line = capsys.readouterr().out.strip()
    assert f"torch={torch.__version__} " in line
    assert f"python={sys.version_info[0]}.{sys.version_info[1]} " in line
    assert line.startswith("src=") and len(line.split()[0]) == len("src=") + 16
