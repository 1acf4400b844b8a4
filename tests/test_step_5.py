"""Step 5: the experiment in a config file. Hyper-parameters resolved per trial, --set overrides, every config
error as one sentence before any work, the logged config, --from-run (an identical rerun and a detected
difference), the reproducibility report, and step 5 with the default config choosing exactly what step 4 chose."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import REPO, client_in, load_step_module, main_in_process, run_script

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
    """Folds 0/0 and 0/1 with the quick config, three trials each; then the analysis."""
    cwd = tmp_path_factory.mktemp("step5")
    first = run_script("step_5/train.py", *train_args(split_file, "--set", "cv.n_root_splits=1"), cwd=cwd)
    analysis = run_script("step_5/analyze_predictions.py", cwd=cwd)
    client = client_in(cwd)
    (root,) = runs_of(client, "tags.run_level = 'root'")
    return {"cwd": cwd, "first": first, "analysis": analysis, "client": client, "root": root}


# ----------------------------------------------------------------------------------------------------------
# Config resolution and overrides (units)
@pytest.fixture(scope="module")
def settings():
    return load_step_module("step_5", "settings")


@pytest.fixture(scope="module")
def quick(settings):
    return settings.load_file(REPO / "step_5/config_quick.py")[0]


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


def test_overrides_are_typed_and_a_json_config_round_trips(settings, quick):
    config = quick
    for assignment in ("training.batch_size=16", "training.warmup_lr=1", "data.split_file=None",
                       "model.dropout=Float(0.1, 0.2)", "data.data_dir=2024", "search.pruner_options={}",
                       "search.pruner=NopPruner"):  # fmt: skip
        config = settings.override(config, assignment, "test")
    assert config.training.batch_size == 16 and config.data.split_file is None and config.data.data_dir == "2024"
    assert config.training.warmup_lr == 1.0 and isinstance(config.training.warmup_lr, float)
    assert config.model.dropout == settings.Float(0.1, 0.2)
    assert "warmup_lr" not in settings.search_space(config)  # a fixed value is no longer searched
    assert settings.from_json(json.loads(settings.dumps(config)), "test") == config
    assert settings.from_json(json.loads(settings.dumps(quick)), "test") == quick


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


# ----------------------------------------------------------------------------------------------------------
# What is logged
def test_the_config_file_its_resolution_and_the_overrides_are_logged(experiment, settings, quick):
    client, root = experiment["client"], experiment["root"]
    assert root.data.tags["run_complete"] == "true" and not runs_of(client, "attributes.status = 'RUNNING'")
    for name in ("config.py", "config_quick.py"):  # the file as written, and the one it builds on
        assert artifact(root, f"config/{name}") == (REPO / "step_5" / name).read_text()
    overrides = root.data.tags["config_overrides"]
    assert overrides.endswith("cv.n_root_splits=1") and "data.data_dir=" in overrides
    resolved = settings.from_json(json.loads(artifact(root, "config/resolved_config.json")), "logged")
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
    experiment_id = client.create_experiment("step_5")
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
def test_the_report_says_what_the_records_say(experiment):
    client, root = experiment["client"], experiment["root"]
    report = artifact(root, "analysis/reproducibility_report.md")
    assert report.strip() in experiment["analysis"].stdout
    tags = root.data.tags
    for value in (tags["command"], tags["git_commit"], tags["dataset_digest"], tags["split_file_digest"],
                  tags["env.cpu_model"], f"Python {tags['env.python']}", "SYNTHETIC STAND-IN", "3 outer x 3 inner",
                  "deterministic algorithms on, seed 0", "ops without a deterministic kernel: none",
                  "Categorical [32, 64, 128]", "Float 0.0003 to 0.003, log scale", "2 identical",
                  "interval none (one outer fold"):  # fmt: skip
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
