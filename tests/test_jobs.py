"""A study as Ray users run one on a cluster: submitted with `ray job submit` (or as a KubeRay
RayJob), retried with the same entrypoint, stopped with `ray job stop`, resumed with what it
recorded. The refusals and the manifest here run without Ray; tests/test_job_cluster.py
submits real jobs to a real head."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from study.plan import JOB_CONFIG_ENV, BadInput, Job, Request, ray_job, resolve
from study.run import main as study_main
from study.run import parse_args
from trainable.config import Config, load_config
from trainable.constants import REPO
from trainable.experiment import REPORT_DIR, RESULTS_CSV, STUDY_JSON, Folder
from trainable.record import Estimate, Sampler, Seeds, StudyRecord

from .helpers import tiny

MANIFEST = REPO / "configs" / "kuberay" / "rayjob.yaml"


def job_env(working_dir: Path | None, submission_id: str = "raysubmit_1") -> str:
    """What Ray's job supervisor puts in the entrypoint's environment."""
    runtime_env = {"working_dir": "gcs://_ray_pkg_0123.zip"} if working_dir else {}
    return json.dumps({"runtime_env": runtime_env,
                       "metadata": {"job_submission_id": submission_id}})


@pytest.fixture
def in_a_job(tmp_path, monkeypatch) -> Path:
    """This process as a job's entrypoint: its working dir Ray's unpacked copy."""
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.setenv(JOB_CONFIG_ENV, job_env(copy))
    monkeypatch.chdir(copy)
    return copy


def record_of(config: Config, *, path: str = "TorchTrainer", workers: int = 1,
              cpus: float = 1.0, gpus: float = 0.0, finished: bool | None = None
              ) -> StudyRecord:
    """study.json of a study launched so (the fields a resume reads; the rest plausible)."""
    per_trial = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    estimate = Estimate(device="cpu", workers=workers, images_per_s=50.0, epoch_s=1.0,
                        overhead_s=1.0, trial_s=3.0, range_test_s=1.0, trials=3, at_once=1,
                        study_s=10.0)
    return StudyRecord(config=config.replace("search", confirm_seeds=0),
                       seeds=Seeds(train=0, split=0, search=0), versions={}, git_commit=None,
                       path=path, sampler=Sampler(name="gp", startup_trials=2),
                       workers_per_trial=workers, resources_per_trial=per_trial,
                       selected_on="val", cost_estimate=estimate, finished=finished)


def started(synthetic_dir, storage: Path, name: str, *flags: str, **launch) -> Path:
    """An experiment as `python study/run.py <tiny> <flags> --name` would have recorded it."""
    request = parse_args(tiny(synthetic_dir, "--storage", str(storage), "--name", name, *flags))
    config = resolve(request).config
    experiment = storage / name
    experiment.mkdir(parents=True)
    record_of(config, **launch).write(Folder.at(experiment))
    return experiment


# --- the job's environment -------------------------------------------------------------

def test_the_job_is_read_from_what_its_supervisor_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ray_job({}) is None
    assert ray_job({JOB_CONFIG_ENV: job_env(tmp_path, "nightly-3")}) == Job("nightly-3", tmp_path)
    assert ray_job({JOB_CONFIG_ENV: job_env(None)}) == Job("raysubmit_1", None)


def test_in_a_job_the_study_joins_the_job_s_cluster(in_a_job, synthetic_dir, tmp_path):
    plan = resolve(parse_args(tiny(synthetic_dir, "--storage", str(tmp_path / "runs"))))
    assert plan.launch.job == Job("raysubmit_1", in_a_job)
    assert plan.launch.join == "auto"  # the RAY_ADDRESS its supervisor set: not a second Ray
    assert plan.launch.address is None  # so a resume command does not name it


def test_outside_a_job_a_study_starts_its_own_ray(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    plan = resolve(parse_args(tiny(synthetic_dir, "--storage", str(tmp_path / "runs"))))
    assert plan.launch.join is None


@pytest.mark.parametrize("flags, message", [
    (["--storage", "runs"], "--storage runs: inside this Ray job's copy of its working dir"),
    (["--storage", "./deep/runs"], "--storage ./deep/runs: inside this Ray job's copy"),
    (["--storage", "{abs}/runs", "--data-dir", "data/cifar10"],
     "--data-dir (data.dir) {copy}/data/cifar10: inside this Ray job's copy"),
])
def test_storage_or_data_inside_the_job_s_working_dir_copy_is_refused(
        in_a_job, synthetic_dir, tmp_path, capsys, flags, message):
    flags = [f.format(abs=tmp_path) for f in flags]
    code = study_main([*tiny(synthetic_dir), *flags, "--name", "lost"])
    assert code == 2
    err = capsys.readouterr().err
    assert message.format(copy=in_a_job) in err and err.count("\n") == 1
    assert "give an absolute path on storage every node shares, or a bucket URI" in err
    assert list(in_a_job.iterdir()) == [] and not (tmp_path / "runs").exists()


def test_in_a_job_an_absolute_storage_outside_the_copy_is_taken(in_a_job, synthetic_dir,
                                                                tmp_path):
    plan = resolve(parse_args(tiny(synthetic_dir, "--storage", str(tmp_path / "runs"),
                                   "--name", "kept")))
    assert plan.experiment.path == str(tmp_path / "runs" / "kept")


# --- --resume-if-exists and the recorded launch -----------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--resume", "--resume-if-exists", "--name", "x"],
     "--resume and --resume-if-exists exclude each other"),
    (["--resume-if-exists"], "--resume-if-exists needs --name"),
    (["--resume-if-exists", "--name", "x", "--overwrite"],
     "--resume-if-exists and --overwrite exclude each other"),
])
def test_resume_flags_that_cannot_go_together(synthetic_dir, tmp_path, capsys, flags, message):
    code = study_main(tiny(synthetic_dir, "--storage", str(tmp_path / "runs"), *flags))
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_resume_if_exists_starts_a_new_study_and_resumes_an_existing_one(synthetic_dir,
                                                                          tmp_path):
    flags = ["--local", "--num-samples", "3", "--resume-if-exists"]
    request = parse_args(tiny(synthetic_dir, "--storage", str(tmp_path), "--name", "s", *flags))
    assert not resolve(request).resume
    experiment = started(synthetic_dir, tmp_path, "s", "--local", "--num-samples", "3",
                         path="local")
    plan = resolve(request)
    assert plan.resume and not plan.finished
    assert plan.config == StudyRecord.read(Folder.at(experiment)).config


def test_resume_if_exists_with_another_config_names_the_first_difference(synthetic_dir,
                                                                        tmp_path, capsys):
    experiment = started(synthetic_dir, tmp_path, "s", "--num-samples", "3")
    before = (experiment / STUDY_JSON).read_text()
    code = study_main(tiny(synthetic_dir, "--storage", str(tmp_path), "--name", "s",
                           "--num-samples", "2", "--set", "train.seed=5", "--resume-if-exists"))
    assert code == 2
    err = capsys.readouterr().err
    assert err == (f"error: --resume-if-exists: {experiment} was started with another config: "
                   "train.seed is 0 in study.json, 5 now; give its config and flags, or another "
                   "--name\n")
    assert (experiment / STUDY_JSON).read_text() == before


def test_a_finished_study_run_again_says_its_result_and_trains_nothing(synthetic_dir, tmp_path,
                                                                       capsys):
    import ray

    experiment = started(synthetic_dir, tmp_path, "done", "--num-samples", "2", finished=True)
    (experiment / RESULTS_CSV).write_text(
        "trial_id,role,seed,status,max_lr,peak_epoch,best_val_acc,final_val_acc,epochs_run,"
        "checkpoint\na1,search,0,COMPLETED,0.05,1,0.25,0.25,2,ckpt\n"
        "b2,search,0,COMPLETED,0.08,1,0.5,0.5,2,ckpt\n")
    (experiment / REPORT_DIR).mkdir()
    (experiment / REPORT_DIR / "index.html").write_text("<html></html>")
    code = study_main(tiny(synthetic_dir, "--storage", str(tmp_path), "--name", "done",
                           "--num-samples", "2", "--resume-if-exists"))
    out = capsys.readouterr().out
    assert code == 0
    assert out == (f"{experiment}: finished earlier, 2 trials; nothing to run\n"
                   "best trial b2 (pick: pessimistic; 0 of 2 search trials were races): "
                   "max_lr 0.08, peak_epoch 1; observed val_acc 0.5000; expected on a new seed "
                   "0.5000 +- 0.0150 (its runs' mean final val_acc, 1 seed): the winner's curse "
                   "takes 0.00 points off\n"
                   f"report: {experiment / REPORT_DIR / 'index.html'}\n")
    assert not ray.is_initialized()


@pytest.mark.parametrize("recorded, flags", [
    ({"path": "local"}, []),
    ({"path": "TorchTrainer", "workers": 2, "cpus": 1.5}, []),
    ({"path": "TorchTrainer", "workers": 2, "cpus": 1.5}, ["--workers-per-trial", "2"]),
])
def test_a_resume_takes_the_launch_from_study_json(synthetic_dir, tmp_path, recorded, flags):
    started(synthetic_dir, tmp_path, "s", "--set", "train.batch_size=16", **recorded)
    plan = resolve(Request(storage=str(tmp_path), name="s", resume=True,
                           workers_per_trial=int(flags[1]) if flags else None))
    workers = recorded.get("workers", 1)
    assert (plan.launch.local, plan.launch.workers) == (recorded["path"] == "local", workers)
    if recorded["path"] == "TorchTrainer":
        # 1.5 CPUs per trial: 2 workers of 0.745 and the trial driver's 0.01
        assert plan.launch.cpus_per_worker == pytest.approx(0.745)


@pytest.mark.parametrize("recorded, flags, message", [
    ({"path": "TorchTrainer"}, ["--local"],
     "--local: the experiment ran on the TorchTrainer path (study.json); a resume keeps how "
     "it was launched: drop the flag"),
    ({"path": "local"}, ["--workers-per-trial", "2"],
     "--workers-per-trial: the experiment ran on 1 worker per trial"),
    ({"path": "TorchTrainer"}, ["--gpus-per-trial", "1"],
     "--gpus-per-trial: the experiment ran on 0 GPUs per trial"),
    ({"path": "TorchTrainer"}, ["--cpus-per-worker", "2"],
     "--cpus-per-worker: the experiment ran on 0.99 CPUs per worker"),
])
@pytest.mark.parametrize("resume", ["--resume", "--resume-if-exists"])
def test_a_resume_whose_flags_contradict_study_json_is_refused(synthetic_dir, tmp_path, capsys,
                                                                recorded, flags, message,
                                                                resume):
    started(synthetic_dir, tmp_path, "s", **recorded)
    given = tiny(synthetic_dir) if resume == "--resume-if-exists" else []
    code = study_main([*given, "--storage", str(tmp_path), "--name", "s", resume, *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# --- KubeRay -----------------------------------------------------------------------------

def test_the_kuberay_manifest_starts_or_resumes_one_study_on_shared_storage(
        synthetic_dir, tmp_path, monkeypatch):
    """What can be checked without Kubernetes: the RayJob's shape (a GPU worker group, one
    volume on every pod, retries, the cluster deleted at the end) and its entrypoint, parsed
    and resolved by the CLI itself in a job's environment, with the mount put here."""
    manifest = yaml.safe_load(MANIFEST.read_text())
    spec = manifest["spec"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster["workerGroupSpecs"])]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu")
               for pod in pods[1:] for c in pod["containers"])
    mounts = [{m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
              for pod in pods]
    (shared,) = set.intersection(*mounts)
    working_dir = yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]

    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["python", "study/run.py"]
    request = parse_args(command[2:])
    assert request.resume_if_exists and request.name and request.address is None
    for given in (request.storage, request.data_dir):
        assert given.startswith(shared + "/")  # what every pod sees, outside the copy
    here = tmp_path / "mnt"
    request = dataclasses.replace(
        request, storage=request.storage.replace(shared, str(here)),
        data_dir=request.data_dir.replace(shared, str(here)))
    copy = tmp_path / Path(working_dir).name  # the image's project, as the job unpacks it
    shutil.copytree(REPO / "configs", copy / "configs")
    monkeypatch.chdir(copy)
    job = Job("onecycle-study-abcde", copy)
    first = resolve(request, job)  # the first submission starts it ...
    assert not first.resume and first.launch.join == "auto" and not first.launch.local
    assert first.config == load_config(REPO / request.config).replace(
        "search", num_samples=request.num_samples).replace("data", dir=request.data_dir)
    experiment = Path(first.experiment.path)
    experiment.mkdir(parents=True)
    record_of(first.config).write(first.experiment)
    retried = resolve(request, job)  # ... and a retry, into a new cluster, resumes it
    assert retried.resume and retried.config == first.config.replace("search", confirm_seeds=0)
    with pytest.raises(BadInput, match="inside this Ray job's copy"):
        resolve(dataclasses.replace(request, storage="runs"), job)
