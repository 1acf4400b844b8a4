"""Step 5: the experiment in a config file. Hyper-parameters resolved per trial, --set overrides, every config
error as one sentence before any work, the logged config, --from-run (an identical rerun and a detected
difference), the reproducibility report, step 5 with the default config choosing exactly what step 4 chose, a
scrambled test split that reaches no decision, every input of a rerun's key, a root run whose record was never
written, and records that cannot be rerun. Then the model in use: registered once with its lineage, predicting the
logged test scores bit for bit, refusing bad input, and served over HTTP with the same answers."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from urllib.request import Request, urlopen

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import (
    QUICK_CODE_PATHS,
    REPO,
    client_in,
    free_port,
    load_step_module,
    logged_predictions,
    main_captured,
    main_in_process,
    run_script,
    scramble_test_split,
    serving,
    user_error,
)

SEARCHED = {"head_hidden", "dropout", "warmup_lr", "warmup_weight_decay", "finetune_lr", "finetune_weight_decay"}
FOLD_METRICS = ("dev_roc_auc", "test_roc_auc", "threshold")


def train_args(split_file: tuple[Path, Path], *extra: str) -> list[str]:
    """The quick step-5 command line on the small stand-in and its split file."""
    data_dir, path = split_file
    return ["--quick", "--set", f"data.data_dir={data_dir}", "--set", f"data.split_file={path}", *extra]


def runs_of(client: mlflow.MlflowClient, query: str = "") -> list:
    experiment = client.get_experiment_by_name("step_5")
    return client.search_runs([experiment.experiment_id], query, max_results=1000)


def fold_runs(client: mlflow.MlflowClient, root_id: str) -> dict[tuple[int, int], object]:
    """The completed fold runs of one root run, by (root split, nested split)."""
    query = f"tags.run_level = 'fold' AND tags.fold_complete = 'true' AND tags.mlflow.parentRunId = '{root_id}'"
    return {
        (int(run.data.tags["root_split_id"]), int(run.data.tags["nested_split_id"])): run
        for run in runs_of(client, query)
    }


def trials_of(client: mlflow.MlflowClient, root_id: str) -> list:
    """The trial runs under a root run's folds."""
    return [
        run
        for fold in fold_runs(client, root_id).values()
        for run in runs_of(client, f"tags.mlflow.parentRunId = '{fold.info.run_id}' AND tags.run_level = 'trial'")
    ]


def artifact(run, path: str) -> str:
    return mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{path}")


@pytest.fixture(scope="module")
def experiment(split_file, tmp_path_factory) -> dict:
    """Folds 0/0 and 0/1 with the quick config, three trials each; then the analysis; each as main() in this process
    (the tests that need a process of their own start one)."""
    cwd = tmp_path_factory.mktemp("step5")
    first = main_captured("step_5/train.py", *train_args(split_file, "--set", "cv.n_root_splits=1"), cwd=cwd)
    analysis = main_captured("step_5/analyze_predictions.py", cwd=cwd)
    client = client_in(cwd)
    (root,) = runs_of(client, "tags.run_level = 'root'")
    return {"cwd": cwd, "first": first, "analysis": analysis, "client": client, "root": root}


# ----------------------------------------------------------------------------------------------------------
# Config resolution and overrides (units)
@pytest.fixture(scope="module")
def config_io():
    """support/config_io.py: a config file loaded, --set applied, JSON in and out."""
    return load_step_module("step_5", "config_io")


@pytest.fixture(scope="module")
def settings(config_io):
    """settings.py as config_io imported it: the classes a config is built of are the ones config_io checks."""
    return config_io.settings


@pytest.fixture(scope="module")
def checks():
    """support/config_checks.py: what each setting may be (its tables)."""
    return load_step_module("step_5", "config_checks")


@pytest.fixture(scope="module")
def quick(config_io):
    return config_io.load_file(REPO / "step_5/config_quick.py")[0]


def test_each_kind_of_hyper_parameter_is_drawn_in_its_range_and_fixed_values_stay(settings, quick):
    config = replace(
        quick,
        model=replace(quick.model, dropout=settings.Float(0.1, 0.3, step=0.05)),
        training=replace(quick.training, batch_size=settings.Int(8, 64, log=True), patience=settings.Int(1, 7, step=2)),
    )
    for seed in range(5):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
        drawn = settings.resolve(config, settings.drawn_by(trial))
        assert drawn.model.head_hidden in (32, 64, 128)
        assert round(drawn.model.dropout / 0.05, 9) in (2, 3, 4, 5, 6)  # 0.1 to 0.3 in steps of 0.05
        assert 1e-4 <= drawn.training.warmup_lr <= 1e-2 and 3e-4 <= drawn.training.finetune_lr <= 3e-3
        assert 8 <= drawn.training.batch_size <= 64 and drawn.training.patience in (1, 3, 5, 7)
        assert drawn.data == quick.data and drawn.search == quick.search and drawn.model.backbone == "resnet18"
        assert set(trial.params) == SEARCHED | {"batch_size", "patience"}
        assert settings.resolve(config, settings.taken_from(trial.params)) == drawn  # the refit's values
    # declaration order is the order Optuna sees: step 4's draws depend on it
    assert list(settings.search_space(quick)) == [
        "head_hidden", "dropout", "warmup_lr", "warmup_weight_decay", "finetune_lr", "finetune_weight_decay",
    ]  # fmt: skip


def test_resolution_reaches_into_nested_tables_and_names_parameters(settings):
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    nested = {"a": {"b": settings.Float(0, 1), "c": [1, 2]}, "d": settings.Categorical(["x", "y"], name="letter")}
    drawn = settings.resolve(nested, settings.drawn_by(trial))
    assert 0 <= drawn["a"]["b"] <= 1 and drawn["a"]["c"] == [1, 2] and drawn["d"] in ("x", "y")
    assert trial.params == {"b": drawn["a"]["b"], "letter": drawn["d"]}  # the key's name, or the name given


def test_overrides_are_typed_and_a_json_config_round_trips(settings, quick, config_io):
    config = quick
    for assignment in ("training.batch_size=16", "training.warmup_lr=1", "data.split_file=None",
                       "model.dropout=Float(0.1, 0.2)", "data.data_dir=2024", "search.pruner_options={}",
                       "search.pruner=NopPruner"):  # fmt: skip
        config = config_io.override(config, assignment, "test")
    assert config.training.batch_size == 16 and config.data.split_file is None and config.data.data_dir == "2024"
    assert config.training.warmup_lr == 1.0 and isinstance(config.training.warmup_lr, float)
    assert config.model.dropout == settings.Float(0.1, 0.2)
    assert "warmup_lr" not in settings.search_space(config)  # a fixed value is no longer searched
    assert config_io.from_json(json.loads(config_io.dumps(config)), "test") == config
    assert config_io.from_json(json.loads(config_io.dumps(quick)), "test") == quick


# ----------------------------------------------------------------------------------------------------------
# Bad configurations: one sentence naming the file and key, before any work
BAD_FILES = {
    "syntax.py": "config = Config(\n",
    "unknown.py": "from dataclasses import replace\nfrom config import config as c\n"
    "config = replace(c, data=replace(c.data, colour=3))\n",
    "wrong_type.py": "from dataclasses import replace\nfrom config import config as c\n"
    "config = replace(c, data=replace(c.data, image_size='64'))\n",
    "no_config.py": "x = 1\n",
    "not_a_config.py": "config = {'data': {}}\n",
    "exits.py": "raise SystemExit(0)\n",  # not an Exception: it used to end train.py silently, with status 0
    "interrupted.py": "raise KeyboardInterrupt\n",
    "small_images.py": "from dataclasses import replace\nfrom config import config as c\n"
    "config = replace(c, data=replace(c.data, image_size=16))\n",
}
BAD_CONFIGS = [
    (["--config", "missing.py"], r"No config file at missing.py: give --config an existing file"),
    (["--config", "syntax.py"], r"syntax.py, line 1: this is not valid Python"),
    (["--config", "unknown.py"], r"unknown.py stopped with TypeError: .*'colour'"),
    (["--config", "wrong_type.py"], r"wrong_type.py: data.image_size should be an int, not '64'"),
    (["--config", "no_config.py"], r"no_config.py defines no `config`"),
    (["--config", "not_a_config.py"], r"not_a_config.py: config should be a settings.Config"),
    (["--quick", "--set", "data.colour=3"], r"--set data.colour=3: unknown key data.colour \(the keys of data"),
    (["--quick", "--set", "optimiser.lr=1"], r"unknown section 'optimiser'"),
    (["--quick", "--set", "training.batch_size=big"], r"training.batch_size should be an int, not 'big'"),
    (["--quick", "--set", "model.head_hidden=Float(16, 64)"], r"model.head_hidden should be an int \(or a hyper"),
    (["--quick", "--set", "model.head_hidden=Categorical([16, 'x'])"], r"model.head_hidden choice should be an int"),
    (["--quick", "--set", "training.warmup_lr=Float(0.1, 0.01, log=True)"], r"training.warmup_lr = Float\(...\) is "
     r"empty: it needs low below high \(got low=0.1, high=0.01\)"),
    (["--quick", "--set", "model.head_hidden=Categorical([])"], r"model.head_hidden = Categorical\(...\) is empty"),
    (["--quick", "--set", "training.finetune_lr=Float(0, 1, log=True)"], r"needs a low above 0 on a log scale"),
    (["--quick", "--set", "model.dropout=Float(0.0, 0.5, name='warmup_lr')"], r"config_quick.py with --set "
     r"model.dropout=.*: model.dropout and training.warmup_lr are both hyper-parameter 'warmup_lr'"),
    (["--quick", "--set", "search.pruner=Median"], r"search.pruner should be a class of optuna.pruners"),
    (["--quick", "--set", "search.pruner_options={'warmup': 1}"], r"search.pruner_options do not suit MedianPruner"),
    (["--quick", "--set", "search.n_trials=0"], r"search.n_trials should be at least 1, not 0"),
    (["--quick", "--set", "batch_size=16"], r"--set batch_size=16: give SECTION.KEY=VALUE"),
    (["--quick", "--config", "x.py"], r"--quick means --config step_5/config_quick.py: give one of them"),
    # right type, wrong value: each of these passed the old check and stopped the run later, or was meaningless
    (["--config", "exits.py"], r"exits.py did not load: running it raised SystemExit\(0\)"),
    (["--config", "interrupted.py"], r"interrupted.py did not load: running it raised KeyboardInterrupt\(\)"),
    (["--config", "small_images.py"], r"small_images.py: data.image_size should be at least 64 \(.*BatchNorm.*\), "
     r"not 16"),
    (["--quick", "--set", "data.image_size=0"], r"data.image_size should be at least 64 .*, not 0"),
    (["--quick", "--set", "data.max_images=0"], r"data.max_images should be at least 10 \(dev and test .*\), not 0"),
    (["--quick", "--set", "data.max_images=9"], r"data.max_images should be at least 10 .*, not 9"),
    (["--quick", "--set", "model.backbone=notamodel"], r"model.backbone should be one of resnet18, .*densenet121.* "
     r"\(a torchvision model whose last layer is one nn.Linear.*\), not 'notamodel'"),
    (["--quick", "--set", "model.backbone=vit_b_16"], r"model.backbone should be one of .*, not 'vit_b_16'"),
    (["--quick", "--set", "model.backbone=Categorical(['resnet18', 'googlenet'])"], r"model.backbone choice should "
     r"be one of .*, not 'googlenet'"),
    (["--quick", "--set", "model.head_hidden=0"], r"model.head_hidden should be at least 1, not 0"),
    (["--quick", "--set", "model.dropout=2.0"], r"model.dropout should be at least 0 and below 1, not 2.0"),
    (["--quick", "--set", "model.dropout=Float(0.0, 1.0)"], r"model.dropout = Float\(...\) high should be at least 0 "
     r"and below 1, not 1.0"),
    (["--quick", "--set", "model.dropout=Categorical([0.1, 1.0])"], r"model.dropout choice should be .*, not 1.0"),
    (["--quick", "--set", "training.batch_size=0"], r"config_quick.py with --set training.batch_size=0: "
     r"training.batch_size should be at least 1, not 0"),
    (["--quick", "--set", "training.batch_size=Int(1.5, 3)"], r"training.batch_size = Int\(...\) low should be an "
     r"int, not 1.5"),
    (["--quick", "--set", "training.warmup_epochs=0"], r"training.warmup_epochs should be at least 1 \(fine-tuning "
     r"starts from the best state of the warm-up\), not 0"),
    (["--quick", "--set", "training.finetune_epochs=-1"], r"training.finetune_epochs should be at least 0, not -1"),
    (["--quick", "--set", "training.warmup_lr=-0.01"], r"training.warmup_lr should be above 0, not -0.01"),
    (["--quick", "--set", "training.warmup_lr=Float(-0.1, 0.1)"], r"training.warmup_lr = Float\(...\) low should "
     r"be above 0, not -0.1"),
    (["--quick", "--set", "training.finetune_weight_decay=-1e-4"], r"training.finetune_weight_decay should be at "
     r"least 0, not -0.0001"),
    (["--quick", "--set", "training.patience=-1"], r"training.patience should be at least 1, not -1"),
    (["--quick", "--set", "cv.n_nested_splits=0"], r"cv.n_nested_splits should be at least 1, not 0"),
    (["--quick", "--set", "cv.root_split=-1"], r"cv.root_split should be at least 0, not -1"),
    (["--quick", "--set", "search.n_trials=Int(1, 5)"], r"search.n_trials should be an int \(a hyper-parameter can "
     r"only stand in the model or training section, where each trial draws it\), not Int\("),
    (["--quick", "--set", "cv.n_root_splits=Int(1, 2)"], r"cv.n_root_splits should be an int or None \(a hyper-"
     r"parameter can only stand in the model or training section"),
    (["--quick", "--set", "data.data_dir=Categorical(['a'])"], r"data.data_dir should be a str \(a hyper-parameter "
     r"can only stand in the model or training section"),
    (["--quick", "--set", "search.sampler=GridSampler"], r"search.sampler should be a sampler that is built from a "
     r"seed alone, e.g. TPESampler \(.*'search_space'\), not 'GridSampler'"),
    (["--quick", "--set", "search.sampler=BaseSampler"], r"search.sampler should be a sampler that is built from a "
     r"seed alone.*, not 'BaseSampler'"),
    (["--quick", "--set", "search.sampler=PartialFixedSampler"], r"search.sampler should be .*, not "
     r"'PartialFixedSampler'"),
    # several --set: a bad value names its own; what only fails together names them all, checked after the last
    (["--quick", "--set", "search.n_trials=2", "--set", "training.batch_size=0"], r"config_quick.py with --set "
     r"training.batch_size=0: training.batch_size should be at least 1, not 0"),
    (["--quick", "--set", "search.pruner=NopPruner", "--set", "search.n_trials=2"], r"config_quick.py with --set "
     r"search.pruner=NopPruner --set search.n_trials=2: search.pruner_options do not suit NopPruner"),
    # passed the checks, then failed in a run: the fold's param 'seed' logged twice, MLflow refusing a param key,
    # an infinite learning rate, the first trial's draw
    (["--quick", "--set", "model.head_hidden=Categorical([32, 64], name='seed')"], r"model.head_hidden = "
     r"Categorical\(...\) name should be a name other than seed, .* \(each fold run logs these params itself\), "
     r"not 'seed'"),
    (["--quick", "--set", "model.dropout=Float(0.0, 0.5, name='drop*out')"], r"model.dropout = Float\(...\) name "
     r"should be a name MLflow accepts as a param key \(at most 250 .*\), not 'drop\*out'"),
    (["--quick", "--set", "training.finetune_lr=1e999"], r"training.finetune_lr should be a finite number above 0, "
     r"not inf"),
    (["--quick", "--set", "training.finetune_lr=0"], r"training.finetune_lr should be above 0, not 0.0"),  # README:
    (["--quick", "--set", "training.warmup_lr=Float(0.0, 0.1)"], r"training.warmup_lr = Float\(...\) low should be "
     r"above 0, not 0.0"),  # "learning rates above 0": at 0 nothing trains (edges from the table itself: below)
    (["--quick", "--set", "search.sampler=BruteForceSampler"], r"search.sampler should be a sampler that can draw "
     r"this config's hyper-parameters \(FloatDistribution.step must be given.*\), not 'BruteForceSampler'"),
    (["--quick", "--set", "search.storage=/proc/x.journal"], r"/proc/x.journal: cannot create or open this journal "
     r"file"),  # a folder no one can write in
]  # fmt: skip


@pytest.mark.parametrize(("argv", "expected"), BAD_CONFIGS, ids=[" ".join(case[0]) for case in BAD_CONFIGS])
def test_a_bad_config_is_one_sentence_before_any_work(argv, expected, tmp_path, monkeypatch):
    train = load_step_module("step_5", "train")
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as stopped:
        main_in_process(train, argv, tmp_path, monkeypatch)
    message = str(stopped.value.code)
    assert re.search(expected, message), message
    assert "\n" not in message and message.endswith(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(BAD_FILES)  # no MLflow store, no journal


def test_a_bad_config_from_the_command_line_has_no_traceback(tmp_path):
    proc = run_script("step_5/train.py", "--quick", "--set", "training.batch_size=big", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("training.batch_size should be an int, not 'big'.")
    assert list(tmp_path.iterdir()) == []


def test_fresh_rerun_without_from_run_is_one_sentence(tmp_path, monkeypatch):
    said = user_error("step_5/train.py", ["--quick", "--fresh-rerun"], tmp_path, monkeypatch)
    assert said == "--fresh-rerun reruns a logged run: give it with --from-run RUN_ID."
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# What is logged
def test_the_config_file_its_resolution_and_the_overrides_are_logged(experiment, settings, quick, config_io):
    client, root = experiment["client"], experiment["root"]
    assert root.data.tags["run_complete"] == "true" and not runs_of(client, "attributes.status = 'RUNNING'")
    for name in ("config.py", "config_quick.py"):  # the file as written, and the one it builds on
        assert artifact(root, f"config/{name}") == (REPO / "step_5" / name).read_text()
    overrides = root.data.tags["config_overrides"]
    assert overrides.endswith("cv.n_root_splits=1") and "data.data_dir=" in overrides
    resolved = config_io.from_json(json.loads(artifact(root, "config/resolved_config.json")), "logged")
    assert resolved.model == quick.model and resolved.training == quick.training and resolved.cv.n_root_splits == 1
    space = json.loads(artifact(root, "config/search_space.json"))
    assert set(space) == SEARCHED and space["warmup_lr"]["suggest_float"]["log"] is True
    assert root.data.params["training.batch_size"] == "32" and "training.warmup_lr" not in root.data.params
    trials = trials_of(client, root.info.run_id)
    assert len(trials) == 6
    for trial in trials:  # each trial's config: plain values, the ones it logged as params
        values = json.loads(artifact(trial, "config/resolved_config.json"))
        assert values["training"]["warmup_lr"] == float(trial.data.params["warmup_lr"])
        assert values["model"]["head_hidden"] == int(trial.data.params["head_hidden"])
        assert values["training"]["batch_size"] == 32


def test_the_default_config_chooses_and_measures_exactly_what_step_4_did(experiment, step4_search):
    """Step 4 and step 5 on the same split file, seed and settings: per fold the same chosen values, bit for bit
    the same metrics."""
    step4 = client_in(step4_search["cwd"])
    (root4,) = step4.search_runs([step4.get_experiment_by_name("step_4").experiment_id], "tags.run_level = 'root'")
    folds4 = {
        (int(r.data.tags["root_split_id"]), int(r.data.tags["nested_split_id"])): r
        for r in step4.search_runs([root4.info.experiment_id], "tags.run_level = 'fold'")
    }
    folds5 = fold_runs(experiment["client"], experiment["root"].info.run_id)
    assert sorted(folds5) == sorted(folds4) == [(0, 0), (0, 1)]
    for fold, run in folds5.items():
        assert {k: run.data.params[k] for k in SEARCHED} == {k: folds4[fold].data.params[k] for k in SEARCHED}
        assert {m: run.data.metrics[m] for m in FOLD_METRICS} == {m: folds4[fold].data.metrics[m] for m in FOLD_METRICS}


# ----------------------------------------------------------------------------------------------------------
# Reproducing a logged run
def test_from_run_reruns_a_fold_bit_for_bit(experiment):
    root_id = experiment["root"].info.run_id
    args = ["--from-run", root_id, "--set", "cv.root_split=0", "--set", "cv.nested_split=0"]
    rerun = run_script("step_5/train.py", *args, cwd=experiment["cwd"])
    assert "fold 0/0: identical: every metric and chosen value equal bit for bit" in rerun.stdout
    assert "Overall: IDENTICAL" in rerun.stdout and "WARNING" not in rerun.stderr
    client = experiment["client"]
    (new,) = runs_of(client, f"tags.reproduces = '{root_id}'")
    assert new.data.tags["reproduction_verdict"] == "identical" and new.data.tags["run_complete"] == "true"
    (fold,) = fold_runs(client, new.info.run_id).values()
    assert fold.data.tags["reproduction_verdict"] == "identical"
    original = json.loads(artifact(experiment["root"], "config/resolved_config.json"))
    again = json.loads(artifact(new, "config/resolved_config.json"))
    assert {k: again[k] for k in ("model", "training", "search")} == {
        k: original[k] for k in ("model", "training", "search")
    }
    assert (
        new.data.params["seed"] == "0"
        and new.data.tags["split_file_digest"] == experiment["root"].data.tags["split_file_digest"]
    )
    assert (new.data.params["amp"], new.data.params["precision"]) == ("True", "fp32")  # --amp is on; on a CPU: fp32
    verdict = json.loads(artifact(new, "reproduction/verdict.json"))
    assert verdict["folds"]["0/0"]["changes"] == {m: 0.0 for m in FOLD_METRICS}


def test_from_run_with_another_thread_count_is_within_noise(experiment):
    """Another --num-threads adds the same floats in another order (README, "Bit for bit"): the rerun of fold 0/0
    names the difference, is not identical, and moves by less than the metrics vary between the original's folds."""
    root_id, then = experiment["root"].info.run_id, experiment["root"].data.tags["env.torch_threads"]
    now = "1" if then != "1" else "2"
    args = ["--from-run", root_id, "--num-threads", now, "--set", "cv.root_split=0", "--set", "cv.nested_split=0"]
    rerun = run_script("step_5/train.py", *args, cwd=experiment["cwd"])
    assert f"env.torch_threads: {then} then, {now} now" in rerun.stderr
    assert "fold 0/0: within noise: " in rerun.stdout and "Overall: WITHIN NOISE" in rerun.stdout, rerun.stdout[-2000:]


def test_from_run_detects_a_changed_setting(experiment):
    """One setting changed for the rerun: the verdict is not identical and says on which metric and by how much,
    judged against the spread between the original's folds as reproduce.verdict_of decides."""
    reproduce = load_step_module("step_5", "reproduce")
    root_id = experiment["root"].info.run_id
    args = ["--from-run", root_id, "--set", "cv.root_split=0", "--set", "cv.nested_split=1",
            "--set", "search.n_trials=1", "--set", "training.finetune_epochs=1"]  # fmt: skip
    rerun = run_script("step_5/train.py", *args, cwd=experiment["cwd"])
    client = experiment["client"]
    (new,) = runs_of(client, f"tags.reproduces = '{root_id}' AND tags.config_overrides LIKE '%finetune_epochs=1%'")
    verdict = new.data.tags["reproduction_verdict"]
    assert verdict in ("within noise", "different")
    before = fold_runs(client, root_id)
    (after,) = fold_runs(client, new.info.run_id).values()
    spread = json.loads(artifact(new, "reproduction/verdict.json"))["spread_between_folds"]
    assert spread["test_roc_auc"] == pytest.approx(
        abs(before[(0, 0)].data.metrics["test_roc_auc"] - before[(0, 1)].data.metrics["test_roc_auc"]) / 2**0.5
    )
    same = all(after.data.params[k] == before[(0, 1)].data.params[k] for k in SEARCHED)
    assert verdict == reproduce.verdict_of(before[(0, 1)].data.metrics, after.data.metrics, same, spread)
    assert f"fold 0/1: {verdict}: " in rerun.stdout and "-> " in rerun.stdout
    assert "with --set cv.root_split=0 cv.nested_split=1 search.n_trials=1 training.finetune_epochs=1" in rerun.stdout


def test_a_rerun_in_another_precision_says_so():
    """--from-run runs in this machine's precision (--amp, --no-amp and the GPU decide it), as on this machine's
    device; when it is not the original's, the rerun warns. A record without one ran in fp32."""
    reproduce = load_step_module("step_5", "reproduce")

    def original(**params: str) -> SimpleNamespace:
        return SimpleNamespace(run=SimpleNamespace(data=SimpleNamespace(params=params)))

    assert reproduce.precision_difference(original(precision="fp32"), "fp32") == []
    assert reproduce.precision_difference(original(), "fp32") == []
    (warning,) = reproduce.precision_difference(original(precision="bf16"), "fp32")
    assert warning.startswith("precision: bf16 then, fp32 now")


def test_verdicts():
    reproduce = load_step_module("step_5", "reproduce")
    old = {"dev_roc_auc": 0.8, "test_roc_auc": 0.75, "threshold": 0.4}
    spread = {"dev_roc_auc": 0.02, "test_roc_auc": 0.03}
    assert reproduce.verdict_of(old, dict(old), True, spread) == "identical"
    assert reproduce.verdict_of(old, dict(old), False, spread) == "within noise"  # other values chosen, same result
    assert reproduce.verdict_of(old, {**old, "threshold": 0.5}, True, spread) == "within noise"
    assert reproduce.verdict_of(old, {**old, "test_roc_auc": 0.77}, True, spread) == "within noise"
    assert reproduce.verdict_of(old, {**old, "test_roc_auc": 0.79}, True, spread) == "different"
    assert reproduce.verdict_of(old, {**old, "dev_roc_auc": 0.75}, True, spread) == "different"
    assert reproduce.verdict_of(old, {**old, "dev_roc_auc": 0.81}, True, {**spread, "dev_roc_auc": 0.0}) == "different"


def test_from_run_refuses_what_is_not_a_step_5_root_run(experiment, monkeypatch):
    train = load_step_module("step_5", "train")
    (fold,) = runs_of(experiment["client"], "tags.run_level = 'fold'")[:1]
    for run_id, expected in ((fold.info.run_id, "a fold run of experiment 'step_5'; give the id of a root run"),
                             ("0" * 32, "no such run")):  # fmt: skip
        with pytest.raises(SystemExit, match=f"--from-run {run_id}: {expected}"):
            main_in_process(train, ["--from-run", run_id], experiment["cwd"], monkeypatch)


def test_from_run_refuses_a_split_file_changed_after_the_run(experiment, tmp_path, monkeypatch):
    """A root run whose logged split file is not the one its digest tag names: refused before any work."""
    train = load_step_module("step_5", "train")
    original = experiment["root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("step_5", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment_id, tags={**original.data.tags, "run_key": "x"})
    for name, value in original.data.params.items():
        client.log_param(run.info.run_id, name, value)
    client.log_text(run.info.run_id, artifact(original, "config/resolved_config.json"), "config/resolved_config.json")
    splits = json.loads(artifact(original, "splits/dataset_splits.json"))
    splits["root_splits"]["0"]["test_indices"].reverse()  # the same images, another file
    client.log_dict(run.info.run_id, splits, "splits/dataset_splits.json")
    client.set_terminated(run.info.run_id)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    before = len(client.search_runs([experiment_id]))
    with pytest.raises(SystemExit, match="the logged split file's digest is not the recorded split_file_digest"):
        one_fold = ["--set", "cv.root_split=0", "--set", "cv.nested_split=0", "--set", "search.n_trials=1"]
        main_in_process(train, ["--from-run", run.info.run_id, *one_fold], tmp_path, monkeypatch)
    assert len(client.search_runs([experiment_id])) == before


# ----------------------------------------------------------------------------------------------------------
# The reproducibility report
def test_the_report_says_what_the_records_say(experiment, checks):
    client, root = experiment["client"], experiment["root"]
    report = artifact(root, "analysis/reproducibility_report.md")
    assert report.strip() in experiment["analysis"].stdout
    tags = root.data.tags
    for value in (tags["command"], tags["git_commit"], tags["dataset_digest"], tags["split_file_digest"],
                  tags["env.cpu_model"], f"Python {tags['env.python']}", "SYNTHETIC STAND-IN", "3 outer x 3 inner",
                  "deterministic algorithms on, seed 0", "ops without a deterministic kernel: none",
                  "Categorical [32, 64, 128]", "Float 0.0003 to 0.003, log scale", "2 identical",
                  "interval none (one outer fold", f"model {tags['env.cpu_model_number']} ({tags['env.cpu_flags']})",
                  "portable code paths (torch AVX2, MKL COMPATIBLE, oneDNN AVX2)"):  # fmt: skip
        assert value in report, value
    for (root_split, nested_split), fold in fold_runs(client, root.info.run_id).items():
        row = f"| {root_split}/{nested_split} | {fold.data.params['n_train']} | {fold.data.params['n_dev']} | "
        assert f"{row}{fold.data.params['n_test']} | {fold.data.metrics['dev_roc_auc']:.4f} | " in report
        assert f"{fold.data.metrics['test_roc_auc']:.4f} | identical |" in report
    mean = client.get_run(root.info.run_id).data.metrics["analysis_test_roc_auc_mean"]
    assert f"mean test ROC AUC {mean:.4f}" in report
    states = [t.data.tags["trial_state"] for t in trials_of(client, root.info.run_id)]
    assert "6 trial runs (" in report and f"{states.count('COMPLETE')} COMPLETE" in report
    assert f"{states.count('PRUNED')} PRUNED" in report or "PRUNED" not in states
    person = report.split("## For a person to fill in")[1]
    assert person.count("- [ ] ") >= 5 and "[x]" not in person


# ----------------------------------------------------------------------------------------------------------
# What each setting may be (checks.ALLOWED): what is refused is above; here, what must still be accepted
def test_the_shipped_configs_load_and_the_edge_of_every_range_is_accepted(settings, config_io):
    for name in ("config.py", "config_quick.py"):
        config_io.load_file(REPO / "step_5" / name)
    edges = ["data.image_size=64", "data.max_images=10", "model.head_hidden=1", "model.dropout=0.0",
             "training.batch_size=1", "training.warmup_epochs=1", "training.finetune_epochs=0",  # 0: warm-up only
             "training.warmup_lr=1e-12", "training.warmup_weight_decay=0", "training.patience=1",
             "cv.n_root_splits=1", "cv.n_nested_splits=None", "cv.root_split=0", "cv.nested_split=0",
             "search.n_trials=1", "search.sampler=RandomSampler",
             "search.pruner=NopPruner", "search.pruner_options={}",  # the README's --no-pruning, in reverse order
             "model.backbone=Categorical(['resnet18', 'resnext50_32x4d', 'wide_resnet50_2', 'densenet121', "
             "'regnet_y_400mf', 'shufflenet_v2_x0_5'])",
             "model.dropout=Float(0.0, 0.99)", "training.finetune_lr=Float(1e-12, 1.0)",
             "training.batch_size=Int(1, 64)",
             "training.finetune_weight_decay=Categorical([0.0, 0.1])"]  # fmt: skip
    config, _ = config_io.load(REPO / "step_5/config_quick.py", edges)
    assert (config.data.image_size, config.data.max_images, config.training.finetune_epochs) == (64, 10, 0)
    assert config.search.pruner == "NopPruner" and config.search.pruner_options == {}
    assert config.model.dropout == settings.Float(0.0, 0.99) and config.training.batch_size == settings.Int(1, 64)


def test_every_number_setting_has_bounds(settings, config_io, checks):
    """A new int or float setting needs its line in ALLOWED, and every line of it names a setting."""
    import typing
    from dataclasses import fields

    keys = {
        f"{section.name}.{name}": hint
        for section in fields(settings.Config)
        for name, hint in config_io.hints_of(config_io.hints_of(settings.Config)[section.name]).items()
    }
    numbers = {key for key, hint in keys.items() if {int, float} & {hint, *typing.get_args(hint)}}
    assert numbers <= set(checks.ALLOWED) <= set(keys)


def test_the_smallest_max_images_gives_each_part_of_a_fold_both_classes(settings, config_io, checks):
    """max_images is shared by the config's data.shares and each part drawn stratified: at the bound every part has
    a cat and a dog, one image fewer and the draw fails; shares that leave a part under 2 images are refused."""
    import numpy as np

    splits = load_step_module("step_5", "splits")
    config, _ = config_io.load(REPO / "step_5" / "config_quick.py", [])
    labels = (np.random.default_rng(0).random(400) < 0.32).astype(int)  # about as many cats as the pets have
    fold = {"test": np.arange(60), "nested": [{"train": np.arange(60, 340), "dev": np.arange(340, 400)}]}
    table = {"labels": labels, "root_splits": [fold]}  # the shape fold_indices reads (splits.load_splits)
    low = checks.ALLOWED["data.max_images"].low
    parts = splits.fold_indices(table, (0, 0), low, config.data.shares, seed=0)
    assert all(set(labels[part]) == {0, 1} for part in parts.values())
    with pytest.raises(ValueError, match="greater or equal to the number of classes"):
        splits.fold_indices(table, (0, 0), low - 1, config.data.shares, seed=0)
    uneven = "data.shares={'train': 0.9, 'dev': 0.05, 'test': 0.05}"  # 5% of 600 images is 30: enough
    assert config_io.load(REPO / "step_5" / "config_quick.py", [uneven])[0].data.shares["dev"] == 0.05
    with pytest.raises(SystemExit, match=r"data.max_images should be large enough that every part gets 2 images"):
        config_io.load(REPO / "step_5" / "config_quick.py", [uneven, "data.max_images=20"])
    with pytest.raises(SystemExit, match=r"data.shares should be a share above 0 for each of train, dev and test"):
        config_io.load(REPO / "step_5" / "config_quick.py", ["data.shares={'train': 0.9, 'dev': 0.2, 'test': 0.1}"])


def test_every_allowed_backbone_takes_the_new_head_and_64_px_is_enough(settings, checks):
    """build_model adapts every name in BACKBONES (built on the meta device: the structure without the memory or
    weights); a training batch of one 64 px image goes through, a smaller one does not."""
    import torch
    import torchvision

    train = load_step_module("step_5", "training")
    assert {"resnet18", "densenet121", "regnet_y_400mf", "shufflenet_v2_x1_0"} <= set(checks.BACKBONES)
    assert not {"googlenet", "inception_v3", "vit_b_16", "efficientnet_b0"} & set(checks.BACKBONES)

    def model_of(name: str) -> object:
        return train.build_model(settings.Model(backbone=name, pretrained=False, head_hidden=4, dropout=0.0))

    for name in checks.BACKBONES:
        assert torchvision.models.get_model_weights(name).DEFAULT is not None  # pretrained=True has weights
        if name.startswith("regnet_"):  # RegNet computes its widths with tensors, which the meta device lacks
            assert torchvision.models.get_model_builder(name).__module__ == "torchvision.models.regnet"
            continue
        with torch.device("meta"):
            assert model_of(name).head[0].in_features > 0, name
    # BatchNorm refuses a one-image training batch in the forward pass when the last feature map is one pixel;
    # DenseNet, whose map shrinks fastest, needs the most (61 px measured), ResNet-style families 33 px
    size = checks.ALLOWED["data.image_size"].low
    with torch.no_grad():
        for name in ("resnet18", "densenet121"):
            assert model_of(name).train()(torch.zeros(1, 3, size, size)).shape == (1,)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # 48 px: too small
            model_of("densenet121").train()(torch.zeros(1, 3, 48, 48))


# ----------------------------------------------------------------------------------------------------------
# What a rerun is keyed by, and a root run's record (tests/README.md lists the bugs these catch)
def stub_fold(fold, splits, config, args, device, key, study_name) -> None:
    """run_fold without the training: a complete fold run with fixed metrics, keyed like the real one."""
    tags = {"run_level": "fold", "root_split_id": str(fold[0]), "nested_split_id": str(fold[1]), "run_key": key,
            "optuna_study": study_name}  # fmt: skip
    with mlflow.start_run(run_name=f"fold-{fold[0]}-{fold[1]}", nested=True, tags=tags):
        mlflow.log_params(dict.fromkeys(SEARCHED, 1))
        mlflow.log_metrics({"dev_roc_auc": 0.8, "test_roc_auc": 0.7, "threshold": 0.5})
        mlflow.set_tag("fold_complete", "true")


def test_a_rerun_is_new_whenever_code_packages_hardware_threads_seed_or_config_change(
    split_file, tmp_path, monkeypatch, capsys
):
    """The key of a --from-run rerun holds the original run, the config, the seed, the thread count, the code and
    the environment (packages, hardware): the same inputs say "already reproduced" and rerun nothing; a change to
    any one of them makes a new rerun. (The split file comes from the original's record: it cannot change.)"""
    train = load_step_module("step_5", "train")
    monkeypatch.setattr(train, "run_fold", stub_fold)
    one_fold = ["--set", "cv.root_split=0", "--set", "cv.nested_split=0"]
    main_in_process(train, train_args(split_file, *one_fold, "--num-threads", "2"), tmp_path, monkeypatch)
    client = client_in(tmp_path)
    (original,) = runs_of(client, "tags.run_level = 'root'")
    rerun = ["--from-run", original.info.run_id, *one_fold]

    def reruns() -> int:
        return len(runs_of(client, f"tags.reproduces = '{original.info.run_id}'"))

    main_in_process(train, rerun, tmp_path, monkeypatch)
    assert reruns() == 1 and "Overall: IDENTICAL" in capsys.readouterr().out
    main_in_process(train, rerun, tmp_path, monkeypatch)  # the same inputs: nothing rerun
    out = capsys.readouterr().out
    assert reruns() == 1 and "Already reproduced by run " in out and "verdict IDENTICAL" in out
    real_code_digest, real_environment = train.code_digest, train.reproduce.environment
    real_distributions = train.reproduce.installed_distributions
    changes = {
        "seed": (["--seed", "1"], None),
        "threads": (["--num-threads", "1"], None),
        "config": (["--set", "training.batch_size=16"], None),
        "code": ([], lambda: monkeypatch.setattr(train, "code_digest", lambda folder: "edited")),
        "packages": ([], lambda: monkeypatch.setattr(
            train.reproduce, "environment", lambda device: {**real_environment(device), "torch": "9.9"})),
        "one more installed package": ([], lambda: monkeypatch.setattr(  # torch and the others as they were
            train.reproduce, "installed_distributions", lambda: real_distributions() + "somepkg==1.0\n")),
        "a code path's variable": ([], lambda: monkeypatch.setenv("MKL_CBWR", "AUTO")),  # exported by the user
        "the wait policy": ([], lambda: monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")),  # workers side by side
        "nothing, but --fresh-rerun": (["--fresh-rerun"], None),
    }  # fmt: skip
    warnings = {}
    for count, (name, (flags, change)) in enumerate(changes.items(), start=2):
        monkeypatch.setattr(train, "code_digest", real_code_digest)
        monkeypatch.setattr(train.reproduce, "environment", real_environment)
        monkeypatch.setattr(train.reproduce, "installed_distributions", real_distributions)
        monkeypatch.setenv("MKL_CBWR", QUICK_CODE_PATHS["MKL_CBWR"])
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        if change:
            change()
        main_in_process(train, [*rerun, *flags], tmp_path, monkeypatch)
        out, warnings[name] = capsys.readouterr()
        assert reruns() == count and "Already reproduced" not in out and "already complete" not in out, name
    # the user's variable: a warning that names it, and the difference named as the CPU's code path
    said = warnings["a code path's variable"]
    assert "WARNING MKL_CBWR=AUTO set in the environment, and kept" in said, said
    assert "not as in run" in said and "the CPU's code path differs: MKL_CBWR: COMPATIBLE then, AUTO now" in said
    assert "code path" not in warnings["nothing, but --fresh-rerun"]
    said = warnings["the wait policy"]  # recorded and named, but not as a code path: it changes no bit
    assert "how idle threads wait differs, which changes no bit" in said
    assert "OMP_WAIT_POLICY: unset then, PASSIVE now" in said
    assert "code path differs" not in said, said
    assert "installed packages: 1 differ (somepkg)" in warnings["one more installed package"]
    assert "installed packages" not in warnings["nothing, but --fresh-rerun"]


def test_a_verdicts_cause_is_the_code_path_or_what_else_differs_or_nothing_on_record():
    reproduce = load_step_module("step_5", "reproduce")
    path = "the CPU's code path differs: env.cpu_capability: AVX2 then, AVX512 now"
    assert reproduce.cause_of([path, "code_digest: a then, b now"], []) == (
        "the CPU's code path differs (env.cpu_capability: AVX2 then, AVX512 now)"
    )
    assert reproduce.cause_of(["code_digest: a then, b now"], []).startswith("not as in the original: code_digest")
    assert "--set training.batch_size=16" in reproduce.cause_of([], ["training.batch_size=16"])
    assert reproduce.cause_of([], []).startswith("nothing in the record explains it")
    wait = reproduce.WAITING + "OMP_WAIT_POLICY: unset then, PASSIVE now"  # recorded, but it explains no difference
    assert reproduce.cause_of([wait], []).startswith("nothing in the record explains it")
    assert reproduce.cause_of([wait, path], []).startswith("the CPU's code path differs (env.cpu_capability")


def test_the_same_rerun_again_says_it_was_reproduced_and_trains_nothing(experiment):
    """The same --from-run twice (the first is test_from_run_reruns_a_fold_bit_for_bit's, or made here): the second
    names the earlier rerun and its verdict and trains nothing. (A change of code, packages, hardware, threads,
    seed or config makes a new rerun: the test above.)"""
    root_id = experiment["root"].info.run_id
    args = ["--from-run", root_id, "--set", "cv.root_split=0", "--set", "cv.nested_split=0"]
    if not runs_of(experiment["client"], f"tags.reproduces = '{root_id}' AND tags.config_overrides = "
                   "'cv.root_split=0 cv.nested_split=0'"):  # fmt: skip
        run_script("step_5/train.py", *args, cwd=experiment["cwd"])
    again = run_script("step_5/train.py", *args, cwd=experiment["cwd"])
    assert "Already reproduced by run " in again.stdout and "verdict IDENTICAL" in again.stdout
    assert "trial " not in again.stdout and "MLflow run" not in again.stdout  # nothing trained, no run opened


def test_a_root_whose_record_was_not_written_is_never_reopened(split_file, tmp_path, monkeypatch):
    """The first command fails while writing the root's record (an artifact store that cannot be written): the
    next command starts a new root run and writes its whole record, instead of reopening the one without it."""
    train = load_step_module("step_5", "train")
    args = train_args(split_file, "--set", "cv.root_split=0", "--set", "cv.nested_split=0")

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "mlruns")

    monkeypatch.setattr(train, "log_provenance", unwritable)
    with pytest.raises(PermissionError):
        main_in_process(train, args, tmp_path, monkeypatch)
    monkeypatch.undo()
    train = load_step_module("step_5", "train")
    monkeypatch.setattr(train, "run_fold", stub_fold)
    main_in_process(train, args, tmp_path, monkeypatch)
    client = client_in(tmp_path)
    first, second = sorted(runs_of(client, "tags.run_level = 'root'"), key=lambda run: run.info.start_time)
    assert first.info.status == "FAILED" and "root_record" not in first.data.tags
    assert second.data.tags["root_record"] == "complete" and second.data.tags["run_complete"] == "true"
    logged = {a.path for folder in ("config", "splits", "provenance", "search")
              for a in client.list_artifacts(second.info.run_id, folder)}  # fmt: skip
    assert {"config/resolved_config.json", "splits/dataset_splits.json", "search/search_setup.json",
            "provenance/installed_distributions.txt"} <= logged  # fmt: skip


def fake_root(client, experiment_id: str, original, status: str, config: str, splits: str | None, **tags) -> str:
    """A root run of step 5 copied from the original's record, with its status, tags and artifacts as given."""
    tags = {k: v for k, v in {**original.data.tags, "run_key": "x", **tags}.items() if v is not None}
    run = client.create_run(experiment_id, tags=tags)
    for name, value in original.data.params.items():
        client.log_param(run.info.run_id, name, value)
    if config is not None:
        client.log_text(run.info.run_id, config, "config/resolved_config.json")
    if splits is not None:
        client.log_text(run.info.run_id, splits, "splits/README.txt")
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.mark.parametrize("damage", ["killed", "failed", "running", "torn config", "no split file", "empty id"])
def test_from_run_refuses_an_incomplete_or_damaged_record_in_one_sentence(experiment, damage, tmp_path, monkeypatch):
    train = load_step_module("step_5", "train")
    original = experiment["root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    # the artifacts beside the store: by default they would go to ./mlruns of the test process (the repository)
    experiment_id = client.create_experiment("step_5", artifact_location=(tmp_path / "mlruns").as_uri())
    config = artifact(original, "config/resolved_config.json")
    if damage in ("killed", "failed", "running"):
        run_id = fake_root(client, experiment_id, original, damage.upper(), config, None, run_complete=None)
        expected = f"this root run is {damage.upper()} and not complete"
    elif damage == "torn config":
        run_id = fake_root(client, experiment_id, original, "FINISHED", config[: len(config) // 2], "x")
        expected = "its config/resolved_config.json is not readable JSON"
    elif damage == "no split file":
        run_id = fake_root(client, experiment_id, original, "FINISHED", config, "not a split file")
        expected = "its splits/ artifact folder holds 0 JSON files"
    else:
        run_id, expected = "", "--from-run was given an empty run id"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    before = len(client.search_runs([experiment_id]))
    with pytest.raises(SystemExit) as stopped:
        main_in_process(train, ["--from-run", run_id], tmp_path, monkeypatch)
    message = str(stopped.value.code)
    assert expected in message and "\n" not in message and message.endswith("."), message
    assert len(client.search_runs([experiment_id])) == before  # nothing started


def test_the_test_split_reaches_no_decision(experiment, split_file, tmp_path, monkeypatch):
    """Every test label of outer fold 0 flipped and every test image replaced by noise: fold 0/0's search makes
    the same choice, the refit stops at the same epoch with the same dev predictions and threshold, and only the
    test results change (proof that the scrambled test split was used where it belongs)."""
    train = load_step_module("step_5", "train")
    scramble_test_split(train, 0, tmp_path, monkeypatch)
    args = train_args(split_file, "--set", "cv.root_split=0", "--set", "cv.nested_split=0")
    main_in_process(train, args, tmp_path, monkeypatch)
    client = client_in(tmp_path)
    (root,) = runs_of(client, "tags.run_level = 'root'")
    (scrambled,) = fold_runs(client, root.info.run_id).values()
    original = fold_runs(experiment["client"], experiment["root"].info.run_id)[(0, 0)]
    assert {k: scrambled.data.params[k] for k in SEARCHED} == {k: original.data.params[k] for k in SEARCHED}
    trial_values = [
        {run.data.tags["trial_number"]: (run.data.tags["trial_state"], run.data.metrics.get("dev_roc_auc"))
         for run in runs_of(c, f"tags.mlflow.parentRunId = '{fold.info.run_id}' AND tags.run_level = 'trial'")}
        for c, fold in ((client, scrambled), (experiment["client"], original))
    ]  # fmt: skip
    assert trial_values[0] == trial_values[1]  # every trial, pruned or complete, with the same dev ROC AUC
    for metric in ("dev_roc_auc", "threshold"):
        assert scrambled.data.metrics[metric] == original.data.metrics[metric], metric
    new = client.get_run(scrambled.data.tags["refit_run_id"])
    old = experiment["client"].get_run(original.data.tags["refit_run_id"])
    kept = ("best_phase", "best_epoch")  # early stopping kept the same epoch
    assert [new.data.tags[t] for t in kept] == [old.data.tags[t] for t in kept]
    predictions = logged_predictions(client, new.info.run_id, tmp_path / "new")
    before = logged_predictions(experiment["client"], old.info.run_id, tmp_path / "old")
    assert predictions["dev"] == before["dev"] and predictions["test"] != before["test"]
    assert scrambled.data.metrics["test_roc_auc"] != original.data.metrics["test_roc_auc"]


def test_help_says_that_a_config_file_is_code(capsys):
    train = load_step_module("step_5", "train")
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "config file (default config.py); it runs as code: trust it first" in " ".join(
        capsys.readouterr().out.split()
    )


# ----------------------------------------------------------------------------------------------------------
# The model in use: registered with its lineage (register.py), predicting photos (predict.py), served over HTTP
MODEL = "pets-cat-vs-dog"


@pytest.fixture(scope="module")
def registered(experiment) -> dict:
    """register.py twice on the experiment's root run (other tests add reruns): the second finds the first's
    version."""
    root_id = experiment["root"].info.run_id
    runs = [run_script("step_5/register.py", "--run-id", root_id, cwd=experiment["cwd"]) for _ in range(2)]
    client = experiment["client"]
    folds = fold_runs(client, experiment["root"].info.run_id)
    best = max(folds.values(), key=lambda run: run.data.metrics["test_roc_auc"])
    refit = client.get_run(best.data.tags["refit_run_id"])
    test = pd.read_csv(io.StringIO(artifact(refit, "predictions/test_predictions.csv")))
    images = Path(experiment["root"].data.params["data.data_dir"]) / "oxford-iiit-pet" / "images"
    return {**experiment, "runs": runs, "refit": refit, "test": test, "images": images}


def predictions(stdout: str) -> dict[str, tuple[np.float32, str]]:
    """predict.py's answer lines: file name → (P(cat) as the float32 it printed, label)."""
    lines = [line.split("\t") for line in stdout.splitlines() if "\tP(cat) = " in line]
    return {Path(file).name: (np.float32(p.removeprefix("P(cat) = ")), label) for file, p, label in lines}


def test_registering_twice_makes_one_version_with_the_lineage_of_its_runs(registered):
    client, refit, root = registered["client"], registered["refit"], registered["root"]
    (version,) = client.search_model_versions(f"name = '{MODEL}'")
    assert client.get_model_version_by_alias(MODEL, "candidate").version == version.version
    assert version.run_id == refit.info.run_id  # the best fold by test ROC AUC, as printed
    first, second = (run.stdout for run in registered["runs"])
    assert f"Registered {MODEL} version {version.version}" in first and "Already registered" in second
    fold = registered["client"].get_run(refit.data.tags["mlflow.parentRunId"])
    assert re.search(rf"{fold.data.tags['root_split_id']} +{fold.data.tags['nested_split_id']} .* <-", first)
    tags = version.tags
    for key in load_step_module("step_5", "registry").LINEAGE:  # every one, git_dirty too
        assert tags[key] == root.data.tags[key], key
    assert ("with uncommitted changes" in version.description) == (root.data.tags["git_dirty"] == "true")
    assert tags["dataset_synthetic"] == "true" and tags["root_run_id"] == root.info.run_id
    config = artifact(root, "config/resolved_config.json")
    assert tags["config_digest"] == hashlib.sha256(config.encode()).hexdigest()
    assert client.get_run(refit.info.run_id).info.status == "FINISHED"  # logged onto without reopening it


def test_predict_reproduces_the_logged_test_scores_bit_for_bit(registered):
    """Every test image of the registered fold, in its table's order (the batches its run predicted in), through
    the registered version and through the refit run's own torch model: the logged scores, to the last bit."""
    test, refit = registered["test"], registered["refit"]
    files = [str(registered["images"] / name) for name in test["file"]]
    threshold = refit.data.metrics["threshold"]
    for model in (f"models:/{MODEL}@candidate", f"runs:/{refit.info.run_id}/model"):
        out = run_script("step_5/predict.py", "--model", model, *files, cwd=registered["cwd"])
        assert "SYNTHETIC STAND-IN: it has never seen a real pet" in out.stdout
        assert refit.info.run_id in out.stdout and registered["root"].info.run_id in out.stdout
        answers = predictions(out.stdout)
        assert [answers[name][0] for name in test["file"]] == list(test["score"].to_numpy(np.float32)), model
        assert [answers[name][1] for name in test["file"]] == [
            "cat" if s >= threshold else "dog" for s in test["score"]
        ]


def test_predict_refuses_what_it_cannot_predict_in_one_sentence_each(registered, tmp_path, monkeypatch):
    predict = load_step_module("step_5", "predict")
    text, truncated = tmp_path / "notes.jpg", tmp_path / "cut.jpg"
    text.write_text("not a photo")
    whole = (registered["images"] / registered["test"]["file"][0]).read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    assert predict.problem(registered["images"] / registered["test"]["file"][0]) is None
    assert predict.problem(text) == f"{text} is not an image (no image format recognises it)."
    assert predict.problem(truncated).startswith(f"{truncated} is a truncated or damaged image")
    assert predict.problem(tmp_path / "gone.jpg") == f"{tmp_path / 'gone.jpg'}: no such file."
    assert predict.problem(tmp_path) == f"{tmp_path} is not a file."
    out = run_script("step_5/predict.py", str(text), str(truncated), cwd=registered["cwd"], check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr and out.stderr.count("\n") == 2  # both, nothing else
    good = str(registered["images"] / registered["test"]["file"][0])
    for uri in (f"models:/{MODEL}/99", "runs:/0123456789abcdef0123456789abcdef/model", f"models:/{MODEL}@production"):
        message = user_error("step_5/predict.py", ["--model", uri, good], registered["cwd"], monkeypatch)
        assert f"No model at {uri} in " in message


def test_the_served_model_answers_as_predict_does_to_the_last_bit(registered, tmp_path):
    """The README's `mlflow models serve` and `curl`, as written but for the port and the image, from a user's shell
    (none of the code paths the tests pin: the model sets its run's); then every test image of the registered fold
    in one request, in its table's order (the run's batches), against predict.py on the same images and against
    the scores the refit run logged, to the last bit. The server is stopped in every case."""
    readme = (REPO / "step_5/README.md").read_text()
    serve = re.search(r"^(mlflow models serve .*)$", readme, re.M).group(1)
    curl = re.search(r"^(IMAGE=.*\ncurl [^\n]*\\\n[^\n]*)$", readme, re.M).group(1)
    port = str(free_port())
    command = serve.replace("5001", port).split()
    command[0] = str(Path(sys.executable).parent / "mlflow")
    shell = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and k not in QUICK_CODE_PATHS}
    env = {**shell, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its uvicorn
    url = f"http://127.0.0.1:{port}"
    names = list(registered["test"]["file"])
    files = [str(registered["images"] / name) for name in names]
    with serving(command, registered["cwd"], tmp_path / "serve.log", lambda: urlopen(f"{url}/ping", timeout=2), env):
        image = curl.split("\n")[0].removeprefix("IMAGE=")
        script = curl.replace("5001", port).replace(image, files[0])
        one = json.loads(subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(Path(f).read_bytes()).decode()] for f in files],
            }
        }
        request = Request(f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urlopen(request, timeout=60) as response:
            every = json.loads(response.read())
    with pytest.raises(OSError):
        urlopen(f"{url}/ping", timeout=2)  # stopped
    local = predictions(run_script("step_5/predict.py", *files, cwd=registered["cwd"]).stdout)
    served = [(np.float32(answer["p_cat"]), answer["label"]) for answer in every["predictions"]]
    assert served == [local[name] for name in names]
    logged = registered["test"]["score"].to_numpy(np.float32)
    assert [p_cat for p_cat, _ in served] == list(logged), "the served P(cat) is not the refit run's logged score"
    alone = predictions(run_script("step_5/predict.py", files[0], cwd=registered["cwd"]).stdout)
    assert (np.float32(one["predictions"][0]["p_cat"]), one["predictions"][0]["label"]) == alone[names[0]]


# ----------------------------------------------------------------------------------------------------------
# What a record or a model version says is what it holds: more trials later, text-valued hyper-parameters, folds
# added by a later command, the code a version carries, registrations at once
def quick_fold(split_file: tuple[Path, Path], *extra: str) -> list[str]:
    """One fold (0/0), one trial: the smallest quick experiment."""
    return train_args(split_file, "--set", "cv.n_root_splits=1", "--set", "cv.n_nested_splits=1", *extra)


def test_more_trials_later_refit_the_new_best_and_complete_the_new_root(split_file, tmp_path):
    """The README's "more trials": one trial, then three on the same study. The new root's fold is refitted with its
    own best trial (here trial 2, which beats trial 0), tested and complete, and the root is complete; the
    analysis and register.py find it."""
    common = ("--seed", "2", "--set", "search.pruner=NopPruner", "--set", "search.pruner_options={}")
    main_captured("step_5/train.py", *quick_fold(split_file, *common, "--set", "search.n_trials=1"), cwd=tmp_path)
    more = main_captured(
        "step_5/train.py", *quick_fold(split_file, *common, "--set", "search.n_trials=3"), cwd=tmp_path
    )
    assert "refitted by another process" not in more.stdout and "fold 0/0 complete: trial 2 chosen" in more.stdout
    client = client_in(tmp_path)
    roots = {run.data.params["search.n_trials"]: run for run in runs_of(client, "tags.run_level = 'root'")}
    assert sorted(roots) == ["1", "3"] and all(r.data.tags.get("run_complete") == "true" for r in roots.values())
    (fold,) = fold_runs(client, roots["3"].info.run_id).values()
    refit = client.get_run(fold.data.tags["refit_run_id"])
    assert fold.data.tags["best_trial_number"] == "2" and refit.data.tags["best_trial_number"] == "2"
    assert fold.data.tags["refit_check"] == "identical" and "test_roc_auc" in fold.data.metrics
    (first,) = fold_runs(client, roots["1"].info.run_id).values()
    assert (
        first.data.tags["best_trial_number"] == "0"
        and fold.data.metrics["dev_roc_auc"] > first.data.metrics["dev_roc_auc"]
    )
    registered = run_script("step_5/register.py", "--run-id", roots["3"].info.run_id, cwd=tmp_path)
    assert "from fold 0/0" in registered.stdout


def test_a_text_valued_hyper_parameter_is_searched_refitted_and_logged(split_file, tmp_path):
    """A Categorical of backbone names (and one of a bool): one trial, start to refit, then the analysis."""
    choices = ("--set", "model.backbone=Categorical(['resnet18', 'resnet34'])")
    args = quick_fold(split_file, *choices, "--set", "model.pretrained=Categorical([False])", "--set",
                      "search.n_trials=1")  # fmt: skip
    out = main_captured("step_5/train.py", *args, cwd=tmp_path)
    client = client_in(tmp_path)
    (root,) = runs_of(client, "tags.run_level = 'root'")
    (fold,) = fold_runs(client, root.info.run_id).values()
    backbone = fold.data.params["backbone"]
    assert backbone in ("resnet18", "resnet34") and fold.data.params["pretrained"] == "False"
    assert f"backbone {backbone}" in out.stdout and "pretrained False" in out.stdout
    refit = client.get_run(fold.data.tags["refit_run_id"])
    assert json.loads(artifact(refit, "config/resolved_config.json"))["model"]["backbone"] == backbone
    assert root.data.tags["run_complete"] == "true"
    main_captured("step_5/analyze_predictions.py", cwd=tmp_path)
    studies = load_step_module("step_5", "studies")
    brief = studies.brief({"a": 0.000123456, "b": 1024, "c": "resnet34", "d": None, "e": True})
    assert brief == "a 0.000123, b 1024, c resnet34, d None, e True"


def test_a_root_names_every_fold_it_holds_and_from_run_reruns_them_all(split_file, tmp_path, monkeypatch):
    """Fold 0/1 alone, then the same experiment without the fold picked: the second command adds fold 0/0 to the
    same root, whose record grows by it (fold_asked tags); --from-run reruns both folds; register.py registers a
    fold the record names and refuses one it does not."""
    base = train_args(split_file, "--seed", "11", "--set", "cv.n_root_splits=1", "--set", "cv.n_nested_splits=2",
                      "--set", "search.n_trials=1")  # fmt: skip
    main_captured("step_5/train.py", *base, "--set", "cv.root_split=0", "--set", "cv.nested_split=1", cwd=tmp_path)
    main_captured("step_5/train.py", *base, cwd=tmp_path)
    client = client_in(tmp_path)
    (root,) = runs_of(client, "tags.run_level = 'root'")
    assert {k for k in root.data.tags if k.startswith("fold_asked.")} == {"fold_asked.0.0", "fold_asked.0.1"}
    assert root.data.tags["run_complete"] == "true" and sorted(fold_runs(client, root.info.run_id)) == [(0, 0), (0, 1)]
    rerun = run_script("step_5/train.py", "--from-run", root.info.run_id, cwd=tmp_path)
    assert "fold 0/0: identical" in rerun.stdout and "fold 0/1: identical" in rerun.stdout
    assert "Overall: IDENTICAL\n" in rerun.stdout
    out = run_script("step_5/register.py", "--run-id", root.info.run_id, "--fold", "0/0", cwd=tmp_path)
    assert "from fold 0/0" in out.stdout
    client.delete_tag(root.info.run_id, "fold_asked.0.1")  # a root whose record does not name a fold it holds
    message = user_error("step_5/register.py", ["--run-id", root.info.run_id, "--fold", "0/1"], tmp_path, monkeypatch)
    assert f"Root run {root.info.run_id}'s record does not name fold 0/1" in message
    partial = run_script("step_5/train.py", "--from-run", root.info.run_id, "--set", "cv.root_split=0", "--set",
                         "cv.nested_split=0", "--fresh-rerun", cwd=tmp_path)  # fmt: skip
    assert "Overall: IDENTICAL (only 1 of the original's 2 folds were rerun; not checked: 0/1)" in partial.stdout


def test_registering_refuses_code_that_is_not_the_runs(registered, tmp_path):
    """register.py of a checkout whose pets.py differs from the run's code (a copy of step_5 with one edit): one
    sentence, no version; the versions made carry the run's code digest."""
    copy = tmp_path / "step_5"
    shutil.copytree(REPO / "step_5", copy, ignore=shutil.ignore_patterns("__pycache__"))
    pets = copy / "support" / "pets.py"
    pets.write_text(pets.read_text().replace("Image.Resampling.BILINEAR", "Image.Resampling.NEAREST"))
    client, root = registered["client"], registered["root"]
    before = len(client.search_model_versions(f"name = '{MODEL}'"))
    folds = fold_runs(client, root.info.run_id)
    other = next(f for f, run in folds.items() if run.data.tags["refit_run_id"] != registered["refit"].info.run_id)
    proc = subprocess.run(
        [sys.executable, str(copy / "register.py"), "--run-id", root.info.run_id, "--fold", f"{other[0]}/{other[1]}"],
        cwd=registered["cwd"], capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"Root run {root.info.run_id} ran code digest {root.data.tags['code_digest'][:12]}" in proc.stderr
    assert "the registered model would carry this checkout's photo_model.py and pets.py" in proc.stderr
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == before


def test_registrations_started_together_make_one_version(registered):
    """Three register.py at once on a fold not yet registered: one version of its refit run; the others find it."""
    client, root = registered["client"], registered["root"]
    folds = fold_runs(client, root.info.run_id)
    fold, run = next((f, r) for f, r in folds.items() if r.data.tags["refit_run_id"] != registered["refit"].info.run_id)
    refit_id = run.data.tags["refit_run_id"]
    assert not client.search_model_versions(f"name = '{MODEL}' and run_id = '{refit_id}'")
    candidate = client.get_model_version_by_alias(MODEL, "candidate").version
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and k not in QUICK_CODE_PATHS}
    command = [sys.executable, str(REPO / "step_5/register.py"), "--run-id", root.info.run_id, "--fold",
               f"{fold[0]}/{fold[1]}"]  # fmt: skip
    try:
        workers = [
            subprocess.Popen(
                command, cwd=registered["cwd"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )  # fmt: skip
            for _ in range(3)
        ]
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
        assert all(worker.returncode == 0 for worker in workers), outputs
        assert len(client.search_model_versions(f"name = '{MODEL}' and run_id = '{refit_id}'")) == 1
        assert sum("Registered pets-cat-vs-dog version" in out for out in outputs) == 1, outputs
        assert sum("Already registered" in out for out in outputs) == 2, outputs
    finally:  # the other tests predict with the best fold's version
        client.set_registered_model_alias(MODEL, "candidate", candidate)


# ----------------------------------------------------------------------------------------------------------
# Config checks before any run: hyper-parameter names, infinite and NaN values, the sampler against the space
# (section: config checks)
def test_every_bound_of_the_settings_table_is_refused_just_outside_it_and_accepted_at_its_edge(
    settings, quick, config_io, checks
):
    """Walks checks.ALLOWED itself: for each Bounds, the value just below low (low itself when `above`) and
    `below` itself are refused, naming the key and the bound; the edge values inside are accepted."""
    import math
    import typing

    walked = 0
    for key, bounds in checks.ALLOWED.items():
        if not isinstance(bounds, checks.Bounds):
            continue
        section, name = key.split(".")
        hint = config_io.hints_of(config_io.hints_of(settings.Config)[section])[name]
        whole = int in {hint, *typing.get_args(hint)}
        step_down = (lambda x: x - 1) if whole else (lambda x: math.nextafter(x, -math.inf))
        step_up = (lambda x: x + 1) if whole else (lambda x: math.nextafter(x, math.inf))
        low = int(bounds.low) if whole else float(bounds.low)
        outside = [low if bounds.above else step_down(low)]
        inside = [step_up(low) if bounds.above else low]
        if bounds.below is not None:
            below = int(bounds.below) if whole else float(bounds.below)
            outside.append(below)
            inside.append(step_down(below))
        for value in outside:
            with pytest.raises(SystemExit) as stopped:
                config_io.override(quick, f"{key}={value!r}", "src")
            assert f": {key} should be {bounds}, not {value!r}." in str(stopped.value.code), (key, value)
        for value in inside:
            assert getattr(getattr(config_io.override(quick, f"{key}={value!r}", "src"), section), name) == value
        walked += 1
    assert walked == sum(isinstance(b, checks.Bounds) for b in checks.ALLOWED.values()) >= 15


def test_the_reserved_names_are_the_params_a_fold_run_logs_besides_the_chosen_ones(experiment, settings, checks):
    """RESERVED_NAMES is what run_fold logs itself: a hyper-parameter of one of these names would be logged twice."""
    client = experiment["client"]
    for fold in fold_runs(client, experiment["root"].info.run_id).values():
        assert set(fold.data.params) - SEARCHED == set(checks.RESERVED_NAMES)
        assert set(fold.data.params) & SEARCHED == SEARCHED  # and the chosen ones under their own names


SAID_RESERVED, SAID_REFUSED = "a name other than seed, num_threads", "a name MLflow accepts"  # each refusal
PARAM_NAMES = [
    *((name, SAID_RESERVED) for name in ("seed", "num_threads", "num_workers", "n_train", "n_dev", "n_test")),
    *((name, SAID_REFUSED) for name in ("drop*out", "a/../b", "/lr", "lr%", "x" * 251)),
    *((name, None) for name in ("x" * 250, "lr/warm-up_1.a b")),  # accepted
]
PARAM_IDS = [repr(name) if len(name) < 20 else f"{len(name)} characters" for name, _ in PARAM_NAMES]


@pytest.mark.parametrize(("name", "expected"), PARAM_NAMES, ids=PARAM_IDS)
def test_a_hyper_parameter_name_a_fold_run_logs_itself_or_mlflow_refuses_is_one_sentence(
    name, expected, settings, quick, config_io
):
    """A name is refused exactly where MLflow's log_params would refuse it (its own validation) or where the fold
    run already logs a param of that name; any other name is accepted."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_param  # what log_params runs on every param

    try:
        _validate_param(name, "0")
        mlflow_refuses = False
    except MlflowException:
        mlflow_refuses = True
    assert mlflow_refuses == (expected == SAID_REFUSED)
    assignment = f"model.dropout=Float(0.0, 0.5, name={name!r})"
    if expected is None:
        assert settings.param_name("model.dropout", config_io.override(quick, assignment, "src").model.dropout) == name
        return
    with pytest.raises(SystemExit) as stopped:
        config_io.override(quick, assignment, "src")
    message = str(stopped.value.code)
    assert f": model.dropout = Float(...) name should be {expected}" in message and message.endswith(f"not {name!r}.")
    assert "\n" not in message


NON_FINITE = [
    # --set: 1e999 parses to inf
    ("training.finetune_lr=1e999", r"training.finetune_lr should be a finite number above 0, not inf"),
    ("training.warmup_weight_decay=1e999", r"training.warmup_weight_decay should be a finite number at least 0, "
     r"not inf"),
    ("training.finetune_lr=-1e999", r"training.finetune_lr should be a finite number above 0, not -inf"),
    ("training.finetune_lr=Float(1e-5, 1e999, log=True)", r"training.finetune_lr = Float\(...\) high should be a "
     r"finite number, not inf"),
    ("model.dropout=Float(0.0, 0.5, step=1e999)", r"model.dropout = Float\(...\) step should be a finite number, "
     r"not inf"),
    ("model.dropout=Categorical([0.1, 1e999])", r"model.dropout choice should be a finite number at least 0 and "
     r"below 1, not inf"),
    ("data.shares={'train': 1e999, 'dev': 0.15, 'test': 0.15}", r"data.shares should be a share above 0 .*, finite "
     r"numbers adding up to at most 1, not \{'train': inf"),
    # a config file: float('nan') and float('inf')
    ("training=replace(c.training, finetune_lr=float('nan'))", r"training.finetune_lr should be a finite number "
     r"above 0, not nan"),
    ("training=replace(c.training, warmup_weight_decay=float('inf'))", r"training.warmup_weight_decay should be a "
     r"finite number at least 0, not inf"),
    ("training=replace(c.training, finetune_lr=Float(float('nan'), 1e-3))", r"training.finetune_lr = Float\(...\) "
     r"low should be a finite number, not nan"),
    ("model=replace(c.model, dropout=Categorical([0.1, float('nan')]))", r"model.dropout choice should be a finite "
     r"number at least 0 and below 1, not nan"),
    ("data=replace(c.data, shares={'train': float('nan'), 'dev': 0.15, 'test': 0.15})", r"data.shares should be a "
     r"share above 0 .*, finite numbers adding up to at most 1, not \{'train': nan"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "expected"), NON_FINITE, ids=[change for change, _ in NON_FINITE])
def test_an_infinite_or_nan_number_is_one_sentence_wherever_a_number_is_checked(
    change, expected, settings, quick, tmp_path, config_io
):
    """A --set value (1e999 is inf) or a config file's float('nan'): refused, where it used to pass every check."""
    if "=replace(" in change:  # a config file built on config_quick.py
        path = tmp_path / "non_finite.py"
        path.write_text(
            "from dataclasses import replace\nfrom config_quick import config as c\n"
            f"from settings import Categorical, Float\nconfig = replace(c, {change})\n"
        )
        with pytest.raises(SystemExit) as stopped:
            config_io.load_file(path)
    else:
        with pytest.raises(SystemExit) as stopped:
            config_io.override(quick, change, "src")
    message = str(stopped.value.code)
    assert re.search(expected, message) and "\n" not in message and message.endswith("."), message


def test_the_sampler_draws_the_search_space_twice_before_any_run(settings, quick, capfd, config_io):
    """A sampler that cannot draw the config's hyper-parameters (BruteForceSampler: a Float without a step), or
    lacks a package from its second trial on (CmaEsSampler without cmaes), is refused; the others are accepted,
    and so is BruteForceSampler on a space it can draw. The scratch study says nothing and changes no setting."""
    import importlib.util

    verbosity = optuna.logging.get_verbosity()
    for sampler in ("TPESampler", "RandomSampler", "QMCSampler", "GPSampler", "NSGAIISampler"):
        assert config_io.override(quick, f"search.sampler={sampler}", "src").search.sampler == sampler
    with pytest.raises(SystemExit) as stopped:
        config_io.override(quick, "search.sampler=BruteForceSampler", "src")
    assert str(stopped.value.code).endswith(
        ": search.sampler should be a sampler that can draw this config's hyper-parameters (FloatDistribution.step "
        "must be given for BruteForceSampler (otherwise, the search space will be infinite)), not 'BruteForceSampler'."
    )
    discrete = ["model.dropout=Float(0.0, 0.5, step=0.1)", "training.warmup_lr=Categorical([1e-3, 1e-2])",
                "training.warmup_weight_decay=Categorical([0.0, 0.1])", "training.finetune_lr=1e-3",
                "training.finetune_weight_decay=0.0", "search.sampler=BruteForceSampler"]  # fmt: skip
    assert config_io.load(REPO / "step_5/config_quick.py", discrete)[0].search.sampler == "BruteForceSampler"
    if importlib.util.find_spec("cmaes") is None:
        with pytest.raises(SystemExit, match=r"search.sampler should be .* \(No module named 'cmaes'\), not 'CmaEs"):
            config_io.override(quick, "search.sampler=CmaEsSampler", "src")
    else:
        assert config_io.override(quick, "search.sampler=CmaEsSampler", "src").search.sampler == "CmaEsSampler"
    assert optuna.logging.get_verbosity() == verbosity
    assert capfd.readouterr() == ("", "")


# ----------------------------------------------------------------------------------------------------------
# Images too large to decode safely, and the wording of register.py, predict.py and --from-run
# (section: images and wording)
def test_predict_refuses_an_image_over_pillows_pixel_limit_in_one_sentence(tmp_path, monkeypatch):
    """PNGs of under 100 bytes that say 20000 x 20000 pixels (Pillow raises) and 10000 x 10000 (Pillow only warns):
    each refused in one sentence, by the rule training uses (pets.py), before a model or a store is opened."""
    from test_all_steps import decompression_bomb, too_large

    predict = load_step_module("step_5", "predict")
    files = {tmp_path / "bomb.png": (20000, 20000), tmp_path / "large.jpg": (10000, 10000)}
    for path, size in files.items():
        path.write_bytes(decompression_bomb(*size))
        assert predict.problem(path) == too_large(path, *size)
    message = user_error("step_5/predict.py", [str(path) for path in files], tmp_path, monkeypatch)
    assert message.splitlines() == [too_large(path, *size) for path, size in files.items()]
    assert not (tmp_path / "mlflow.db").exists()


def test_the_served_model_refuses_an_image_over_pillows_pixel_limit_with_a_400():
    """The model behind `mlflow models serve` (photo_model.py) refuses a bomb sent as bytes before decoding it: an
    MlflowException the server answers with status 400 and the sentence, not an out-of-memory decode."""
    from test_all_steps import decompression_bomb

    photo_model = load_step_module("step_5", "photo_model")
    model = photo_model.PetPhotos()
    model.config = {"image_size": 64, "divide_by": 255.0, "mean": [0.5] * 3, "std": [0.5] * 3, "batch_size": 8}
    model.model = None  # never reached: the images are decoded first
    with pytest.raises(mlflow.exceptions.MlflowException) as refused:
        model.predict(None, pd.DataFrame({"image": [decompression_bomb(20000, 20000)]}))
    assert refused.value.get_http_status_code() == 400
    assert refused.value.message == (
        "The image is 20000 x 20000 pixels, more than Pillow decodes safely (89,478,485 pixels): a decompression "
        "bomb, or a photo to scale down first."
    )


def test_a_part_of_a_root_run_given_as_run_id_is_named_with_its_root(experiment, monkeypatch):
    """register.py and analyze_predictions.py given a refit, trial or fold run: one sentence naming the kind of run
    and its root run's id, not "did not complete"."""
    client, root = experiment["client"], experiment["root"].info.run_id
    fold = next(iter(fold_runs(client, root).values()))
    cases = [("register", fold.data.tags["refit_run_id"], "refit"), ("register", fold.info.run_id, "fold"),
             ("analyze_predictions", trials_of(client, root)[0].info.run_id, "trial")]  # fmt: skip
    for script, run_id, level in cases:
        message = user_error(f"step_5/{script}.py", ["--run-id", run_id], experiment["cwd"], monkeypatch)
        expected = f"Run {run_id} is a {level} run, one part of root run {root}: give the root run's id"
        assert message == f"{expected} (the top run in the UI)."


def test_a_step_4_run_is_named_as_not_a_step_5_run(tmp_path, monkeypatch):
    """A step-4 root, fold and refit run (as step_4/train.py tags them): register.py --run-id ROOT, and the refit run
    whose model predict.py --model runs:/REFIT/model would use, are each refused as not step-5 runs."""
    registry = load_step_module("step_5", "registry")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("step_4", artifact_location=(tmp_path / "mlruns").as_uri())
    tags = {"run_key": "k", "root_split_id": "0", "nested_split_id": "0"}
    root = client.create_run(experiment_id, tags={**tags, "run_level": "root", "run_complete": "true"}).info.run_id
    fold = client.create_run(experiment_id, tags={**tags, "run_level": "fold", "mlflow.parentRunId": root})
    refit = client.create_run(experiment_id, tags={"run_level": "refit", "mlflow.parentRunId": fold.info.run_id})
    for run_id in (root, fold.info.run_id, refit.info.run_id):
        client.set_terminated(run_id)
    message = user_error("step_5/register.py", ["--run-id", root], tmp_path, monkeypatch)
    not_step_5 = "is not a step_5 run (its experiment is step_4)"
    assert message == f"Run {root} {not_step_5}: give the id of a root run of step_5/train.py."
    with pytest.raises(SystemExit) as refused:
        registry.runs_of_refit(client, refit.info.run_id)  # what registry.load asks of a runs:/REFIT/model URI
    assert str(refused.value.code).startswith(f"Run {refit.info.run_id} {not_step_5}: ")


def test_predict_names_the_version_that_latest_loaded(registered):
    """--model models:/pets-cat-vs-dog/latest: the version's number is printed, not the word "latest"."""
    client = registered["client"]
    newest = max(int(version.version) for version in client.search_model_versions(f"name = '{MODEL}'"))
    good = str(registered["images"] / registered["test"]["file"][0])
    out = run_script("step_5/predict.py", "--model", f"models:/{MODEL}/latest", good, cwd=registered["cwd"])
    assert f"{MODEL} version {newest}, made from fold " in out.stdout and "version latest" not in out.stdout


def test_register_and_predict_without_runs_say_so_and_leave_no_store(tmp_path, monkeypatch):
    """In a folder without mlflow.db: one sentence, and no empty mlflow.db left behind (MlflowClient would make one)."""
    from PIL import Image

    image = tmp_path / "cat.jpg"
    Image.new("RGB", (64, 64), (90, 60, 30)).save(image)
    for script, argv in (("register", []), ("predict", [str(image)])):
        message = user_error(f"step_5/{script}.py", argv, tmp_path, monkeypatch)
        no_store = f"No MLflow store at {tmp_path / 'mlflow.db'}, so no step-5 run or model here"
        assert message.startswith(no_store) and "\n" not in message, message
        assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("change", ["bytes", "gone"])
def test_from_run_on_other_images_says_the_run_needs_its_own_data(experiment, change, tmp_path, monkeypatch):
    """--from-run where an image the run used changed or is gone: the run can only be reproduced on its own data
    (a new split file would reproduce nothing, so that is not the advice); nothing is run."""
    root = experiment["root"]
    data_dir = tmp_path / "oxfordiii"
    shutil.copytree(Path(root.data.params["data.data_dir"]) / "oxford-iiit-pet", data_dir / "oxford-iiit-pet")
    used = data_dir / "oxford-iiit-pet" / json.loads(artifact(root, "splits/dataset_splits.json"))["files"][3]
    if change == "bytes":
        used.write_bytes(used.read_bytes() + b"\0")  # after the JPEG's end marker: it still decodes the same
    else:
        used.unlink()
    before = len(runs_of(experiment["client"]))
    argv = ["--from-run", root.info.run_id, "--set", f"data.data_dir={data_dir}"]
    message = user_error("step_5/train.py", argv, experiment["cwd"], monkeypatch)
    assert message.startswith(f"Run {root.info.run_id}'s split file: ") and "\n" not in message, message
    assert message.endswith(
        f"these are not the images run {root.info.run_id} used, and a run can only be reproduced on its own data: "
        "put them back, or give their folder with --set data.data_dir=DIR."
    )
    assert len(runs_of(experiment["client"])) == before


# ----------------------------------------------------------------------------------------------------------
# Behaviours guarded by nothing before: each test fails when its bug is planted back (tests/README.md)
# (section: unguarded behaviours)
def test_a_versions_lineage_is_every_tag_of_its_root_runs_record(tmp_path):
    """A root run made in a checkout with uncommitted changes, at a commit that is not this checkout's: the version's
    lineage copies every LINEAGE tag from the run's record (never from the checkout that registers), names the runs,
    the fold, the config's digest and the refit's results, and its description says the code had uncommitted
    changes."""
    registry = load_step_module("step_5", "registry")
    provenance = load_step_module("step_5", "provenance")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("step_5", artifact_location=(tmp_path / "mlruns").as_uri())
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert provenance.git_state(REPO)["commit"] != commit
    record = {key: f"{key} {hashlib.sha256(key.encode()).hexdigest()}" for key in registry.LINEAGE}  # each its own
    record.update(git_commit=commit, git_dirty="true", dataset_synthetic="true")
    root = client.create_run(experiment_id, tags={"run_level": "root", **record})
    config = json.dumps({"training": {"batch_size": 32}})
    client.log_text(root.info.run_id, config, "config/resolved_config.json")
    fold = client.create_run(experiment_id, tags={
        "run_level": "fold", "mlflow.parentRunId": root.info.run_id, "root_split_id": "1", "nested_split_id": "2",
    })  # fmt: skip
    refit = client.create_run(experiment_id, tags={"run_level": "refit", "mlflow.parentRunId": fold.info.run_id})
    for name, value in (("test_roc_auc", 0.8125), ("threshold", 0.4375)):
        client.log_metric(refit.info.run_id, name, value)
    tags = registry.lineage(*registry.runs_of_refit(client, refit.info.run_id))
    assert {key: tags[key] for key in registry.LINEAGE} == {key: record[key] for key in registry.LINEAGE}
    assert (tags["root_run_id"], tags["fold_run_id"], tags["refit_run_id"], tags["fold"]) == (
        root.info.run_id, fold.info.run_id, refit.info.run_id, "1/2"
    )  # fmt: skip
    assert tags["config_digest"] == hashlib.sha256(config.encode()).hexdigest()
    assert (float(tags["test_roc_auc"]), float(tags["threshold"])) == (0.8125, 0.4375)
    described = registry.lineage_text(tags)
    assert f"git commit `{commit[:12]}` with uncommitted changes" in described and "SYNTHETIC STAND-IN" in described
    assert "uncommitted" not in registry.lineage_text({**tags, "git_dirty": "false"})


def test_from_run_takes_the_experiment_from_the_runs_logged_config_not_from_its_file_as_it_is_now(split_file, tmp_path):
    """A run made from a config file of one's own (config_quick.py and the config.py it builds on, copied, with
    the data and one fold of one trial written in), then the file edited: --from-run reruns what the run logged
    (config/resolved_config.json), so the rerun is identical, and the file's new values are nowhere in it."""
    data_dir, path = split_file
    (folder := tmp_path / "configs").mkdir()
    for name in ("config.py", "config_quick.py"):
        (folder / name).write_text((REPO / "step_5" / name).read_text())
    config_file, cwd = folder / "config_quick.py", tmp_path / "work"
    cwd.mkdir()
    with config_file.open("a") as file:  # config_quick.py imports config.py from beside it: the copy
        file.write(
            f"config = replace(config, data=replace(config.data, data_dir={str(data_dir)!r}, split_file={str(path)!r}),"
            " cv=replace(config.cv, n_root_splits=1, n_nested_splits=1), search=replace(config.search, n_trials=1))\n"
        )
    main_captured("step_5/train.py", "--config", str(config_file), cwd=cwd)
    client = client_in(cwd)
    (original,) = runs_of(client, "tags.run_level = 'root'")
    assert original.data.params["config"] == str(config_file) and original.data.params["training.warmup_epochs"] == "2"
    with config_file.open("a") as file:  # edited after the run
        file.write("config = replace(config, training=replace(config.training, warmup_epochs=1, finetune_epochs=1))\n")
    rerun = main_captured("step_5/train.py", "--from-run", original.info.run_id, cwd=cwd)
    assert "Overall: IDENTICAL" in rerun.stdout, rerun.stdout[-2000:]
    (new,) = runs_of(client, f"tags.reproduces = '{original.info.run_id}'")
    logged = [json.loads(artifact(run, "config/resolved_config.json")) for run in (original, new)]
    assert logged[1]["training"] == logged[0]["training"] and logged[1]["training"]["warmup_epochs"] == 2
