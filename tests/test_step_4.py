"""Step 4: a seeded, pruned Optuna search in every fold. The run tree and trial counts, the refit check, the
analysis figures, test labels that never reach the search, a SIGKILL mid-study and its resume, two workers
sharing the trials, and a torn journal record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import (
    REPO,
    client_in,
    command_from_record,
    load_step_module,
    logged_predictions,
    main_in_process,
    run_script,
)
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

SEARCHED = {"head_hidden", "dropout", "warmup_lr", "warmup_weight_decay", "finetune_lr", "finetune_weight_decay"}


def train_args(split_file: tuple[Path, Path], *extra: str) -> list[str]:
    """The quick step-4 command line on the small stand-in and its split file."""
    data_dir, path = split_file
    return ["--quick", "--data-dir", str(data_dir), "--split-file", str(path), "--num-workers", "0", *extra]


def runs_of(client: mlflow.MlflowClient, query: str = "") -> list:
    experiment = client.get_experiment_by_name("step_4")
    return client.search_runs([experiment.experiment_id], query, max_results=1000)


def fold_runs(client: mlflow.MlflowClient) -> dict[tuple[int, int], list]:
    """Completed fold runs by (root split, nested split)."""
    folds: dict[tuple[int, int], list] = {}
    for run in runs_of(client, "tags.run_level = 'fold' AND tags.fold_complete = 'true'"):
        folds.setdefault((int(run.data.tags["root_split_id"]), int(run.data.tags["nested_split_id"])), []).append(run)
    return folds


def refit_of(client: mlflow.MlflowClient, fold: mlflow.entities.Run) -> str:
    """The id of a fold's refit run (it holds the fold's predictions)."""
    query = f"tags.run_level = 'refit' AND tags.mlflow.parentRunId = '{fold.info.run_id}'"
    (refit,) = client.search_runs([fold.info.experiment_id], query)
    return refit.info.run_id


def studies_in(cwd: Path) -> dict[str, optuna.Study]:
    """Every fold's study in the working directory's default journal, by name."""
    storage = JournalStorage(JournalFileBackend(str(cwd / "optuna_studies.journal")))
    names = [name for name in optuna.get_all_study_names(storage) if not name.startswith("claim-")]  # root, refits
    return {name: optuna.load_study(study_name=name, storage=storage) for name in names}


def by_slot(study: optuna.Study) -> dict[int, tuple]:
    """The finished trials of a study by slot: (state, params, value)."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return {t.user_attrs["slot"]: (t.state, t.params, t.value) for t in finished}


@pytest.fixture(scope="module")
def search(step4_search) -> dict:
    """Folds 0/0 and 0/1, three trials each, uninterrupted; then the analysis (conftest.py)."""
    cwd = step4_search["cwd"]
    return {**step4_search, "client": client_in(cwd), "studies": studies_in(cwd)}


def test_run_tree_and_trial_counts(search):
    """root → fold → three trial runs and one refit run → phase runs; one study per fold with three finished
    trials; every run closed; the search setup on the root."""
    client = search["client"]
    (root,) = runs_of(client, "tags.run_level = 'root'")
    assert root.data.tags["run_complete"] == "true"
    folds = fold_runs(client)
    assert sorted(folds) == [(0, 0), (0, 1)] and all(len(runs) == 1 for runs in folds.values())
    assert not runs_of(client, "attributes.status = 'RUNNING'")
    assert len(search["studies"]) == 2
    for (fold,) in folds.values():
        assert fold.data.tags["mlflow.parentRunId"] == root.info.run_id
        children = runs_of(client, f"tags.mlflow.parentRunId = '{fold.info.run_id}'")
        trials = [r for r in children if r.data.tags["run_level"] == "trial"]
        refits = [r for r in children if r.data.tags["run_level"] == "refit"]
        assert len(trials) == 3 and len(refits) == 1 and len(children) == 4
        assert sorted(int(t.data.tags["trial_number"]) for t in trials) == [0, 1, 2]
        assert all(set(t.data.params) == SEARCHED for t in trials)
        study = search["studies"][fold.data.tags["optuna_study"]]
        states = {t.number: t.state.name for t in study.trials}
        assert sorted(by_slot(study)) == [0, 1, 2] and len(states) == 3
        for trial in trials:  # each trial run says how its Optuna trial ended
            assert trial.data.tags["trial_state"] == states[int(trial.data.tags["trial_number"])]
            phases = runs_of(client, f"tags.mlflow.parentRunId = '{trial.info.run_id}'")
            assert {p.data.tags["phase"] for p in phases} <= {"warmup", "finetune"} and phases
        phases = runs_of(client, f"tags.mlflow.parentRunId = '{refits[0].info.run_id}'")
        assert sorted(p.data.tags["phase"] for p in phases) == ["finetune", "warmup"]
        assert {k: float(v) for k, v in refits[0].data.params.items()} == pytest.approx(study.best_params)
        assert {name: float(fold.data.params[name]) for name in SEARCHED} == pytest.approx(study.best_params)


def test_pruned_trials_show_as_pruned(search):
    """Pruned trials are PRUNED in Optuna and FINISHED with tag trial_state=PRUNED in MLflow, with their curves."""
    states = [t.state for study in search["studies"].values() for t in study.trials]
    assert TrialState.PRUNED in states  # on this stand-in some trials fall behind the first one
    pruned = runs_of(search["client"], "tags.trial_state = 'PRUNED'")
    assert len(pruned) == states.count(TrialState.PRUNED)
    assert all(run.info.status == "FINISHED" and "dev_roc_auc" not in run.data.metrics for run in pruned)


def test_refit_reproduces_the_best_trial_exactly(search):
    """The refit trains as the best trial did: same dev ROC AUC to the last bit, tagged on the fold run."""
    for (fold,) in fold_runs(search["client"]).values():
        study = search["studies"][fold.data.tags["optuna_study"]]
        assert fold.data.tags["refit_check"] == "identical"
        assert fold.data.tags["best_trial_number"] == str(study.best_trial.number)
        assert fold.data.metrics["dev_roc_auc"] == study.best_value
        assert fold.data.metrics["refit_dev_roc_auc_difference"] == 0.0
    assert "WARNING" not in search["first"].stderr


def test_analysis_shows_the_searches_and_the_chosen_values(search):
    client = search["client"]
    (root,) = runs_of(client, "tags.run_level = 'root'")
    files = {a.path for a in client.list_artifacts(root.info.run_id, "figures/search")}
    assert files == {
        f"figures/search/fold-0-{n}_{kind}.png" for n in (0, 1) for kind in ("history", "epochs", "importances")
    }
    assert "figures/chosen_hyperparameters.png" in {a.path for a in client.list_artifacts(root.info.run_id, "figures")}
    setup = mlflow.artifacts.load_dict(f"{root.info.artifact_uri}/search/search_setup.json")
    assert set(setup["search_space"]) == SEARCHED and setup["n_trials"] == 3
    out = search["analysis"].stdout
    assert "Hyper-parameters chosen by each fold's search" in out
    for (fold,) in fold_runs(client).values():
        assert f"{float(fold.data.params['dropout']):.3g}" in out
    assert "Model check: 2 of 2 fold models reproduce their logged test scores bit for bit" in out


def test_test_labels_never_reach_the_search(search, split_file, tmp_path, monkeypatch):
    """Every test label of outer fold 0 flipped: the search makes exactly the same trials and choice, and only the
    test ROC AUC changes (to 1 - the original: proof that the flipped labels were used where they belong)."""
    train = load_step_module("step_4", "train")
    real_load_splits = train.load_splits

    def flipped_test_labels(*args, **kwargs) -> dict:
        splits = real_load_splits(*args, **kwargs)
        test = splits["root_splits"][0]["test"]
        splits["labels"] = splits["labels"].copy()
        splits["labels"][test] = 1 - splits["labels"][test]
        return splits

    monkeypatch.setattr(train, "load_splits", flipped_test_labels)
    main_in_process(train, train_args(split_file, "--root-split", "0", "--nested-split", "0"), tmp_path, monkeypatch)
    (scrambled,) = fold_runs(client_in(tmp_path))[(0, 0)]
    (original,) = fold_runs(search["client"])[(0, 0)]
    (study,) = studies_in(tmp_path).values()
    assert by_slot(study) == by_slot(search["studies"][original.data.tags["optuna_study"]])
    assert {k: scrambled.data.params[k] for k in SEARCHED} == {k: original.data.params[k] for k in SEARCHED}
    assert scrambled.data.metrics["dev_roc_auc"] == original.data.metrics["dev_roc_auc"]
    assert scrambled.data.metrics["test_roc_auc"] == pytest.approx(1 - original.data.metrics["test_roc_auc"])


def test_a_refit_that_differs_is_tagged_and_reported(split_file, tmp_path, monkeypatch, capsys):
    """A refit that does not start from the trials' seeded state (planted here) cannot retrace the best trial:
    the fold run says so (tag and metric) and the command warns."""
    train = load_step_module("step_4", "train")
    real_train_and_evaluate = train.train_and_evaluate

    def unseeded_refit(*args, **kwargs) -> dict:
        train.torch.manual_seed(12345)
        return real_train_and_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "train_and_evaluate", unseeded_refit)
    args = train_args(split_file, "--root-split", "1", "--nested-split", "0", "--n-trials", "1")
    main_in_process(train, args, tmp_path, monkeypatch)
    (fold,) = fold_runs(client_in(tmp_path))[(1, 0)]
    assert fold.data.tags["refit_check"] == "differs"
    assert fold.data.metrics["refit_dev_roc_auc_difference"] != 0
    assert "WARNING fold 1/0: the refit reached dev ROC AUC" in capsys.readouterr().err


def test_sigkill_mid_study_then_rerun_keeps_every_finished_trial(search, split_file, tmp_path):
    """SIGKILL while fold 0/1's study has a finished and a running trial; the same command again fails the
    killed trial, redoes it, and ends with the uninterrupted run's trials, choice, metrics and predictions. The
    command is rebuilt from the uninterrupted run's record alone (conftest.command_from_record), so this also shows
    that the record says what ran."""
    (original,) = fold_runs(search["client"])[(0, 1)]
    args = command_from_record(search["client"], original, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "step_4/train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    journal, deadline, killed_at = tmp_path / "optuna_studies.journal", time.monotonic() + 300, None
    while killed_at is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if journal.exists() and (found := studies_in(tmp_path)):
            (study,) = found.values()
            states = [t.state for t in study.get_trials(deepcopy=False)]
            if TrialState.RUNNING in states and len(states) >= 2:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = states
    seen = proc.communicate(timeout=60)[0]
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, seen[-3000:]
    client = client_in(tmp_path)
    assert runs_of(client, "attributes.status = 'RUNNING'")  # the kill left runs RUNNING

    resumed = run_script("step_4/train.py", *args, cwd=tmp_path)
    assert "left RUNNING by a process that no longer exists: marked FAIL, redone" in resumed.stdout
    (study,) = studies_in(tmp_path).values()
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states
    assert len(by_slot(study)) == 3  # slots 0, 1, 2: three finished trials, none twice
    assert by_slot(study) == by_slot(search["studies"][original.data.tags["optuna_study"]])
    (fold,) = fold_runs(client)[(0, 1)]
    assert fold.data.metrics == original.data.metrics
    refits = [refit_of(c, run) for c, run in ((client, fold), (search["client"], original))]
    assert logged_predictions(client, refits[0], tmp_path) == logged_predictions(search["client"], refits[1], tmp_path)
    assert not runs_of(client, "attributes.status = 'RUNNING'")


def test_two_workers_share_the_trials(search, split_file, tmp_path):
    """Two processes at once on one fold: one experiment, one study, exactly three finished trials with the
    values one process draws, no trial left running, the fold refitted."""
    args = train_args(split_file, "--root-split", "0", "--nested-split", "0", "--num-threads", "1")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "step_4/train.py"), *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    client = client_in(tmp_path)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "step_4"]
    (study,) = studies_in(tmp_path).values()
    assert TrialState.RUNNING not in [t.state for t in study.trials]
    finished = by_slot(study)
    assert sorted(finished) == [0, 1, 2]
    (original,) = fold_runs(search["client"])[(0, 0)]
    expected = by_slot(search["studies"][original.data.tags["optuna_study"]])
    assert {slot: params for slot, (_, params, _) in finished.items()} == {
        slot: params for slot, (_, params, _) in expected.items()
    }  # the same draws; which trials get pruned depends on which finish first
    trials_per_worker = [sum(line.startswith("trial ") for line in output.splitlines()) for output in outputs]
    assert all(count >= 1 for count in trials_per_worker), trials_per_worker  # both did some of the work
    assert fold_runs(client)[(0, 0)]
    assert not runs_of(client, "attributes.status = 'RUNNING'")


def test_a_torn_last_journal_record_is_repaired_and_nothing_is_lost(tmp_path, capsys):
    """Half a record at the end (a writer killed mid-write): the next record is appended onto it, unreadable, and
    the next trial fails. open_storage moves it aside; every trial loads, before and after new ones."""
    studies = load_step_module("step_4", "studies")

    def journal_storage(path: Path) -> JournalStorage:
        return JournalStorage(JournalFileBackend(str(path)))

    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1)

    journal = tmp_path / "optuna_studies.journal"
    study = optuna.create_study(study_name="s", storage=journal_storage(journal))
    study.optimize(objective, n_trials=3)
    before, whole = [t.params for t in study.trials], journal.read_bytes()
    torn = whole + b'{"op_code":5,"worker_id":"x","trial_id":3,"para'
    unrepaired = tmp_path / "unrepaired.journal"
    unrepaired.write_bytes(torn)
    with pytest.raises(AttributeError):  # the new trial's record went onto the torn line: Optuna cannot read it
        optuna.load_study(study_name="s", storage=journal_storage(unrepaired)).optimize(objective, n_trials=1)

    journal.write_bytes(torn)
    storage = studies.open_storage(str(journal))
    assert "removed its last record" in capsys.readouterr().out
    assert journal.read_bytes() == whole
    assert len(list(tmp_path.glob("optuna_studies.journal.torn-*"))) == 1
    optuna.load_study(study_name="s", storage=storage).optimize(objective, n_trials=1)
    loaded = optuna.load_study(study_name="s", storage=journal_storage(journal))
    assert [t.params for t in loaded.trials[:3]] == before and len(loaded.trials) == 4


def test_a_damaged_record_inside_the_journal_is_refused_with_how_to_repair(tmp_path):
    studies = load_step_module("step_4", "studies")
    journal = tmp_path / "optuna_studies.journal"
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(journal))))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    lines = journal.read_bytes().split(b"\n")
    lines[2] = lines[2][:10]
    journal.write_bytes(b"\n".join(lines))
    with pytest.raises(SystemExit, match=r"optuna_studies.journal, line 3: not a readable Optuna journal record"):
        studies.open_storage(str(journal))


def test_each_trial_draws_from_its_own_seeded_sampler():
    """The sampler depends on (seed, fold, slot) only: another slot, fold or seed draws other values."""
    train = load_step_module("step_4", "train")

    def draw(seed: int, fold: tuple[int, int], slot: int) -> dict:
        study = optuna.create_study(direction="maximize", sampler=train.sampler(seed, fold, slot))
        return train.suggest(study.ask(), train.SEARCH_SPACE)

    assert draw(0, (0, 0), 1) == draw(0, (0, 0), 1)
    others = [draw(1, (0, 0), 1), draw(0, (0, 1), 1), draw(0, (1, 0), 1), draw(0, (0, 0), 2)]
    assert all(other != draw(0, (0, 0), 1) for other in others)
    assert len({d["dropout"] for d in others}) == 4


def test_bad_storage_is_one_sentence_before_any_work(tmp_path, monkeypatch):
    train = load_step_module("step_4", "train")
    monkeypatch.chdir(tmp_path)
    cases = ((str(tmp_path), "give a journal file"), ("no/such/dir/x.journal", "in an existing folder"))
    for storage, expected in cases:
        with pytest.raises(SystemExit, match=f"--storage {storage}: .*{expected}"):
            train.main(["--quick", "--storage", storage])
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no journal
