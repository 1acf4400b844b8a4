"""What portable mode costs: training steps on the CPU with the native code paths and with the portable ones.

Portable mode (provenance.pin_code_paths, `--portable`, on with `--quick`) pins MKL to its COMPATIBLE branch and
oneDNN and torch's own kernels to AVX2, so that every x86-64 CPU computes the same bits; on a CPU with AVX-512 that
gives up the wider instructions. Each measurement is a fresh process (the libraries read the pins once, at their
first call), native and portable alternated --repeats times, and prints the median images/s of each and their ratio:

    quick   step 2's quick model: ResNet-18 at 64 px, batch 32 (what the quick tutorial trains)
    full    step 2's full model: DenseNet-121 at 224 px, batch 32, weights=None (the same compute as the ImageNet
            weights, no download): a full-settings fine-tuning epoch is this many images/s over the training images

A training step is forward, backward and AdamW over all layers, on batches already in memory, with step 2's seeding
(seed_everything) and as many threads as cores. Run from the repository root:

    python benchmarks/portable_cost.py                       # ~3 min on 2 cores
    python benchmarks/portable_cost.py --repeats 5 --steps 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"quick": ("resnet18", 64), "full": ("densenet121", 224)}

CHILD = """
import sys, time
sys.path.insert(0, "step_2")
import torch, torchvision
from provenance import code_paths, pin_code_paths
import train
portable, name, size, steps = sys.argv[1] == "portable", sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
paths = pin_code_paths(portable)
train.seed_everything(0, True, torch.get_num_threads())
model = torchvision.models.get_model(name, weights=None, num_classes=1)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
x, y = torch.randn(32, 3, size, size), torch.randint(0, 2, (32, 1)).float()
def step():
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    optimizer.step()
step()  # the first step builds the kernels: not timed
started = time.perf_counter()
for _ in range(steps):
    step()
print(f"{32 * steps / (time.perf_counter() - started)} {paths['code_paths']} {paths['cpu_capability']}")
"""


def measure(mode: str, model: str, steps: int) -> float:
    """Images/s of `steps` training steps of `model` in a fresh process, with the code paths of `mode`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_CBWR", "ONEDNN_MAX", "ATEN_CPU"))}
    name, size = MODELS[model]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, name, str(size), str(steps)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[1] == mode, f"asked for {mode} code paths, ran {out[1]}"
    return float(out[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="native/portable pairs per model")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per process (full model)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; {args.repeats} alternated pairs per model; images/s, median (min-max)")
    for model in args.models:
        steps = args.steps if model == "full" else args.steps * 10
        runs: dict[str, list[float]] = {"native": [], "portable": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(measure(mode, model, steps))
        for mode, values in runs.items():
            print(f"  {model:5s} {mode:8s} {statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})")
        ratios = [p / n for p, n in zip(runs["portable"], runs["native"], strict=True)]
        print(f"  {model:5s} portable/native {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
