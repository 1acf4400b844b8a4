"""The benchmarks that a test can afford: gpu_throughput.py at small size on the CPU, the way its docstring runs it,
and shared_cores.py on one copy at a time (their figures are reported, never asserted)."""

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


def test_shared_cores_runs_and_passive_waiting_changes_no_bit(tmp_path):
    """One copy of step 2's quick training with OpenMP's default wait policy, then one with OMP_WAIT_POLICY=PASSIVE
    (each a fresh process): the table shows both, and the predictions are identical bit for bit."""
    out = run_script(
        "benchmarks/shared_cores.py", "--copies", "1", "--settings", "default", "passive", "--images", "60",
        cwd=tmp_path,
    ).stdout  # fmt: skip
    rows = re.findall(r"^(default|passive) +1 +\d+ +\d+\.\d +\d+\.\d +\d+\.\d\dx  (.*)$", out, re.M)
    assert [setting for setting, _ in rows] == ["default", "passive"], out
    assert all(bits.startswith("identical (AUC ") for _, bits in rows), out
    assert list(tmp_path.iterdir()) == []  # its runs are in a temporary folder, removed
