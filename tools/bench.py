"""Measure what a study's speed is made of, on this machine, side by side in one run.

    python tools/bench.py [--device cpu|cuda] [--out bench.json] [--images N] [--batch-size B]
                          [--repeats R] [--trials T]

- training images/s (steady state: the last of --epochs epochs) of the plain loop called
  directly (no Ray running), beside an idle Ray, and in a Ray Train TorchTrainer with one
  worker given the same CPUs: --repeats interleaved rounds, the median of each;
- a Tune trial's fixed overhead, per path (TorchTrainer, --local): the wall time of a 1-epoch
  trial less that epoch's training time, over --trials trials run one after another as a study
  runs them (the median; and the Tuner's wall time less all training, per trial);
- augmentation images/s: albumentations in this process, in the DataLoader processes a trial
  gets, and batched on the device (data.augment_on: gpu), each against the model's rate;
- on CUDA, seconds per epoch of the default recipe with (a) the CPU albumentations loader,
  (b) the on-device augmentation, (c) (b) plus torch.compile; bf16 and channels_last in all;
- the wall time of a 2-trial x 2-epoch study (`python study/run.py`, TorchTrainer path, the
  default recipe on --images images at --batch-size) at each of --study-gpus GPUs per trial
  (default on CUDA: 1 and 0.5, where two trials share a GPU), with each trial's training
  images/s and seconds per epoch.
Prints a table and writes JSON. It measures; it asserts nothing.

The GPU acceptance run, every GPU figure in one JSON (docs/performance.md):
    python tools/bench.py --device cuda --data-dir data/cifar10 --images 45000 \
        --batch-size 512 --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune

from study import cost
from study.cluster import start_ray
from study.plan import DRIVER_CPU, Resources
from study.trial import make_trainable, train_worker
from trainable.config import Config, load_config
from trainable.constants import DEFAULT_CONFIG, REPO
from trainable.data import ImageSet, Splits, load_splits, make_loader, train_transform
from trainable.device import Runtime, select_runtime
from trainable.device_data import DeviceBatches
from trainable.experiment import STARTUP_S, Folder
from trainable.loop import train
from trainable.synthetic import write_dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("--data-dir", help="CIFAR-10 (default: synthetic images of the same size)")
    p.add_argument("--images", type=int, default=512, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved rounds of the throughput runs (the median is kept)")
    p.add_argument("--trials", type=int, default=3,
                   help="1-epoch trials per path for the per-trial overhead (median)")
    p.add_argument("--address", help="a running Ray cluster to use")
    p.add_argument("--study-gpus", type=float, nargs="*",
                   help="GPUs per trial of each timed 2-trial study (default: 1 0.5 on CUDA, "
                        "none on CPU; 0 times one on CPU)")
    args = p.parse_args(argv)
    if args.study_gpus is None:
        args.study_gpus = [1.0, 0.5] if args.device == "cuda" else []
    if min(args.images, args.batch_size, args.repeats, args.trials) < 1 or args.epochs < 2:
        p.exit(2, "error: need --images, --batch-size, --repeats and --trials >= 1, and "
               "--epochs >= 2\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda: no CUDA device here\n")
    if args.out.exists():
        p.exit(2, f"error: {args.out}: exists; refusing to overwrite it\n")
    return args


def bench_config(data_dir: str, images: int, batch_size: int, epochs: int) -> Config:
    return load_config(DEFAULT_CONFIG, [
        f"data.dir={data_dir}", "data.val_size=64", f"data.limit_train={images}",
        "data.limit_test=64", f"train.batch_size={batch_size}",
        f"train.epochs={epochs}", "train.peak_epoch=1"])


def direct_images_per_s(config: Config, splits: Splits) -> float:
    outcome = train(config, splits)
    return outcome.history[-1]["images_per_s"]


def ray_images_per_s(config: Config, splits_ref: ray.ObjectRef, cpus: int, use_gpu: bool,
                     storage: Path) -> float:
    """The same loop as one TorchTrainer worker holding the CPUs the direct run had."""
    trainer = ray.train.torch.TorchTrainer(
        train_worker, train_loop_config={"config": config, "splits_ref": splits_ref,
                                         "hold": None, "started_at": time.time()},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(name=storage.name, storage_path=str(storage.parent)))
    result = trainer.fit()
    return float(result.metrics["images_per_s"])


class TrialClock(tune.Callback):
    """Each trial's wall seconds, from Tune starting it to Tune seeing it complete."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.perf_counter()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seconds[trial.trial_id] = time.perf_counter() - self.started[trial.trial_id]


def trial_overhead_s(config: Config, splits_ref: ray.ObjectRef, local: bool, use_gpu: bool,
                     storage: Path, trials: int) -> dict[str, Any]:
    """`trials` 1-epoch trials run one after another as a study runs them (actors reused):
    each one's wall seconds less its epoch's training seconds, and the Tuner's whole wall time
    less all training, per trial (that adds starting Tune and the trials' first process)."""
    one_epoch = config.replace("train", epochs=1, peak_epoch=1)
    cpus = ray.cluster_resources().get("CPU", 1)
    resources = Resources(workers=1, cpus_per_worker=1.0 if local else cpus - DRIVER_CPU,
                          gpus_per_worker=1.0 if use_gpu else 0.0, local=local)
    name = "local" if local else "torch"
    experiment = storage / f"overhead-{name}"
    experiment.mkdir()
    clock = TrialClock()
    tuner = tune.Tuner(
        make_trainable(one_epoch, splits_ref, resources, Folder.at(experiment)),
        param_space={"max_lr": one_epoch.train.max_lr, "peak_epoch": 1},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=experiment.name, storage_path=str(storage), verbose=0,
                                  callbacks=[clock]))
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    epoch_s = {result.metrics["trial_id"]: float(result.metrics["epoch_s"]) for result in grid}
    each = [clock.seconds[trial_id] - epoch_s[trial_id] for trial_id in sorted(
        epoch_s, key=clock.started.get)]
    return {"each": each, "median": statistics.median(each),
            "tuner_per_trial": (wall - sum(epoch_s.values())) / trials,
            "startup": statistics.median(float(r.metrics[STARTUP_S]) for r in grid)}


def augment_images_per_s(config: Config, images: ImageSet, workers: int,
                         device: torch.device) -> dict[str, float]:
    rates = {}
    transform = train_transform(config.data, seed=0)
    started = time.perf_counter()
    for image in images.images:
        transform(image=image)
    rates["albumentations_1_process"] = len(images.labels) / (time.perf_counter() - started)
    loader = make_loader(images, train_transform(config.data), config.train.batch_size,
                         workers, shuffle=True)
    started = time.perf_counter()
    for _ in loader:
        pass
    rates[f"albumentations_loader_{workers}_workers"] = \
        len(images.labels) / (time.perf_counter() - started)
    batches = DeviceBatches(images, config.data, config.train.batch_size, device, train=True)
    batches.seed(0)
    for _ in batches:  # warm-up: first kernels, allocations
        pass
    started = time.perf_counter()
    for batch, _ in batches:
        batch.sum().item()  # wait for the device
    rates["device"] = len(images.labels) / (time.perf_counter() - started)
    return rates


def cuda_epoch_s(data_dir: str) -> dict[str, float]:
    """Seconds per epoch of the default recipe (all 45,000 training images, batch 512), steady
    state (the second epoch), per variant."""
    recipe = load_config(DEFAULT_CONFIG,
                         [f"data.dir={data_dir}", "train.epochs=2", "train.peak_epoch=1"])
    splits = load_splits(recipe.data)
    variants = {"cpu_loader": {"augment_on": "cpu"}, "device_augment": {"augment_on": "gpu"},
                "device_augment_compiled": {"augment_on": "gpu", "compile": True}}
    seconds = {}
    for name, switches in variants.items():
        config = recipe.replace("data", augment_on=switches["augment_on"])
        config = config.replace("train", compile=switches.get("compile", False))
        seconds[name] = train(config, splits).history[-1]["epoch_s"]
    return seconds


def throughput_runs(config: Config, splits: Splits, runtime: Runtime, storage: Path,
                    repeats: int, address: str | None) -> dict[str, list[float]]:
    """Training images/s of `repeats` rounds, each: the direct loop before this process
    starts Ray (with --address the cluster runs throughout), then the direct loop beside the
    idle Ray and the loop in a one-worker TorchTrainer holding the same CPUs. Rounds
    interleave, so that a slow spell of the machine falls on every path alike."""
    runs: dict[str, list[float]] = {"direct": [], "direct_ray_idle": [], "ray": []}
    for round_index in range(repeats):
        runs["direct"].append(direct_images_per_s(config, splits))
        start_ray("bench", address)
        try:
            splits_ref = ray.put(splits)
            # Splits the Ray path's cost into what the idle cluster takes from the CPUs and
            # what Train itself adds.
            runs["direct_ray_idle"].append(direct_images_per_s(config, splits))
            cpus = min(int(ray.cluster_resources().get("CPU", 1)), runtime.cpus)
            runs["ray"].append(ray_images_per_s(
                config, splits_ref, cpus, runtime.device.type == "cuda",
                storage / f"throughput-{round_index}"))
        finally:
            ray.shutdown()
    return runs


def study_run(config: Config, gpus: float, storage: Path, address: str | None,
              synthetic: bool) -> dict[str, Any]:
    """A 2-trial x 2-epoch study of `config`'s data, images and batch as a user runs it: its
    wall time, and per trial the last epoch's training images/s and seconds."""
    name = f"study-{gpus:g}-gpus"
    command = [sys.executable, str(REPO / "study" / "run.py"), "--data-dir", config.data.dir,
               "--num-samples", "2", "--set", "train.epochs=2", "--set", "train.peak_epoch=1",
               "--set", f"data.limit_train={config.data.limit_train}",
               "--set", f"train.batch_size={config.train.batch_size}",
               "--set", "search.max_concurrent=2", "--gpus-per-trial", f"{gpus:g}",
               "--storage", str(storage), "--name", name, "--no-report"]
    if synthetic:  # the stand-in holds --images + 64 training images
        command += ["--set", "data.val_size=64", "--set", "data.limit_test=64"]
    if address:
        command += ["--address", address]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    trials = {}
    for result in (storage / name).glob("trial_*/result.json"):
        last = json.loads(result.read_text().splitlines()[-1])
        trials[result.parent.name] = {"images_per_s": last["images_per_s"],
                                      "epoch_s": last["epoch_s"]}
    return {"wall_s": wall, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onecycle-bench-") as scratch:
        scratch_dir = Path(scratch)
        data_dir = args.data_dir or str(write_dataset(
            scratch_dir / "data", train=args.images + 64, test=64).parent)
        config = bench_config(data_dir, args.images, args.batch_size, args.epochs)
        splits = load_splits(config.data)
        runtime = select_runtime(args.device)
        use_gpu = args.device == "cuda"
        out: dict[str, Any] = {"device": str(runtime.device), "cpus": runtime.cpus,
                               "images": args.images, "batch_size": args.batch_size,
                               "repeats": args.repeats}
        runs = throughput_runs(config, splits, runtime, scratch_dir, args.repeats, args.address)
        for path, rates in runs.items():
            out[f"{path}_images_per_s"] = statistics.median(rates)
            out[f"{path}_images_per_s_each"] = rates
        # Of the medians: one slow or fast round moves neither much.
        out["ray_vs_direct_throughput_ratio"] = out["ray_images_per_s"] / \
            out["direct_images_per_s"]

        start_ray("bench", args.address)
        try:
            splits_ref = ray.put(splits)
            # The cost estimate's probe, as a study runs it first: its start-up is what the
            # estimate takes for a trial's, plus cost.TRAIN_SETUP_S on the TorchTrainer path.
            out["probe_startup_s"] = ray.get(cost._remote_speed.options(num_cpus=1).remote(
                config, [splits_ref], 1, time.time()))[STARTUP_S]
            overheads = {path: trial_overhead_s(config, splits_ref, path == "local", use_gpu,
                                                scratch_dir, args.trials)
                         for path in ("torch_trainer", "local")}
        finally:
            ray.shutdown()
        out["trial_overhead_s"] = {k: v["median"] for k, v in overheads.items()}
        out["trial_overhead_each_s"] = {k: v["each"] for k, v in overheads.items()}
        out["tuner_overhead_per_trial_s"] = {k: v["tuner_per_trial"]
                                             for k, v in overheads.items()}
        out["trial_startup_s"] = {k: v["startup"] for k, v in overheads.items()}
        workers = max(1, runtime.loader_workers(config.data.num_workers))
        out["augment_images_per_s"] = augment_images_per_s(config, splits.train, workers,
                                                           runtime.device)
        out["augment_vs_model_ratio"] = {k: v / out["direct_images_per_s"]
                                         for k, v in out["augment_images_per_s"].items()}
        if use_gpu:
            out["epoch_s"] = cuda_epoch_s(data_dir)
        out["study"] = {f"{gpus:g}_gpus_per_trial": study_run(config, gpus, scratch_dir,
                                                             args.address, not args.data_dir)
                        for gpus in args.study_gpus}
    args.out.write_text(json.dumps(out, indent=2))
    print_table(out)
    return 0


def print_table(out: dict[str, Any]) -> None:
    def rate(path: str) -> str:
        each = ", ".join(f"{v:.1f}" for v in out[f"{path}_images_per_s_each"])
        return f"{out[f'{path}_images_per_s']:.1f}; {each}"

    rows = [("device", out["device"]),
            ("direct loop, images/s (median; each)", rate("direct")),
            ("direct loop beside an idle Ray, images/s", rate("direct_ray_idle")),
            ("Ray Train (1 worker), images/s", rate("ray")),
            ("Ray / direct (of the medians)", f"{out['ray_vs_direct_throughput_ratio']:.3f}")]
    rows += [(f"trial overhead, {k}, s (median; each)", f"{v:.1f}; " + ", ".join(
        f"{each:.1f}" for each in out["trial_overhead_each_s"][k]))
        for k, v in out["trial_overhead_s"].items()]
    rows += [(f"Tuner time less training, per trial, {k}, s", f"{v:.1f}")
             for k, v in out["tuner_overhead_per_trial_s"].items()]
    rows += [(f"trial start to first step (startup_s), {k}, s", f"{v:.1f}")
             for k, v in out["trial_startup_s"].items()]
    rows += [("cost probe's start-up, s", f"{out['probe_startup_s']:.1f}")]
    rows += [(f"augment {k}, images/s", f"{v:.0f} ({out['augment_vs_model_ratio'][k]:.1f}x "
              "the model)") for k, v in out["augment_images_per_s"].items()]
    rows += [(f"epoch {k}, s", f"{v:.2f}") for k, v in out.get("epoch_s", {}).items()]
    rows += [(f"2-trial x 2-epoch study, {k}, wall s", f"{v['wall_s']:.1f}")
             for k, v in out["study"].items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
