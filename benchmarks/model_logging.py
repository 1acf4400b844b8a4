"""What does logging the kept model cost? `mlflow.pytorch.log_model` as step 2 calls it, against the alternatives.

Logs the quick model (resnet18 + head, 64 px) to a fresh sqlite store in four variants, repeats interleaved
(A B C D A B C D ...), and prints the seconds per call (median and min–max), after a first call that pays the
one-off imports (a quick run pays it once, in its one process):

- as step 2 ships it: `log_model` with an input example and the requirements given (`pip_requirements`), without
  MLflow's serving validation (a reload and a prediction on the example),
- + serving validation: the same call with MLflow's default validation,
- + requirements inferred: with the validation and without `pip_requirements` (MLflow infers them),
- weights only: `torch.save` of the state dict plus `mlflow.log_artifact` (what step 2 did before: not loadable
  without our code).

    python benchmarks/model_logging.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import mlflow
import torch

from step_module import load_train


def main(argv: list[str] | None = None) -> None:
    """Time the four variants, interleaved, and print seconds per call."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="calls per variant (default 5)")
    args = parser.parse_args(argv)

    train = load_train("step_2")
    torch.manual_seed(0)
    model = train.build_model(train.QUICK).eval()
    example = torch.randn(2, 3, train.QUICK.image_size, train.QUICK.image_size).numpy()

    def shipped() -> None:
        mlflow.pytorch.log_model(
            copy.deepcopy(model),
            name="model",
            input_example=example,
            pip_requirements=[f"torch=={version('torch')}"],
            validate_serving_input=False,
        )

    def validated() -> None:
        mlflow.pytorch.log_model(
            copy.deepcopy(model), name="model", input_example=example, pip_requirements=[f"torch=={version('torch')}"]
        )

    def inferred() -> None:
        mlflow.pytorch.log_model(copy.deepcopy(model), name="model", input_example=example)

    def weights_only() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
            mlflow.log_artifact(str(Path(tmp) / "state_dict.pt"), "model")

    variants = {
        "log_model (step 2)": shipped,
        "+ serving validation": validated,
        "+ requirements inferred": inferred,
        "weights only": weights_only,
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("model_logging")
        with mlflow.start_run():
            started = time.perf_counter()
            shipped()  # the first call in a process pays one-off imports (torch.export, ...): reported apart
            first = time.perf_counter() - started
            for _ in range(args.repeats):
                for name, log in variants.items():
                    started = time.perf_counter()
                    log()
                    seconds[name].append(time.perf_counter() - started)

    print(f"mlflow {mlflow.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"first log_model call in a process (one-off imports included): {first:.2f} s")
    print(f"{'variant':24s} {'median s':>9s} {'min–max':>13s}")
    for name, values in seconds.items():
        print(f"{name:24s} {statistics.median(values):9.2f} {min(values):6.2f}–{max(values):<6.2f}")


if __name__ == "__main__":
    main()
