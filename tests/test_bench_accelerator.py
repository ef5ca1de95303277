"""bench/accelerator.py runs end to end on the CPU in its tiny mode, and without torch."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_reports_throughput_mfu_and_a_skipped_peer_without_torch(tmp_path):
  # CI has no torch; here it is hidden the same way, by packages that fail to import.
  for name in ("torch", "timm"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} hidden by the test')")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
  done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accelerator.py"), "--tiny"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  assert re.search(r"^jax devices: \[.*\]", out, re.M), out
  assert re.search(r"^cpu: ", out, re.M), out
  assert re.search(r"^ours +[0-9.]+ img/s  MFU (unknown|[0-9.]+ %)", out, re.M), out
  assert re.search(r"^peer: skipped \(torch/timm not importable: .*hidden", out, re.M), out
  assert "ratio" not in out, out
  assert re.search(r"^elapsed: [0-9.]+ s$", out, re.M), out


def test_peak_table_matches_device_names_and_the_override_wins(monkeypatch):
  import importlib.util
  monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts bench/ on it
  spec = importlib.util.spec_from_file_location(
      "bench_accelerator", os.path.join(ROOT, "bench", "accelerator.py"))
  accelerator = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(accelerator)
  peak = accelerator.peak_tflops
  assert peak("NVIDIA H100 80GB HBM3") == 989 and peak("NVIDIA H100 PCIe") == 756
  assert peak("NVIDIA H200") == 989 and peak("NVIDIA A100-SXM4-80GB") == 312
  assert peak("NVIDIA L4") == 121 and peak("NVIDIA L40S") is None
  assert peak("TPU v5 lite") == 197 and peak("TPU v4") == 275
  assert peak("cpu") is None and peak("cpu", 2.5) == 2.5
