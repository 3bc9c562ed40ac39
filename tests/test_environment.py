"""What ran: a run directory records the environment it started in (environment.json) once, keeps it on a resume
(appending a record only when the environment changed), evaluate.py reports it, and a missing git is no failure."""

import json
import os
import re
import shutil
import sys

import torch

import evaluate
import pretrain_vae
import runs
import train_ocl
from helpers import ROOT, write_ocl_config, write_vae_config

KEYS = {"python", "torch", "cuda", "cudnn", "device", "device_type", "torch_threads", "commit", "dirty", "command",
        "hostname", "started"}


def test_a_run_records_its_environment_once_and_a_resume_elsewhere_appends_one(tmp_path, shapes_dir):
    config = write_vae_config(tmp_path, shapes_dir, steps=2, val_every=2)
    pretrain_vae.main([config])
    path = tmp_path / "run" / "environment.json"
    record = json.loads(path.read_text())
    assert set(record) == KEYS
    assert record["python"] == sys.version and record["torch"] == torch.__version__
    assert record["torch_threads"] == torch.get_num_threads() and record["command"] == sys.argv
    assert record["cuda"] == torch.version.cuda
    if os.path.isdir(os.path.join(ROOT, ".git")) and shutil.which("git"):  # this checkout's HEAD
        assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]) and isinstance(record["dirty"], bool)
    # a resume in the same environment leaves the record as it is
    before = path.read_text()
    pretrain_vae.main([config, "--resume", "auto"])
    assert path.read_text() == before
    # a resume in another environment (here: as if the run had started under another torch) appends one record,
    # once: the next resume matches the latest record
    path.write_text(json.dumps(dict(record, torch="0.0-elsewhere")))
    pretrain_vae.main([config, "--resume", "auto"])
    pretrain_vae.main([config, "--resume", "auto"])
    changed = json.loads(path.read_text())
    assert changed["torch"] == "0.0-elsewhere" and [r["torch"] for r in changed["resumes"]] == [torch.__version__]
    # a fresh start over the run moves its record aside with it and writes its own
    pretrain_vae.main([config, "--overwrite", "true"])
    (aside,) = [name for name in os.listdir(tmp_path / "run") if name.startswith("old-")]
    assert json.loads((tmp_path / "run" / aside / "environment.json").read_text())["torch"] == "0.0-elsewhere"
    assert json.loads(path.read_text())["torch"] == torch.__version__


def test_without_git_the_commit_is_null_not_a_failure(tmp_path, monkeypatch):
    record = runs.environment(torch.device("cpu"), repository=str(tmp_path))  # no .git here
    assert set(record) == KEYS and record["commit"] is None and record["dirty"] is None
    (tmp_path / ".git").mkdir()  # a .git that is not a repository: git fails
    assert runs.git_state(str(tmp_path)) == (None, None)
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs-here"))  # no git program at all
    assert runs.git_state(ROOT) == (None, None)


def test_evaluate_reports_what_each_run_was_trained_with(tmp_path, shapes_dir):
    config = write_ocl_config(tmp_path, shapes_dir, None, method="mixture", guidance="none", mixture_target="pixels",
                              steps=2, val_every=2)
    train_ocl.main([config])
    record = json.loads((tmp_path / "run" / "environment.json").read_text())
    evaluate.main([str(tmp_path / "run"), "--out", str(tmp_path / "eval"), "--device", "cpu", "--num_workers", "0",
                   "--samples", "4", "--figures", "0"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["runs"][0]["environment"] == record
    (line,) = [ln for ln in (tmp_path / "eval" / "table.md").read_text().splitlines() if "trained with:" in ln]
    assert line.startswith("run trained with: torch " + torch.__version__ + ", CUDA ")
    assert f"device {record['device']}" in line
    if record["commit"]:
        assert f"commit {record['commit'][:7]}{' (dirty)' if record['dirty'] else ''}" in line
