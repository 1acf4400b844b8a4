"""The reproducibility report of a root run: one Markdown page, written from MLflow's records alone.

It follows the ML Reproducibility Checklist of Pineau et al., "Improving Reproducibility in Machine Learning
Research" (JMLR 22, 2021): every item a machine can fill is filled from what the run recorded (tags, params,
artifacts, its fold, trial and refit runs); the items only a person can fill are listed at the end.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

PERSON = [  # checklist items no record can answer
    "A clear description of the mathematical setting, algorithm and model (the paper's method section).",
    "A clear explanation of any assumptions.",
    "An analysis of the complexity (time, space, sample size) of the method.",
    "For any theoretical claim: a statement of the result, the assumptions, and a complete proof.",
    "For new data: a complete description of how it was collected (here: Oxford-IIIT Pet, not new).",
    "Why these hyper-parameter ranges, this model and this metric were chosen.",
]


def artifact_text(run: mlflow.entities.Run, path: str) -> str | None:
    """An artifact's text, or None when the run has no such artifact."""
    try:
        return mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{path}")
    except (MlflowException, OSError):
        return None


def declaration(spec: dict) -> str:
    """A search-space entry in words: "Float 0.0001 to 0.01, log scale", "Categorical [32, 64, 128]"."""
    kind, arguments = next((kind, value) for kind, value in spec.items() if kind.startswith("suggest_"))
    if kind == "suggest_categorical":
        return f"Categorical {arguments['choices']}"
    extras = ", log scale" if arguments.get("log") else f", step {arguments['step']}" if arguments.get("step") else ""
    return f"{kind.removeprefix('suggest_').capitalize()} {arguments['low']:g} to {arguments['high']:g}{extras}"


def counted(values: list[str]) -> str:
    """ "3 COMPLETE, 2 PRUNED" from a list of labels."""
    return ", ".join(f"{n} {label}" for label, n in pd.Series(values, dtype=object).value_counts().items()) or "none"


def short(value: str) -> str:
    """A logged param value, numbers to 4 significant digits."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def minutes(runs: list[mlflow.entities.Run]) -> float:
    """The summed wall time of finished runs, in minutes."""
    return sum((r.info.end_time - r.info.start_time) for r in runs if r.info.end_time) / 60000


def build_report(
    client: mlflow.MlflowClient,
    root: mlflow.entities.Run,
    folds: dict[tuple[int, int], mlflow.entities.Run],
    table: pd.DataFrame,
    summary: dict[str, float],
) -> str:
    """The report as Markdown: the checklist items, each filled from the records or marked for a person."""
    tags, params = root.data.tags, root.data.params
    setup = json.loads(artifact_text(root, "search/search_setup.json") or "{}")
    packages = (artifact_text(root, "provenance/installed_distributions.txt") or "").split()
    diff_logged = artifact_text(root, "provenance/uncommitted.diff") is not None
    config_files = [a.path for a in client.list_artifacts(root.info.run_id, "config")]
    experiment = root.info.experiment_id
    children = {
        fold: client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        for fold, run in folds.items()
    }
    trials = [r for runs in children.values() for r in runs if r.data.tags.get("run_level") == "trial"]
    refits = [r for runs in children.values() for r in runs if r.data.tags.get("run_level") == "refit"]
    states = counted([t.data.tags.get("trial_state", "?") for t in trials])
    nondeterministic = sorted({r.data.tags.get("nondeterministic_ops", "") for r in refits} - {""})
    checks = counted([run.data.tags.get("refit_check", "?") for run in folds.values()])
    synthetic = tags.get("dataset_synthetic") == "true"
    interval = (
        f"{summary['low']:.4f} to {summary['high']:.4f}"
        if math.isfinite(summary.get("low", math.nan))
        else "none (one outer fold: no spread between test sets to estimate)"
    )
    wanted = ["torch", "torchvision", "mlflow", "optuna", "numpy", "scikit-learn", "pillow"]
    versions = ", ".join(p for p in packages if p.split("==")[0].lower() in wanted)
    per_fold = table[["root_split", "nested_split", "n_train", "n_dev", "n_test", "dev_roc_auc", "test_roc_auc"]]
    fold_rows = "\n".join(
        f"| {r.root_split}/{r.nested_split} | {r.n_train} | {r.n_dev} | {r.n_test} | {r.dev_roc_auc:.4f} | "
        f"{r.test_roc_auc:.4f} | {folds[(r.root_split, r.nested_split)].data.tags.get('refit_check', '?')} |"
        for r in per_fold.itertuples()
    )
    chosen = "\n".join(
        f"| {fold[0]}/{fold[1]} | "
        + ", ".join(f"{name} = {short(run.data.params.get(name, '?'))}" for name in setup.get("search_space", {}))
        + " |"
        for fold, run in folds.items()
    )
    space = "\n".join(
        f"  - `{name}` ({spec.get('setting', '?')}): {declaration(spec)}"
        for name, spec in setup.get("search_space", {}).items()
    )
    started = datetime.fromtimestamp(root.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Reproducibility report: run {root.info.run_id}",
        "",
        f"Experiment `{client.get_experiment(experiment).name}`, started {started}. Written from MLflow's records "
        "alone, by the items of the ML Reproducibility Checklist (Pineau et al., JMLR 2021). [x]: filled from the "
        "records; [ ]: for a person to fill in.",
        "",
        "## What was run",
        f"- [x] Command: `{tags.get('command', '?')}`",
        f"- [x] Code: git commit `{tags.get('git_commit', '?')}`; uncommitted changes: "
        + (
            "yes (provenance/uncommitted.diff is logged)"
            if diff_logged
            else "none"
            if tags.get("git_dirty") == "false"
            else tags.get("git_dirty", "?")
        ),
        f"- [x] Configuration: {', '.join(config_files) or 'none logged'}; overrides (--set): "
        f"`{tags.get('config_overrides', 'none')}`",
        *(
            [f"- [x] Reproduces run {tags['reproduces']}: {tags.get('reproduction_verdict', '?')}"]
            if "reproduces" in tags
            else []
        ),
        f"- [x] Model: {params.get('model.backbone', '?')} (ImageNet weights: {params.get('model.pretrained', '?')}) "
        "with a new head; every setting in config/resolved_config.json",
        "",
        "## Datasets",
        f"- [x] Data: {'the SYNTHETIC STAND-IN, not the Oxford-IIIT Pet data' if synthetic else 'Oxford-IIIT Pet'}; "
        f"dataset digest (SHA-256 of the annotations and images used) `{tags.get('dataset_digest', '?')}`",
        "- [x] Download: https://www.robots.ox.ac.uk/~vgg/data/pets/ (step_1/download_data.py)",
        f"- [x] Splits: split file digest `{tags.get('split_file_digest', '?')}` (logged under splits/), "
        f"{params.get('k_root', '?')} outer x {params.get('k_nested', '?')} inner folds, {len(folds)} fold(s) run",
        f"- [x] Statistics: per fold {int(table['n_train'].median())} train, {int(table['n_dev'].median())} dev, "
        f"{int(table['n_test'].median())} test images (median; each fold below)",
        f"- [x] Pre-processing and exclusions: undecodable files excluded before splitting; images resized to "
        f"{params.get('data.image_size', '?')} px; cap {params.get('data.max_images', '?')} images per fold",
        "",
        "## Code and environment",
        f"- [x] Dependencies: Python {tags.get('env.python', '?')}; {versions or '?'}; all "
        f"{len(packages)} installed packages in provenance/installed_distributions.txt",
        f"- [x] Computing infrastructure: {tags.get('env.device', '?')} "
        f"{tags.get('env.device_name', '')} on {tags.get('env.cpu_model', '?')}, {tags.get('env.platform', '?')}; "
        f"{tags.get('env.torch_threads', '?')} torch thread(s); CUDA {tags.get('env.cuda', '?')}; CPU "
        f"{tags.get('env.cpu_vendor', '?')} family {tags.get('env.cpu_family', '?')} model "
        f"{tags.get('env.cpu_model_number', '?')} ({tags.get('env.cpu_flags', '?')}), "
        f"{tags.get('env.code_paths', 'native')} code paths (torch {tags.get('env.cpu_capability', '?')}, MKL "
        f"{tags.get('env.mkl_cbwr', '?')}, oneDNN {tags.get('env.onednn_max_cpu_isa', '?')})",
        f"- [x] Determinism: deterministic algorithms {'on' if params.get('deterministic') == 'True' else 'off'}, "
        f"seed {params.get('seed', '?')}; ops without a deterministic kernel: {', '.join(nondeterministic) or 'none'}",
        f"- [x] Trained models: one MLflow model per fold, on each fold's refit run ({len(refits)} logged)",
        "",
        "## Hyper-parameters and search",
        f"- [x] Search: {setup.get('sampler', '?')}; pruner {json.dumps(setup.get('pruner'))}; "
        f"{setup.get('n_trials', '?')} finished trials per fold; storage {setup.get('storage', '?')}",
        f"- [x] Space ({len(setup.get('search_space', {}))} hyper-parameters):",
        space,
        "- [x] Selection: the trial with the best dev ROC AUC, refitted from the same seeded state",
        "",
        "| fold | chosen values |",
        "|---|---|",
        chosen,
        "",
        "## Results",
        f"- [x] Number of runs: {len(folds)} fold(s), {len(trials)} trial runs ({states}), {len(refits)} refit(s)",
        "- [x] Measure: ROC AUC on each fold's test images (cat = positive), threshold-free; the mean over outer "
        "folds with the corrected resampled t interval (Nadeau & Bengio 2003), since the folds' training sets overlap",
        f"- [x] Result: mean test ROC AUC {summary['mean']:.4f} over {summary['n_outer']} outer fold(s); 95% interval "
        f"{interval}",
        f"- [x] Refit check (the refit retraces the best trial bit for bit): {checks}",
        f"- [x] Run time: {minutes(list(folds.values())):.1f} min of fold runs in all ({minutes(trials):.1f} min in "
        "trials)",
        "",
        "| fold | n train | n dev | n test | dev ROC AUC | test ROC AUC | refit check |",
        "|---|---|---|---|---|---|---|",
        fold_rows,
        "",
        "## For a person to fill in",
        *[f"- [ ] {item}" for item in PERSON],
        "",
    ]
    return "\n".join(lines)
