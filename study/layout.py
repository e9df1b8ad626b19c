"""File names inside an experiment directory `<storage>/<name>/`; every package uses these."""

LR_FINDER_JSON = "lr_finder.json"  # the range test: suggested_lr, lrs, losses, settings
LR_FINDER_PNG = "lr_finder.png"  # its curve, the estimate marked
STUDY_JSON = "study.json"  # resolved config, search space, estimate, seeds, versions, commit
RESULTS_CSV = "results.csv"  # one row per trial
OPTUNA_DB = "optuna.db"  # the Optuna study (SQLite): optuna-dashboard sqlite:///.../optuna.db
TRAIN_RUNS = "train"  # Ray Train runs of the TorchTrainer path: train/train-<trial id>/
REPORT_DIR = "report"  # what `python -m analysis` writes


def optuna_url(experiment_dir) -> str:
    """The SQLAlchemy URL of an experiment's Optuna study."""
    return f"sqlite:///{experiment_dir}/{OPTUNA_DB}"
