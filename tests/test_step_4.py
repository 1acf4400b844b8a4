"""Step 4: a seeded, pruned Optuna search in every fold. The run tree and trial counts, the refit check, the
analysis figures, a scrambled test split that reaches no decision, a SIGKILL mid-study and its resume, two workers
sharing the trials, torn and damaged journal records, stop signals while waiting, every input of the study and run
keys, and a root run whose record was never written."""

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
    SIDE_BY_SIDE,
    client_in,
    command_from_record,
    load_step_module,
    logged_predictions,
    main_in_process,
    run_script,
    scramble_test_split,
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


def test_the_test_split_reaches_no_decision(search, split_file, tmp_path, monkeypatch):
    """Every test label of outer fold 0 flipped and every test image replaced by noise: the search makes exactly
    the same trials and choice, the refit stops at the same epoch with the same dev predictions and threshold, and
    only the test results change (proof that the scrambled test split was used where it belongs)."""
    train = load_step_module("step_4", "train")
    scramble_test_split(train, 0, tmp_path, monkeypatch)
    main_in_process(train, train_args(split_file, "--root-split", "0", "--nested-split", "0"), tmp_path, monkeypatch)
    client = client_in(tmp_path)
    (scrambled,) = fold_runs(client)[(0, 0)]
    (original,) = fold_runs(search["client"])[(0, 0)]
    (study,) = studies_in(tmp_path).values()
    assert by_slot(study) == by_slot(search["studies"][original.data.tags["optuna_study"]])  # trials, pruning
    assert {k: scrambled.data.params[k] for k in SEARCHED} == {k: original.data.params[k] for k in SEARCHED}
    for metric in ("dev_roc_auc", "threshold"):
        assert scrambled.data.metrics[metric] == original.data.metrics[metric], metric
    new = client.get_run(refit_of(client, scrambled))
    old = search["client"].get_run(refit_of(search["client"], original))
    assert {t: new.data.tags[t] for t in ("best_phase", "best_epoch")} == {
        t: old.data.tags[t] for t in ("best_phase", "best_epoch")
    }  # early stopping kept the same epoch
    predictions = logged_predictions(client, new.info.run_id, tmp_path / "new")
    before = logged_predictions(search["client"], old.info.run_id, tmp_path / "old")
    assert predictions["dev"] == before["dev"] and predictions["test"] != before["test"]
    assert scrambled.data.metrics["test_roc_auc"] != original.data.metrics["test_roc_auc"]


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


def workers_at_once(args: list[str], cwd: Path, n: int = 2) -> list[str]:
    """`python step_4/train.py ARGS` started n times at once from cwd; their printouts, each ended without error."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "step_4/train.py"), *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, **SIDE_BY_SIDE, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        for _ in range(n)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    return outputs


def test_two_workers_share_the_trials(search, split_file, tmp_path):
    """Two processes at once on one fold: one experiment, one study, exactly three finished trials with the
    values one process draws, no trial left running, the fold refitted."""
    args = train_args(split_file, "--root-split", "0", "--nested-split", "0", "--num-threads", "1")
    outputs = workers_at_once(args, tmp_path)
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


def test_more_trials_later_refit_the_new_best_once_and_complete_the_new_root(split_file, tmp_path):
    """One trial, then three on the same study by two workers at once (the README's "more trials"): the new root's
    fold is refitted exactly once, with its own best trial (trial 2, which beats trial 0), tested and complete, and
    the new root is complete; both workers end without error."""
    one_fold = ("--n-root-splits", "1", "--n-nested-splits", "1", "--seed", "6", "--no-pruning", "--num-threads", "1")
    run_script("step_4/train.py", *train_args(split_file, *one_fold, "--n-trials", "1"), cwd=tmp_path)
    outputs = workers_at_once(train_args(split_file, *one_fold, "--n-trials", "3"), tmp_path)
    client = client_in(tmp_path)
    roots = {run.data.params["n_trials"]: run for run in runs_of(client, "tags.run_level = 'root'")}
    assert sorted(roots) == ["1", "3"] and all(r.data.tags.get("run_complete") == "true" for r in roots.values())
    new_root = roots["3"].info.run_id
    folds = runs_of(client, f"tags.run_level = 'fold' AND tags.mlflow.parentRunId = '{new_root}'")
    (complete,) = [run for run in folds if run.data.tags.get("fold_complete") == "true"]
    refits = [
        run
        for fold in folds
        for run in runs_of(client, f"tags.run_level = 'refit' AND tags.mlflow.parentRunId = '{fold.info.run_id}'")
    ]
    assert len(refits) == 1 and complete.data.tags["best_trial_number"] == "2"  # refitted once, with the new best
    assert complete.data.tags["refit_check"] == "identical" and "test_roc_auc" in complete.data.metrics
    assert sum("refitted by another process" in output for output in outputs) == 1
    assert not runs_of(client, "attributes.status = 'RUNNING'")


def test_a_torn_last_journal_record_is_repaired_and_nothing_is_lost(tmp_path, capsys):
    """Half a record at the end (a writer killed mid-write): the next record is appended onto it, unreadable, and
    the next trial fails. open_storage moves it aside; every trial loads, before and after new ones."""
    sharing = load_step_module("step_4", "sharing")

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
    storage = sharing.open_storage(str(journal))
    assert "removed its last record" in capsys.readouterr().out
    assert journal.read_bytes() == whole
    assert len(list(tmp_path.glob("optuna_studies.journal.torn-*"))) == 1
    optuna.load_study(study_name="s", storage=storage).optimize(objective, n_trials=1)
    loaded = optuna.load_study(study_name="s", storage=journal_storage(journal))
    assert [t.params for t in loaded.trials[:3]] == before and len(loaded.trials) == 4


def test_a_damaged_record_inside_the_journal_is_refused_with_how_to_repair(tmp_path):
    """A damaged record before the last one is not cut by itself: the file is left as it is, and the message names
    the line and says to cut the file just before it (what that repair gives: the test after the next ones)."""
    sharing = load_step_module("step_4", "sharing")
    journal = tmp_path / "optuna_studies.journal"
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(journal))))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    lines = journal.read_bytes().split(b"\n")
    lines[2] = lines[2][:10]
    journal.write_bytes(damaged := b"\n".join(lines))
    expected = r"journal, line 3: not a readable Optuna journal record.* cut it just before that line \(e.g. head -n 2 "
    with pytest.raises(SystemExit, match=expected):
        sharing.open_storage(str(journal))
    assert journal.read_bytes() == damaged


def test_each_trial_draws_from_its_own_seeded_sampler(tmp_path, monkeypatch):
    """The sampler of a trial depends on (seed, fold, slot) only: another slot, fold or seed draws other values."""
    train = load_step_module("step_4", "train")
    use_own_store(tmp_path, monkeypatch)

    def draw(seed: int, fold: tuple[int, int], slot: int) -> dict:  # the trial in `slot` of a search run as train.py's
        study = optuna.create_study(direction="maximize")
        objective = lambda trial: train.suggest(trial, train.SEARCH_SPACE)["dropout"]  # noqa: E731
        with mlflow.start_run():
            train.studies.run_trials(study, objective, slot + 1, optuna.samplers.TPESampler, (seed, *fold))
        return study.trials[slot].params

    assert draw(0, (0, 0), 1) == draw(0, (0, 0), 1)
    others = [draw(1, (0, 0), 1), draw(0, (0, 1), 1), draw(0, (1, 0), 1), draw(0, (0, 0), 2)]
    assert all(other != draw(0, (0, 0), 1) for other in others)
    assert len({d["dropout"] for d in others}) == 4


def test_bad_storage_is_one_sentence_before_any_work(tmp_path, monkeypatch):
    train = load_step_module("step_4", "train")
    monkeypatch.chdir(tmp_path)
    cases = (
        (str(tmp_path), "give a journal file"),
        ("no/such/dir/x.journal", "in an existing folder"),
        ("/proc/x.journal", "cannot create or open this journal file"),  # a folder no one can write in
    )
    for storage, expected in cases:
        with pytest.raises(SystemExit, match=f"--storage {storage}: .*{expected}"):
            train.main(["--quick", "--storage", storage])
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no journal


def use_own_store(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow calls made in this process go to folder's default store (folder/mlflow.db), as in main_in_process."""
    monkeypatch.chdir(folder)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)


def test_a_trial_torn_before_its_owner_was_recorded_is_redone_not_waited_for(tmp_path, monkeypatch, capsys):
    """A worker killed right after asking for a trial: the journal ends with the record that creates the trial and
    half of the next one (its host). The torn half is moved aside, which leaves the trial RUNNING with no host or
    pid to check. Asked long ago (an hour, in its record), it is failed and its slot redone: the search ends."""
    import datetime
    import json
    import threading

    studies = load_step_module("step_4", "studies")
    use_own_store(tmp_path, monkeypatch)
    journal, sampler = tmp_path / "optuna_studies.journal", optuna.samplers.RandomSampler

    def search(n_trials: int) -> None:
        study = optuna.load_study(study_name="s", storage=studies.sharing.open_storage(str(journal)))
        with mlflow.start_run():  # run_trials records the active (fold) run on each trial
            studies.run_trials(study, lambda t: t.suggest_float("x", 0, 1), n_trials, sampler, (0,))

    optuna.create_study(study_name="s", storage=studies.sharing.open_storage(str(journal)), direction="maximize")
    search(2)
    lines = journal.read_bytes().splitlines(keepends=True)
    created = [i for i, line in enumerate(lines) if json.loads(line)["op_code"] == 4]  # CREATE_TRIAL records
    record = json.loads(lines[created[1]])  # trial 1's; the killed worker asked for it an hour ago
    record["datetime_start"] = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)).isoformat()
    host_record = lines[created[1] + 1]
    assert b'"host"' in host_record
    journal.write_bytes(b"".join(lines[: created[1]]) + json.dumps(record).encode() + b"\n" + host_record[:40])

    outcome: dict[str, object] = {}

    def search_to_the_end() -> None:  # in a thread, so that a search that waits for ever fails the test
        try:
            search(2)
            outcome["done"] = True
        except BaseException as error:  # noqa: BLE001 - shown by the assertion below
            outcome["error"] = error

    worker = threading.Thread(target=search_to_the_end, daemon=True)
    worker.start()
    worker.join(timeout=120)
    out = capsys.readouterr().out
    assert not worker.is_alive(), f"the search still waits for the torn trial:\n{out}"
    assert outcome == {"done": True}, outcome
    assert "Repaired" in out and "trial 1 was left RUNNING without a pid" in out
    study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[2].user_attrs["slot"] == 1  # the torn trial's slot, redone


def test_sigterm_while_waiting_for_other_workers_trials_stops_at_once(search, split_file, tmp_path):
    """Every slot of fold 0/0's study is held (three finished trials and a fourth RUNNING in a live process: this
    test), so the command waits for it. SIGTERM then ends the command with its one-sentence message, its runs
    KILLED and no Optuna trial of its own left RUNNING."""
    import shutil
    import socket

    shutil.copy(search["cwd"] / "optuna_studies.journal", tmp_path)  # a fresh MLflow store: the fold is not done
    ((name, study),) = [(name, study) for name, study in studies_in(tmp_path).items() if "-fold-0-0-" in name]
    held = study.ask()
    for key, value in {"host": socket.gethostname(), "pid": str(os.getpid()), "slot": 3}.items():
        held.set_user_attr(key, value)
    args = train_args(split_file, "--root-split", "0", "--nested-split", "0", "--n-trials", "4")
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "step_4/train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env,
    )  # fmt: skip
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "waiting for the trials running in other processes" in line:
                os.killpg(proc.pid, signal.SIGTERM)
                break
        seen.append(proc.communicate(timeout=60)[0])  # the timeout only keeps a process that ignores it from hanging
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(seen)
    assert proc.returncode not in (0, None), output[-3000:]
    assert "SIGTERM received" in output and "Stopped by a signal: run " in output, output[-3000:]
    client = client_in(tmp_path)
    assert not runs_of(client, "attributes.status = 'RUNNING'")
    stopped = [run for run in runs_of(client) if run.data.tags["run_level"] in ("root", "fold")]
    assert len(stopped) == 2 and {run.info.status for run in stopped} == {"KILLED"}
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna_studies.journal")))
    running = [
        (study.study_name, trial.number)
        for study in optuna.get_all_study_summaries(storage)
        for trial in optuna.load_study(study_name=study.study_name, storage=storage).trials
        if trial.state == TrialState.RUNNING
    ]
    assert running == [(name, held.number)]  # only this test's trial


def test_cutting_the_journal_before_a_damaged_record_as_advised_keeps_the_trials_consistent(
    search, tmp_path, monkeypatch
):
    """A real journal (folds 0/0 and 0/1) with the record that creates fold 0/1's second trial damaged. The command
    the message gives, run as it stands, leaves every remaining trial as it was; fold 0/1's search then completes,
    with the same values in every slot, and its refit can be claimed. (Deleting only that line, the old advice, put
    later records on the wrong trials: a trial RUNNING without any, and the refit claim stuck RUNNING.)"""
    import json
    import re
    import shutil

    studies = load_step_module("step_4", "studies")
    train = load_step_module("step_4", "train")
    use_own_store(tmp_path, monkeypatch)
    journal = Path(shutil.copy(search["cwd"] / "optuna_studies.journal", tmp_path))
    (name,) = [name for name in search["studies"] if "-fold-0-1-" in name]
    original = search["studies"][name]
    lines = journal.read_bytes().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    study_id = [r["study_name"] for r in records if r["op_code"] == 0].index(name)  # studies: numbered as created
    creating = [i for i, r in enumerate(records) if r["op_code"] == 4 and r["study_id"] == study_id]  # its trials
    lines[creating[1]] = lines[creating[1]][:10] + b"\n"
    journal.write_bytes(b"".join(lines))
    with pytest.raises(SystemExit) as refused:
        studies.sharing.open_storage(str(journal))
    (command,) = re.findall(r"\(e\.g\. ([^)]*)\)", str(refused.value))
    subprocess.run(command, shell=True, check=True, cwd=tmp_path)

    study = optuna.load_study(study_name=name, storage=studies.sharing.open_storage(str(journal)))
    kept = [(t.number, t.state, t.params, t.value, t.user_attrs) for t in study.trials]
    assert kept == [(t.number, t.state, t.params, t.value, t.user_attrs) for t in original.trials[: len(kept)]]
    assert kept  # the trial before the damaged record is kept
    value_of = {t.user_attrs["slot"]: t.value for t in original.trials}

    def objective(trial: optuna.Trial) -> float:  # the original trial's value for the slot: no training needed
        train.suggest(trial, train.QUICK_SEARCH_SPACE)
        return value_of[trial.user_attrs["slot"]]

    fold = (0, 1)
    with mlflow.start_run():
        studies.run_trials(study, objective, 3, optuna.samplers.TPESampler, (train.DEFAULT_SEED, *fold))
        (fold_run,) = fold_runs(search["client"])[fold]
        key = fold_run.data.tags["run_key"]  # its refit claim was recorded after the cut: it is free again
        with studies.sharing.refit_once(study, key) as mine:
            assert mine  # this process refits the fold
    assert TrialState.RUNNING not in [t.state for t in study.trials]
    assert {slot: params for slot, (_, params, _) in by_slot(study).items()} == {
        slot: params for slot, (_, params, _) in by_slot(original).items()
    }


def test_a_refit_that_fails_gives_its_claim_up_and_a_refit_done_is_not_done_again(tmp_path, monkeypatch):
    """sharing.refit_once: a refit that raises gives its claim up as it stops, so the next worker (here, the same
    live process) claims the refit at once instead of waiting for it; a refit that ends without an error is done for
    that root run key, and not again; another root run key refits for itself."""
    sharing = load_step_module("step_4", "sharing")
    use_own_store(tmp_path, monkeypatch)
    journal = str(tmp_path / "optuna_studies.journal")
    study = optuna.create_study(study_name="s", storage=sharing.open_storage(journal), direction="maximize")

    def waits(seconds: float) -> None:
        raise AssertionError("refit_once waited for a claim that no live refit holds")

    monkeypatch.setattr(sharing.runs, "pause", waits)
    with mlflow.start_run():  # the fold run, RUNNING in this live process, as in train.py
        with pytest.raises(RuntimeError, match="the refit failed"), sharing.refit_once(study, "key") as mine:
            assert mine
            raise RuntimeError("the refit failed")
        with sharing.refit_once(study, "key") as mine:
            assert mine  # claimed at once: the failed claim was given up
        with sharing.refit_once(study, "key") as mine:
            assert not mine  # done
        with sharing.refit_once(study, "another-key") as mine:
            assert mine


def test_a_stop_while_waiting_for_a_slot_fails_the_asked_trial_without_starting_it(tmp_path, monkeypatch):
    """A stop signal arrives just after this process asked for a trial, while it waits for another live process's
    trial to choose its slot: the asked trial is told FAIL (not left RUNNING) and its training never starts."""
    import socket

    studies = load_step_module("step_4", "studies")
    use_own_store(tmp_path, monkeypatch)
    study = optuna.create_study(
        study_name="s",
        storage=studies.sharing.open_storage(str(tmp_path / "optuna_studies.journal")),
        direction="maximize",
    )
    choosing = study.ask()  # another live worker's trial (this process's pid), which has not chosen its slot yet
    choosing.set_user_attr("host", socket.gethostname())
    choosing.set_user_attr("pid", str(os.getpid()))
    real_ask, started = study.ask, []

    def ask_then_signal() -> optuna.Trial:
        trial = real_ask()
        studies.runs.STOP_REQUESTED.set()  # what the SIGTERM handler does
        return trial

    def objective(trial: optuna.Trial) -> float:
        started.append(trial.number)
        studies.runs.check_stop()  # as the training loop does after its first batch
        return 0.0

    monkeypatch.setattr(study, "ask", ask_then_signal)
    try:
        with mlflow.start_run(), pytest.raises(studies.runs.StopRequested):
            studies.run_trials(study, objective, 2, optuna.samplers.RandomSampler, (0,))
    finally:
        studies.runs.STOP_REQUESTED.clear()
    assert started == []
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL]


def test_a_stop_while_waiting_for_the_mlflow_store_lock_ends_the_command(tmp_path, monkeypatch):
    """Another process holds the lock next to mlflow.db: a stop signal ends the wait with one sentence, and the
    other process's lock stays."""
    import re

    runs = load_step_module("step_4", "runs")
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: f"sqlite:///{tmp_path / 'mlflow.db'}")
    lock = tmp_path / "mlflow.db.lock"
    lock.touch()
    runs.STOP_REQUESTED.set()
    expected = f"Stopped by a signal while waiting for {re.escape(str(lock))}, .* nothing was started"
    with pytest.raises(SystemExit, match=expected), runs.store_lock():
        pass
    assert lock.exists()


# ----------------------------------------------------------------------------------------------------------
# The study and run keys, and a root run's record (tests/README.md lists the bugs these catch)
def stub_fold(fold, splits, settings, space, args, device, key, study_name) -> None:
    """run_fold without the search: a complete fold run keyed like the real one, naming the study it would use."""
    tags = {"run_level": "fold", "root_split_id": str(fold[0]), "nested_split_id": str(fold[1]), "run_key": key,
            "optuna_study": study_name, "fold_complete": "true"}  # fmt: skip
    with mlflow.start_run(run_name=f"fold-{fold[0]}-{fold[1]}", nested=True, tags=tags):
        pass


def test_every_input_of_the_study_and_run_keys_makes_a_new_run(split_file, tmp_path, monkeypatch, capsys):
    """The same command reopens its root run and skips the complete fold; a change to any input of the keys makes
    a new root run: seed, threads, determinism, settings, search space, pruning, split file and code also a new
    study; more trials a new root that extends the same study."""
    train = load_step_module("step_4", "train")
    monkeypatch.setattr(train, "run_fold", stub_fold)
    data_dir, path = split_file
    other_split = tmp_path / "other_splits.json"
    run_script("step_4/make_dataset_splits.py", "--data-dir", str(data_dir), "--k-root", "3", "--k-nested", "3",
               "--seed", "1", "--output", str(other_split), cwd=REPO)  # fmt: skip
    cwd = tmp_path / "work"
    cwd.mkdir()
    fold = ["--root-split", "0", "--nested-split", "0"]
    main_in_process(train, train_args(split_file, *fold, "--num-threads", "2"), cwd, monkeypatch)
    client = client_in(cwd)

    def roots_and_studies() -> tuple[int, set[str]]:
        studies = {run.data.tags["optuna_study"] for run in runs_of(client, "tags.run_level = 'fold'")}
        return len(runs_of(client, "tags.run_level = 'root'")), studies

    capsys.readouterr()
    main_in_process(train, train_args(split_file, *fold, "--num-threads", "2"), cwd, monkeypatch)
    out = capsys.readouterr().out
    assert "MLflow run reopened" in out and "fold 0/0 already complete: skipped" in out
    assert roots_and_studies()[0] == 1
    real = {name: getattr(train, name) for name in ("QUICK", "QUICK_SEARCH_SPACE", "code_digest")}
    changes = {
        "seed": ["--seed", "1"],
        "threads": ["--num-threads", "1"],
        "determinism": ["--no-deterministic"],
        "pruning": ["--no-pruning"],
        "split file": ["--split-file", str(other_split)],
        "settings": ("QUICK", train.replace(real["QUICK"], batch_size=16)),
        "search space": ("QUICK_SEARCH_SPACE", {**real["QUICK_SEARCH_SPACE"], "head_hidden": [32, 64]}),
        "code": ("code_digest", lambda folder: "edited"),
    }
    for name, change in changes.items():
        for attribute, value in real.items():
            monkeypatch.setattr(train, attribute, value)
        flags = change if isinstance(change, list) else []
        if isinstance(change, tuple):
            monkeypatch.setattr(train, *change)
        roots, studies = roots_and_studies()
        main_in_process(train, train_args(split_file, *fold, "--num-threads", "2", *flags), cwd, monkeypatch)
        out = capsys.readouterr().out
        assert "MLflow run started" in out and "already complete" not in out, name
        new_roots, new_studies = roots_and_studies()
        assert new_roots == roots + 1 and studies < new_studies and len(new_studies) == len(studies) + 1, name
    for attribute, value in real.items():
        monkeypatch.setattr(train, attribute, value)
    roots, studies = roots_and_studies()
    main_in_process(train, train_args(split_file, *fold, "--num-threads", "2", "--n-trials", "4"), cwd, monkeypatch)
    assert "MLflow run started" in capsys.readouterr().out
    assert roots_and_studies() == (roots + 1, studies)  # more trials: a new root, the same study extended


def test_a_root_whose_record_was_not_written_is_never_reopened(split_file, tmp_path, monkeypatch):
    """The first command fails while writing the root's record (an artifact store that cannot be written): the
    next command, which finds the root claimed, does not wait for it: it starts a new root and writes its record."""
    train = load_step_module("step_4", "train")
    args = train_args(split_file, "--root-split", "0", "--nested-split", "0")

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "mlruns")

    monkeypatch.setattr(train, "log_provenance", unwritable)
    with pytest.raises(PermissionError):
        main_in_process(train, args, tmp_path, monkeypatch)
    monkeypatch.undo()
    train = load_step_module("step_4", "train")
    monkeypatch.setattr(train, "run_fold", stub_fold)
    started = time.monotonic()
    main_in_process(train, args, tmp_path, monkeypatch)
    assert time.monotonic() - started < train.resume.ROOT_WAIT_SECONDS  # it did not wait for the failed root
    client = client_in(tmp_path)
    first, second = sorted(runs_of(client, "tags.run_level = 'root'"), key=lambda run: run.info.start_time)
    assert first.info.status == "FAILED" and "root_record" not in first.data.tags
    assert second.data.tags["root_record"] == "complete" and second.data.tags["run_complete"] == "true"
    logged = {a.path for folder in ("splits", "provenance", "search")
              for a in client.list_artifacts(second.info.run_id, folder)}  # fmt: skip
    assert {"splits/dataset_splits.json", "search/search_setup.json",
            "provenance/installed_distributions.txt"} <= logged  # fmt: skip


def test_the_chosen_values_figure_takes_choices_of_zero_and_a_single_choice():
    """A choice of 0.0 (a dropout) cannot sit on a log axis, and a choice of one value spans no range: the figure of
    the chosen values is drawn all the same."""
    searches = load_step_module("step_4", "searches")
    space = {
        "dropout": searches.searched("dropout", {"suggest_categorical": {"choices": [0.0, 0.2]}}),
        "head_hidden": searches.searched("head_hidden", {"suggest_categorical": {"choices": [64]}}),
        "finetune_lr": searches.searched("finetune_lr", (3e-4, 3e-3)),
    }
    chosen = searches.pd.DataFrame(
        {"root_split": [0, 0], "nested_split": [0, 1], "dropout": [0.0, 0.2], "head_hidden": [64.0, 64.0],
         "finetune_lr": [1e-3, 2e-3]}
    )  # fmt: skip
    figure = searches.plot_chosen(chosen, space)
    assert [ax.get_xscale() for ax in figure.axes] == ["linear", "log", "log"]
    searches.plt.close(figure)
