"""The step-5 experiment: every setting, in one file that is logged with every run.

What the experiment is lives here; how it runs (device, threads, seed) stays on the command line. A setting that
the search chooses holds a hyper-parameter instead of a value: Categorical(...), Float(...) or Int(...), Optuna's
suggest calls declared where the value would go. Change a value here, or for one run with
`--set SECTION.KEY=VALUE` (e.g. --set training.batch_size=16); start another experiment from this one as
config_quick.py does.
"""

from settings import Categorical, Config, CrossValidation, Data, Float, Model, Search, Training

config = Config(
    data=Data(
        data_dir="data/oxfordiii",
        split_file=None,  # from make_dataset_splits.py: None means DATA_DIR/dataset_splits.json
        image_size=224,  # the resolution DenseNet-121 was trained at on ImageNet
        max_images=None,
        shares={"train": 0.70, "dev": 0.15, "test": 0.15},  # with max_images: how it is shared by a fold's parts
    ),
    model=Model(
        backbone="densenet121",
        pretrained=True,
        head_hidden=Categorical([128, 256, 512, 1024]),
        dropout=Float(0.0, 0.5),
    ),
    # Learning rates and weight decays on a log scale, where "ten times larger" is the natural step.
    training=Training(
        batch_size=32,
        warmup_epochs=3,  # a new head on good features converges in a few epochs
        warmup_lr=Float(1e-4, 1e-2, log=True),
        warmup_weight_decay=Float(1e-6, 1e-2, log=True),
        finetune_epochs=15,
        finetune_lr=Float(1e-5, 1e-3, log=True),  # fine-tuning moves pretrained weights: smaller steps
        finetune_weight_decay=Float(1e-6, 1e-2, log=True),
        patience=3,
    ),
    cv=CrossValidation(n_root_splits=2, n_nested_splits=2, root_split=None, nested_split=None),
    search=Search(
        n_trials=3,
        # TPE draws at random for its first 10 trials, then models which values did well
        sampler="TPESampler",
        # stop a trial whose dev ROC AUC after an epoch is below the median of the earlier trials' at that epoch;
        # judge from the second trial on, and not after the first epoch, which says little
        pruner="MedianPruner",
        pruner_options={"n_startup_trials": 1, "n_warmup_steps": 2},
        storage="optuna_studies.journal",  # safe for several processes on one machine; or a URL (postgresql://…)
    ),
)
