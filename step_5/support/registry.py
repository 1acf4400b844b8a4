"""The Model Registry part of step 5: one fold's refit model registered as a version of `pets-cat-vs-dog` with its
lineage, and any registered or logged model loaded to predict photos (register.py and predict.py tell the story).

What is registered is an MLflow model from code (photo_model.py) that holds the fold's refit model unchanged, and,
read from the fold's runs, the preprocessing (image size, scaling, normalisation), the threshold, the batch size and
the thread count: a photo goes in, P(cat) and a label come out, in predict.py and over HTTP alike. It is logged
onto the refit run (`registered_model/`) without reopening it, and the version points to that run: "which run,
which data, which code made this version?" is answered by the version's tags and by the run they name.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as installed
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.artifacts import load_text
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from support import runs
from support.common import STEP_DIR
from support.provenance import code_digest, recorded_code_paths
from support.resume import owner_alive, owner_tags

NAME = "pets-cat-vs-dog"  # the registered model
ALIAS = "candidate"  # the version register.py made last: what predict.py and the README's server use by default
DEFAULT_URI = f"models:/{NAME}@{ALIAS}"
LINEAGE = ("dataset_digest", "split_file_digest", "git_commit", "git_dirty", "code_digest", "dataset_synthetic")
SIGNATURE = ModelSignature(  # explicit: image files' bytes in (base64 over HTTP), P(cat) and the label out
    inputs=Schema([ColSpec("binary", "image")]),
    outputs=Schema([ColSpec("float", "p_cat"), ColSpec("string", "label")]),
)
PACKAGES = ("mlflow", "torch", "torchvision", "pillow", "numpy", "pandas")


def require_store() -> None:
    """Stop in one sentence when the tracking store is a sqlite file that does not exist (MLflow's default, here):
    it holds no run or model, and the first MlflowClient would leave an empty mlflow.db behind."""
    uri = mlflow.get_tracking_uri()
    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    if uri.startswith("sqlite:///") and not path.is_file():
        raise SystemExit(
            f"No MLflow store at {path}, so no step-5 run or model here: run python step_5/train.py (and "
            "register.py) in this directory first, or set MLFLOW_TRACKING_URI to the store that holds them."
        )


def runs_of_refit(client: mlflow.MlflowClient, refit_id: str) -> tuple[Run, Run, Run]:
    """The refit run, its fold run and its root run; one sentence when the run is not a step-5 refit run."""
    refit = client.get_run(refit_id)
    experiment = client.get_experiment(refit.info.experiment_id).name
    if experiment != "step_5":  # e.g. a step-4 refit run: its record has no preprocessing to apply to a photo
        raise SystemExit(
            f"Run {refit_id} is not a step_5 run (its experiment is {experiment}): only step 5 records what turns a "
            "photo into its model's input; give the model of a step-5 refit run."
        )
    if refit.data.tags.get("run_level") != "refit":
        raise SystemExit(f"Run {refit_id} is not a step-5 refit run: give the model of a fold's refit run.")
    fold = client.get_run(refit.data.tags["mlflow.parentRunId"])
    return refit, fold, client.get_run(fold.data.tags["mlflow.parentRunId"])


def photo_config(refit: Run, fold: Run, root: Run) -> dict:
    """What the registered model needs besides the weights, read from the refit, fold and root runs' records."""
    try:
        preprocessing = json.loads(load_text(f"{root.info.artifact_uri}/config/preprocessing.json"))
    except (MlflowException, OSError):
        raise SystemExit(
            f"Root run {root.info.run_id} has no config/preprocessing.json (it predates it): the image size and "
            f"normalisation its models expect are not on record; run the experiment again to register its models."
        ) from None
    resolved = json.loads(load_text(f"{refit.info.artifact_uri}/config/resolved_config.json"))  # every value it used
    return {
        **preprocessing,
        "image_size": resolved["data"]["image_size"],
        "batch_size": resolved["training"]["batch_size"],  # the batches of the run's own prediction tables
        "threshold": refit.data.metrics["threshold"],  # fitted on the fold's dev set
        "num_threads": int(fold.data.params["num_threads"]),
        "fold": f"{fold.data.tags['root_split_id']}/{fold.data.tags['nested_split_id']}",
        "refit_run_id": refit.info.run_id,
        "root_run_id": root.info.run_id,
        "dataset_synthetic": root.data.tags.get("dataset_synthetic") == "true",
        "code_paths": recorded_code_paths(root.data.tags),  # the CPU code paths the run computed on
    }


def lineage(refit: Run, fold: Run, root: Run) -> dict[str, str]:
    """The version's tags: which runs, data, split file, code and config made it, copied from the root run."""
    config = load_text(f"{root.info.artifact_uri}/config/resolved_config.json")
    return {
        "root_run_id": root.info.run_id,
        "fold_run_id": fold.info.run_id,
        "refit_run_id": refit.info.run_id,
        "fold": f"{fold.data.tags['root_split_id']}/{fold.data.tags['nested_split_id']}",
        **{key: root.data.tags[key] for key in LINEAGE},
        "config_digest": hashlib.sha256(config.encode()).hexdigest(),  # of config/resolved_config.json
        "test_roc_auc": repr(refit.data.metrics["test_roc_auc"]),
        "threshold": repr(refit.data.metrics["threshold"]),
    }


def lineage_text(tags: dict[str, str]) -> str:
    """The version's description: its lineage in words (Markdown), what the UI shows first on its page."""
    data = (
        "the SYNTHETIC STAND-IN (it never saw a real pet)" if tags["dataset_synthetic"] == "true" else "the real pets"
    )
    dirty = " with uncommitted changes" if tags["git_dirty"] == "true" else ""
    return (
        f"Fold {tags['fold']}'s refit model, from step-5 root run `{tags['root_run_id']}` (refit run "
        f"`{tags['refit_run_id']}`): test ROC AUC {float(tags['test_roc_auc']):.3f}, threshold "
        f"{float(tags['threshold']):.4f}.\n\n"
        f"- data: {data}, dataset digest `{tags['dataset_digest'][:12]}…`, split file digest "
        f"`{tags['split_file_digest'][:12]}…`\n"
        f"- code: git commit `{tags['git_commit'][:12]}`{dirty}, code digest `{tags['code_digest'][:12]}…`\n"
        f"- config: digest `{tags['config_digest'][:12]}…` of the root run's config/resolved_config.json"
    )


def check_code(root: Run) -> None:
    """The model's code (photo_model.py, pets.py) is copied from this checkout: refuse unless this checkout's code
    is the code the run recorded, so that the version carries the code its lineage names."""
    here = code_digest(STEP_DIR)
    if here != root.data.tags.get("code_digest"):
        commit = root.data.tags.get("git_commit", "unknown")
        raise SystemExit(
            f"Root run {root.info.run_id} ran code digest {root.data.tags.get('code_digest', 'unknown')[:12]}… (git "
            f"commit {commit[:12]}), but {STEP_DIR.name}/ here has {here[:12]}…: the registered model would "
            f"carry this checkout's photo_model.py and pets.py, not the run's. Register from the run's code (git "
            f"checkout {commit[:12]}, with its uncommitted changes if it had any), or train again with this code."
        )


@contextmanager
def claimed(client: mlflow.MlflowClient, refit_id: str) -> Iterator[bool]:
    """Whether this process may register the refit run's model: of registrations started together, one claims it.

    Creating an MLflow experiment of a given name is atomic in every tracking store, so the claim is an experiment
    named after the refit run (deleted at once, so the UI does not list it; the name stays taken). It carries its
    owner's host and pid: the claim of a process that stopped before its version existed is given up, and the next
    claim of the same run takes a new number. The others wait for the claimant's version."""
    waiting = False
    for attempt in itertools.count():
        name = f"claim-register-{refit_id}-{attempt}"
        try:
            claim = client.create_experiment(name, tags=owner_tags())
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        else:
            client.delete_experiment(claim)
            yield True
            return
        while owner_alive(client.get_experiment_by_name(name).tags):
            if client.search_model_versions(f"name = '{NAME}' and run_id = '{refit_id}'"):
                yield False
                return
            if not waiting:
                print(f"Another process is registering refit run {refit_id}: waiting for its version")
                waiting = True
            runs.pause(0.5)  # a stop signal ends the wait at once


def register(client: mlflow.MlflowClient, refit_id: str, example: str) -> tuple[object, bool]:
    """Register the refit run's model (once, even when several processes register it at the same moment: a second
    call finds the first version); point the alias at it.

    Returns the model version and whether it is new. `example`: the file name of one of the fold's test images,
    logged as the input example."""
    with claimed(client, refit_id) as mine:
        found = client.search_model_versions(f"name = '{NAME}' and run_id = '{refit_id}'")
        if found or not mine:
            version, new = found[0], False
        else:
            version, new = create_version(client, refit_id, example), True
    client.set_registered_model_alias(NAME, ALIAS, version.version)
    return version, new


def create_version(client: mlflow.MlflowClient, refit_id: str, example: str) -> object:
    """The refit run's model saved with its code and config onto the refit run, and registered as a new version."""
    refit_runs = runs_of_refit(client, refit_id)  # the refit, fold and root runs, read once
    root = refit_runs[2]
    check_code(root)
    config, tags = photo_config(*refit_runs), lineage(*refit_runs)
    image = Path(root.data.params["data.data_dir"]) / "oxford-iiit-pet" / "images" / example
    if not image.is_file():
        raise SystemExit(f"{image} is missing: register where train.py ran (one test image is the input example).")
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "support"  # the code photo_model.py imports, as a package of its own: support/pets.py
        code.mkdir()
        for name in ("__init__.py", "pets.py"):
            shutil.copyfile(STEP_DIR / "support" / name, code / name)
        mlflow.pyfunc.save_model(
            Path(tmp) / "model",
            python_model=str(STEP_DIR / "support" / "photo_model.py"),  # a model from code: no pickle
            code_paths=[str(code)],  # decodes as the training did
            artifacts={"refit_model": f"runs:/{refit_id}/model"},  # the refit's model, copied unchanged
            model_config={**config, "device": "cpu"},  # predict.py may load it onto another device
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [image.read_bytes()]}),
            pip_requirements=[f"{name}=={installed(name)}" for name in PACKAGES],
        )
        client.log_artifacts(refit_id, str(Path(tmp) / "model"), "registered_model")  # the run stays FINISHED
    try:
        client.create_registered_model(NAME, description="Cat (1) or dog (0) from a photo: step 5's refit models")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{refit_runs[0].info.artifact_uri}/registered_model"
    return client.create_model_version(NAME, source, run_id=refit_id, tags=tags, description=lineage_text(tags))


def version_page(version: str) -> str:
    """The version's page in the UI: on the tracking server when there is one, else in `mlflow ui` from here."""
    uri = mlflow.get_tracking_uri()
    on_server = uri.startswith(("http://", "https://"))
    link = f"{uri.rstrip('/') if on_server else runs.UI}/#/models/{NAME}/versions/{version}"
    return link if on_server else f"`mlflow ui` from this directory, then {link}"


def load(client: mlflow.MlflowClient, uri: str, device: torch.device) -> tuple[object, dict, str]:
    """A photo model for `uri` (a registered version, a refit run's registered_model, or a refit run's torch model),
    its config, and a sentence saying which version and runs it comes from; one sentence when there is none."""
    try:
        info = mlflow.models.get_model_info(uri)
    except (MlflowException, OSError):
        hint = " (register one first: python step_5/register.py)" if uri == DEFAULT_URI else ""
        raise SystemExit(f"No model at {uri} in {mlflow.get_tracking_uri()}{hint}: check --model.") from None
    loader = info.flavors.get("python_function", {}).get("loader_module")
    if loader == "mlflow.pytorch":  # a refit run's own model: its preprocessing is read from its runs now
        from support import photo_model  # its set_model() at import is harmless here: only PetPhotos is used

        if info.run_id is None:
            raise SystemExit(f"{uri} is a torch model outside any run: no preprocessing on record to apply.")
        config = photo_config(*runs_of_refit(client, info.run_id))
        model = photo_model.PetPhotos()
        photo_model.use_code_paths(config)  # before the first computation, as load_context does
        with tempfile.TemporaryDirectory() as downloaded:  # else MLflow downloads into a folder it leaves behind
            model.setup(mlflow.pytorch.load_model(uri, dst_path=downloaded), config, device)
        predict = lambda frame: model.predict(None, frame)  # noqa: E731
    elif info.signature is not None and info.signature.inputs == SIGNATURE.inputs:
        with tempfile.TemporaryDirectory() as downloaded:  # loading reads it all: its code, the refit's model
            loaded = mlflow.pyfunc.load_model(uri, model_config={"device": str(device)}, dst_path=downloaded)
        config, predict = loaded.model_config, loaded.predict
    else:
        raise SystemExit(f"{uri} is not a model of step 5 (it takes no image files): check --model.")
    where = f"fold {config['fold']}'s refit run {config['refit_run_id']} of root run {config['root_run_id']}"
    if uri.startswith("models:/") and not uri.startswith("models:/m-"):  # a registered version: which one
        name, at, alias = uri.removeprefix("models:/").partition("@")
        name, _, number = name.partition("/")
        number = client.get_model_version_by_alias(name, alias).version if at else number
        if not at and number.lower() == "latest":  # what MLflow loaded for it: the highest version number
            newest = client.search_model_versions(f"name = '{name}'", 1, ["version_number DESC"])
            number = newest[0].version if newest else number
        where = f"{name} version {number}, made from {where}"
    return predict, config, where
