"""The benchmarks that a test can afford: gpu_throughput.py at small size on the CPU, the way its docstring runs it
(its figures are reported, never asserted)."""

from __future__ import annotations

import re

from conftest import run_script


def test_gpu_throughput_runs_on_the_cpu_at_small_size(make_standin, tmp_path):
    out = run_script(
        "benchmarks/gpu_throughput.py", "--quick", "--device", "cpu", "--images", "64", "--repeats", "1",
        "--workers", "0", "--data-dir", str(make_standin(240)), cwd=tmp_path,
    ).stdout  # fmt: skip
    labels = ("model", "inference", "loader before w0", "loader after w0", "finetune after w0", "warmup after w0")
    for label in (*labels, "warmup step 2 w0", "warmup step 3 w0"):
        assert re.search(rf"^{label} +\d+\.\d \(", out, re.M), label
    assert "finetune after / before, 0 workers: " in out
    for step in (2, 3):
        assert re.search(rf"step {step}: a whole warm-up \(2 epochs\) / an inference pass: \d+\.\d\d \(", out), step
    assert list(tmp_path.iterdir()) == []  # no MLflow run, no file: it only measures
