"""Runs that never lose work: one run per directory under a lock, checkpoints that are good, honest
resume, and one sentence for every input fault."""

import importlib.util
import os

import pytest
import torch

import pretrain_vae
import train_ocl
from errors import UserError
from helpers import hold_flock, read_jsonl, save_vae, write_ocl_config, write_vae_config
from runs import list_checkpoints, load_checkpoint


def checkpoint_names(run):
    return sorted(n for n in os.listdir(run) if n.startswith("ckpt_"))


def test_fresh_start_into_another_run_is_refused_and_overwrite_moves_it_aside(tmp_path, shapes_dir):
    run = tmp_path / "run"
    pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=4, val_every=2)])
    before = {n: (run / n).read_bytes() for n in checkpoint_names(run)}
    with pytest.raises(UserError, match=r"already holds a run .*--resume auto.*--overwrite true"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=2, val_every=1)])
    assert {n: (run / n).read_bytes() for n in checkpoint_names(run)} == before  # untouched
    # overwrite: the old run's files move to old-<time>/, byte for byte; the new run keeps its own checkpoints
    pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=2, val_every=1, keep_checkpoints=1),
                       "--overwrite", "true"])
    assert checkpoint_names(run) == ["ckpt_0000002.pt"]
    (aside,) = [n for n in os.listdir(run) if n.startswith("old-")]
    assert {n: (run / aside / n).read_bytes() for n in checkpoint_names(run / aside)} == before
    written = ["config.yaml", "environment.json", "figures", "log.jsonl", "log.txt"]
    written += ["tensorboard"] if importlib.util.find_spec("tensorboard") else []  # written when installed
    assert sorted(os.listdir(run / aside)) == sorted(list(before) + written)
    assert [e["step"] for e in read_jsonl(run / "log.jsonl") if "loss" in e] == [1, 2]  # completed steps


def test_pruning_orders_checkpoints_by_step_not_name(tmp_path, shapes_dir):
    run = tmp_path / "run"
    pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=2, val_every=1, keep_checkpoints=2)])
    # a name with other zero padding (an older or hand-copied run) sorts after ckpt_0000002.pt by name
    os.rename(run / "ckpt_0000001.pt", run / "ckpt_1.pt")
    assert [os.path.basename(p) for p in list_checkpoints(str(run))] == ["ckpt_1.pt", "ckpt_0000002.pt"]


def test_a_second_process_in_the_same_run_directory_is_refused(tmp_path, shapes_dir):
    run = tmp_path / "run"
    run.mkdir()
    with hold_flock(run / ".lock"):
        with pytest.raises(UserError, match="another process is running in .*; wait for it"):
            pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=2, val_every=1)])
        assert checkpoint_names(run) == []
    pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=2, val_every=1)])  # free again
    assert checkpoint_names(run) == ["ckpt_0000001.pt", "ckpt_0000002.pt"]


def test_best_checkpoint_survives_a_kill_and_is_never_pruned(tmp_path, shapes_dir, monkeypatch):
    """The metric peaks at step 2; the run is killed while writing that best.pt. After --resume auto best.pt is the
    step-2 model, its checkpoint outlives keep_checkpoints=1, and a deleted best.pt comes back on resume."""
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    config = write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=vae, steps=4, val_every=1, keep_checkpoints=1)
    value_at = {1: 1.0, 2: 5.0, 3: 2.0, 4: 3.0}
    current = {}
    real_lr, real_validate, real_save = train_ocl.set_scheduled_lr, train_ocl.validate, train_ocl.atomic_torch_save

    def lr(optimizer, step, cfg):
        current["step"] = step
        return real_lr(optimizer, step, cfg)

    def validate(*args):
        return dict(real_validate(*args), val_ari=value_at[current["step"] + 1], val_ari_fg=0.0)

    def killed_at_step_2(payload, path):
        if payload["step"] == 2 and path.endswith("best.pt"):
            raise KeyboardInterrupt  # kill -9 between the checkpoint files
        real_save(payload, path)

    monkeypatch.setattr(train_ocl, "set_scheduled_lr", lr)
    monkeypatch.setattr(train_ocl, "validate", validate)
    monkeypatch.setattr(train_ocl, "atomic_torch_save", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_ocl.main([config])
    monkeypatch.setattr(train_ocl, "atomic_torch_save", real_save)
    train_ocl.main([config, "--resume", "auto"])
    run = tmp_path / "run"
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["step"] == 2 and best["best"] == 5.0
    assert checkpoint_names(run) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    os.remove(run / "best.pt")
    train_ocl.main([config, "--resume", "auto"])  # nothing left to train; best.pt is recreated
    recreated, source = load_checkpoint(str(run / "best.pt")), load_checkpoint(str(run / "ckpt_0000002.pt"))
    assert recreated["step"] == 2 and "optimizer" not in recreated  # the slim export of the best step
    assert set(recreated["model"]) == set(source["model"])
    assert all(torch.equal(recreated["model"][k], source["model"][k]) for k in source["model"])


def test_two_thread_msf_vae_runs_are_bit_identical(tmp_path, shapes_dir):
    """Codebook gradients of codes[indices] accumulate in a thread-dependent order unless the trainers ask for
    deterministic algorithms: two identical fresh runs on 2 threads must agree bit for bit."""
    torch.set_num_threads(2)
    finals = []
    for name in ("a", "b"):
        config = write_vae_config(tmp_path, shapes_dir, name=f"{name}.yaml", resolution=64, steps=3, val_every=3,
                              batch_size=16, val_samples=4, out_dir=str(tmp_path / name))
        pretrain_vae.main([config])
        finals.append(torch.load(tmp_path / name / "ckpt_0000003.pt", weights_only=True)["model"])
    different = [k for k in finals[0] if not torch.equal(finals[0][k], finals[1][k])]
    assert different == []


def test_resume_with_changed_trajectory_settings_is_refused_unless_allowed(tmp_path, shapes_dir):
    config = write_vae_config(tmp_path, shapes_dir, steps=2, val_every=1)
    pretrain_vae.main([config])
    with pytest.raises(UserError, match=r"other settings that change the run's trajectory \(seed 0 -> 3, steps 2 -> 4, "
                                        r"lr 0.002 -> 0.001\); .*--allow_changed seed,steps,lr"):
        pretrain_vae.main([config, "--resume", "auto", "--steps", "4", "--lr", "0.001", "--seed", "3"])
    for key, value in (("batch_size", "8"), ("data_dir", str(tmp_path)), ("warmup_fraction", "0.5")):
        with pytest.raises(UserError, match=f"trajectory \\({key} "):
            pretrain_vae.main([config, "--resume", "auto", f"--{key}", value])
    # settings that do not change what is learnt are free; an accepted change is taken as given
    pretrain_vae.main([config, "--resume", "auto", "--log_every", "5", "--num_workers", "1"])
    pretrain_vae.main([config, "--resume", "auto", "--steps", "3", "--allow_changed", "steps"])
    assert checkpoint_names(tmp_path / "run") == ["ckpt_0000001.pt", "ckpt_0000002.pt", "ckpt_0000003.pt"]


def test_a_checkpoint_written_before_an_option_existed_resumes_with_that_options_old_default(tmp_path, shapes_dir):
    """A run finished before `video_queries` (OCL) or `vae_norm` (VAE) existed continues under today's code with
    --resume auto, since its checkpoint was trained with the default each option keeps for the old behaviour; a
    checkpoint lacking a model key without such a default is still refused."""
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    ocl = write_ocl_config(tmp_path, shapes_dir, None, name="ocl.yaml", vae_ckpt=vae, steps=2, val_every=2,
                           val_samples=4, out_dir=str(tmp_path / "ocl"))
    vae_config = write_vae_config(tmp_path, shapes_dir, steps=2, val_every=2, out_dir=str(tmp_path / "vae_run"))
    train_ocl.main([ocl])
    pretrain_vae.main([vae_config])
    for run, key in ((tmp_path / "ocl", "video_queries"), (tmp_path / "vae_run", "vae_norm")):
        path = run / "ckpt_0000002.pt"
        state = torch.load(path, weights_only=True)
        del state["config"][key]  # as written before the option came
        torch.save(state, path)
    train_ocl.main([ocl, "--resume", "auto", "--steps", "3", "--allow_changed", "steps"])
    pretrain_vae.main([vae_config, "--resume", "auto", "--steps", "3", "--allow_changed", "steps"])
    assert checkpoint_names(tmp_path / "ocl")[-1] == "ckpt_0000003.pt"
    assert checkpoint_names(tmp_path / "vae_run")[-1] == "ckpt_0000003.pt"
    state = torch.load(tmp_path / "ocl" / "ckpt_0000003.pt", weights_only=True)
    del state["config"]["num_slots"]  # no old default: what the run was trained with is unknown
    torch.save(state, tmp_path / "ocl" / "ckpt_0000003.pt")
    with pytest.raises(UserError, match="was made with num_slots=None but the config says num_slots=4"):
        train_ocl.main([ocl, "--resume", "auto", "--steps", "4", "--allow_changed", "steps"])


def test_a_non_finite_run_writes_no_checkpoint_and_names_the_last_good_one(tmp_path, shapes_dir):
    """lr 1e30: the warm-up's step 0 has lr 0 (ckpt 1 is good); the update of step 1 blows the weights up, and the
    validation after it must not become a checkpoint (nor crash the figure's PCA)."""
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"non-finite by step 2 .*the last good checkpoint is .*ckpt_0000001.pt; "
                                        r"resume from it with a lower lr"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, lr=1e30, grad_clip=0.0, steps=4, val_every=1)])
    assert checkpoint_names(run) == ["ckpt_0000001.pt"]
    state = torch.load(run / "ckpt_0000001.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_the_vae_figure_of_non_finite_codes_is_drawn_without_pca(tmp_path):
    import msf
    config = {k: o.default for k, o in msf.VAE_OPTIONS.items()}
    config.update(quantizer="msf", code_dim=8, vae_width=8, codebook_size=64)
    vae = msf.build_vae(config)
    with torch.no_grad():
        for book in vae.codebooks():  # the code vectors the guidance is made of
            book.weight.fill_(float("inf"))
    pretrain_vae.save_figure(vae, torch.rand(2, 3, 32, 32) * 2 - 1, str(tmp_path / "figure.png"))
    assert (tmp_path / "figure.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------------
# Every input fault ends in one sentence that says what to do.

def copy_with_split(tmp_path, shapes_dir, name, records):
    """A copy of the shapes data with one more split `name` holding `records` (meta copied from val)."""
    import shutil

    import data
    directory = tmp_path / "data"
    shutil.copytree(shapes_dir, directory)
    meta = {k: v for k, v in data.load_split(str(directory / "val.lmdb")).meta.items()
            if k not in ("format", "format_version", "count")}
    writer = data.SplitWriter(str(directory / f"{name}.lmdb"))
    for record in records:
        writer.add(record)
    writer.close(meta)
    return str(directory)


@pytest.mark.parametrize("flag, value", [("val_every", "0"), ("log_every", "-1"), ("batch_size", "0"),
                                         ("resolution", "-32"), ("lr", "0"), ("lr", ".nan"), ("val_every", ".nan")])
def test_out_of_range_settings_are_refused(tmp_path, shapes_dir, flag, value):
    with pytest.raises(UserError, match=f"config key '{flag}' must be"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir), f"--{flag}={value}"])
    assert not (tmp_path / "run").exists()


def test_empty_validation_split_and_out_file_are_refused(tmp_path, shapes_dir):
    import evaluate
    data_dir = copy_with_split(tmp_path, shapes_dir, "empty", [])
    with pytest.raises(UserError, match=r"empty.lmdb holds no samples.*name another split"):
        pretrain_vae.main([write_vae_config(tmp_path, data_dir, val_split="empty")])
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    with pytest.raises(UserError, match=r"empty.lmdb holds no samples"):
        train_ocl.main([write_ocl_config(tmp_path, data_dir, None, vae_ckpt=vae, val_split="empty",
                                         out_dir=str(tmp_path / "ocl"))])
    with pytest.raises(UserError, match=r"empty.lmdb holds no samples"):
        evaluate.main([vae, "--separability", "--data_dir", data_dir, "--split", "empty", "--device", "cpu"])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"--out .*file is a file, not a directory"):
        evaluate.main([vae, "--separability", "--data_dir", data_dir, "--out", str(tmp_path / "file")])
    (tmp_path / "taken").write_text("")
    with pytest.raises(UserError, match=r"out_dir .*taken is a file, not a directory"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir), "--out_dir", str(tmp_path / "taken")])


def test_a_record_without_segment_is_refused(tmp_path, shapes_dir):
    import numpy as np

    import data
    data_dir = copy_with_split(tmp_path, shapes_dir, "noseg", [{"image": np.zeros((64, 64, 3), np.uint8)}])
    dataset = data.OCLDataset(os.path.join(data_dir, "noseg.lmdb"), train=False)
    with pytest.raises(UserError, match=r"noseg.lmdb sample 0 has no 'segment' array .*recreate the split"):
        dataset[0]


def test_video_data_for_an_image_model_is_refused_at_evaluation(tmp_path, shapes_dir, video_dir):
    import evaluate
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    train_ocl.main([write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=vae, steps=1, val_every=1)])
    with pytest.raises(UserError, match=r"holds videos but .* models images; give a matching dataset"):
        evaluate.main([str(tmp_path / "run"), "--data_dir", video_dir, "--device", "cpu", "--figures", "0"])


def test_a_torn_last_log_line_does_not_block_resume(tmp_path, shapes_dir):
    config = write_vae_config(tmp_path, shapes_dir, steps=2, val_every=1)
    pretrain_vae.main([config])
    run = tmp_path / "run"
    os.remove(run / "ckpt_0000002.pt")  # killed while writing the log after step 1's checkpoint
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 1, "lo')
    pretrain_vae.main([config, "--resume", "auto"])
    assert [e["step"] for e in read_jsonl(run / "log.jsonl") if "loss" in e] == [1, 2]  # completed steps


def test_damaged_vae_checkpoints_are_refused_in_one_sentence(tmp_path, shapes_dir):
    path = save_vae(tmp_path / "vae.pt", "msf", 8)
    good = torch.load(path, weights_only=True)
    cases = {"no_data": ({k: v for k, v in good.items() if k != "data"}, r"lacks \['data'\]"),
             "no_key": (dict(good, config={k: v for k, v in good["config"].items() if k != "quantizer"}),
                        "config lacks 'quantizer'"),
             "shape": (dict(good, model={k: (v[:1] if i == 0 else v) for i, (k, v) in
                                         enumerate(good["model"].items())}), "does not fit the model its config")}
    for name, (state, pattern) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(UserError, match=pattern):
            train_ocl.main([write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=str(tmp_path / f"{name}.pt"),
                                             out_dir=str(tmp_path / name))])


def test_an_unsafe_checkpoint_is_refused_with_the_warning_kept(tmp_path):
    import argparse

    from runs import load_checkpoint
    path = tmp_path / "crafted.pt"
    torch.save({"kind": "vae", "config": argparse.Namespace(steps=1)}, path)  # a class a safe load refuses
    with pytest.raises(UserError) as caught:
        load_checkpoint(str(path))
    message = str(caught.value)
    assert "weights_only=False" in message and "can execute arbitrary code" in message and "trust" in message
    assert message.count(".") <= 3 and "\n" not in message  # one sentence, not PyTorch's page of advice


def test_orphaned_temporary_files_go_and_run_files_get_the_umask_mode(tmp_path, shapes_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".tmp-abc123ckpt_0000005.pt").write_bytes(b"half a checkpoint from a killed run")
    old_umask = os.umask(0o022)
    try:
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=1, val_every=1)])
    finally:
        os.umask(old_umask)
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    for name in ("ckpt_0000001.pt", "config.yaml"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    import datetime

    import config
    import devices
    seen = {}
    monkeypatch.setattr(devices.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    d = devices.setup_distributed("cpu", 7)
    assert d.enabled and seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=7)}
    assert config.TRAINING_OPTIONS["ddp_timeout_minutes"].default in range(10, 31)


def test_evaluate_names_the_checkpoint_it_uses_when_best_is_missing(tmp_path, shapes_dir, capsys):
    import evaluate
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    train_ocl.main([write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=vae, steps=1, val_every=1)])
    os.remove(tmp_path / "run" / "best.pt")
    capsys.readouterr()
    evaluate.main([str(tmp_path / "run"), "--device", "cpu", "--figures", "0", "--samples", "4"])
    err = capsys.readouterr().err
    assert "holds no best.pt; evaluating its latest checkpoint" in err and "ckpt_0000001.pt" in err


# ----------------------------------------------------------------------------------------------------------------
# Branching: a resume from a checkpoint older than the run's newest never touches the newer files.

def test_a_branch_from_an_older_checkpoint_keeps_the_newer_files(tmp_path, shapes_dir, capsys):
    run = tmp_path / "run"
    config = write_vae_config(tmp_path, shapes_dir, steps=4, val_every=1)
    pretrain_vae.main([config])
    before = {n: (run / n).read_bytes() for n in checkpoint_names(run)}
    log_before = (run / "log.jsonl").read_bytes()
    branch = [config, "--steps", "3", "--lr", "1e-3", "--allow_changed", "steps,lr", "--resume",
              str(run / "ckpt_0000002.pt")]
    with pytest.raises(UserError, match=r"ckpt_0000002.pt is step 2 but .* holds later checkpoints of the run "
                                        r"\(ckpt_0000003.pt, ckpt_0000004.pt\).*another --out_dir.*--overwrite true"):
        pretrain_vae.main(branch)
    assert {n: (run / n).read_bytes() for n in checkpoint_names(run)} == before
    assert (run / "log.jsonl").read_bytes() == log_before
    # with --overwrite the abandoned branch moves aside whole and stays loadable; the new branch is the latest
    pretrain_vae.main(branch + ["--overwrite", "true"])
    (aside,) = [run / n for n in os.listdir(run) if n.startswith("old-")]
    assert "ckpt_0000002.pt is step 2" in capsys.readouterr().out
    assert {n: (aside / n).read_bytes() for n in checkpoint_names(aside)} == {
        n: before[n] for n in ("ckpt_0000003.pt", "ckpt_0000004.pt")}
    assert (aside / "log.jsonl").read_bytes() == log_before
    assert sorted(os.listdir(aside / "figures")) == ["step_0000003.png", "step_0000004.png"]
    assert checkpoint_names(run) == ["ckpt_0000001.pt", "ckpt_0000002.pt", "ckpt_0000003.pt"]
    assert (run / "ckpt_0000002.pt").read_bytes() == before["ckpt_0000002.pt"]
    assert load_checkpoint(str(run / "ckpt_0000003.pt"))["config"]["lr"] == 1e-3
    assert [e["step"] for e in read_jsonl(run / "log.jsonl") if "loss" in e] == [1, 2, 3]
    assert load_checkpoint(str(aside / "ckpt_0000004.pt"))["config"]["lr"] == 2e-3


def test_a_resume_from_a_slim_export_is_refused(tmp_path, shapes_dir):
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    config = write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=vae, steps=1, val_every=1)
    train_ocl.main([config])
    with pytest.raises(UserError, match=r"best.pt is an export for evaluation .*resume from one of the run's ckpt_"):
        train_ocl.main([config, "--steps", "2", "--allow_changed", "steps", "--resume",
                        str(tmp_path / "run" / "best.pt")])


# ----------------------------------------------------------------------------------------------------------------
# Data changed under a run: a checkpoint knows its training split by the fingerprint written with the split.

def test_a_resume_on_regenerated_data_is_refused(tmp_path):
    import prepare_data
    data_dir = tmp_path / "shapes"

    def generate(seed, train=24):
        prepare_data.write_synthetic("shapes", str(data_dir), {"train": train, "val": 8}, seed=seed, min_objects=2,
                                     max_objects=3, frames=0, workers=1, progress=False)

    generate(seed=0)
    config = write_vae_config(tmp_path, str(data_dir), steps=2, val_every=1, val_samples=4)
    pretrain_vae.main([config])
    run = tmp_path / "run"
    for seed, train in ((5, 24), (0, 16)):  # another seed, another size
        generate(seed, train)
        before = {n: (run / n).read_bytes() for n in checkpoint_names(run)}
        with pytest.raises(UserError, match=r"ckpt_0000002.pt was trained on other data than .*train.lmdb holds now "
                                            r"\(fingerprint [0-9a-f]+, now [0-9a-f]+: the dataset was regenerated "
                                            r"or replaced\); .*--allow_changed data"):
            pretrain_vae.main([config, "--resume", "auto", "--steps", "3", "--allow_changed", "steps"])
        assert {n: (run / n).read_bytes() for n in checkpoint_names(run)} == before
    generate(seed=0)  # the same data again: the same fingerprint
    pretrain_vae.main([config, "--resume", "auto", "--steps", "3", "--allow_changed", "steps"])
    generate(seed=5)
    pretrain_vae.main([config, "--resume", "auto", "--steps", "4", "--allow_changed", "steps,data"])
    # a checkpoint from before fingerprints is resumed unchecked
    state = torch.load(run / "ckpt_0000004.pt", weights_only=True)
    del state["data"]["fingerprint"]
    torch.save(state, run / "ckpt_0000004.pt")
    generate(seed=0)
    pretrain_vae.main([config, "--resume", "auto", "--steps", "5", "--allow_changed", "steps"])
    assert checkpoint_names(run)[-1] == "ckpt_0000005.pt"


# ----------------------------------------------------------------------------------------------------------------
# Stops the run did not choose: each ends in one sentence (through run_main, as on the command line), loses nothing
# and says how to continue.

def run_cli(main, argv, capsys):
    """(exit status, the last line on stderr) of `main(argv)` run as the scripts run it; no traceback above it."""
    from errors import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        try:
            run_main(lambda: main(argv))
        except KeyboardInterrupt:  # escaping, it would stop the test session itself
            pytest.fail("Ctrl-C came through run_main as a traceback")
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Caught" not in err, err
    return stopped.value.code, err[err.rindex("\n", 0, len(err) - 1) + 1:] if err.count("\n") > 1 else err


def test_an_error_in_a_loader_worker_is_one_sentence(tmp_path, shapes_dir, capsys):
    import numpy as np
    data_dir = copy_with_split(tmp_path, shapes_dir, "noseg", [{"image": np.zeros((64, 64, 3), np.uint8)}])
    status, err = run_cli(pretrain_vae.main, [write_vae_config(tmp_path, data_dir, train_split="noseg",
                                                               num_workers=1, steps=1)], capsys)
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and "Caught" not in err
    assert "noseg.lmdb sample 0 has no 'segment' array" in err


def test_a_full_disk_at_a_checkpoint_loses_nothing(tmp_path, shapes_dir, monkeypatch, capsys):
    import errno

    import files
    real_save = torch.save

    def full_disk_at_step_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    config = write_vae_config(tmp_path, shapes_dir, steps=3, val_every=1)
    monkeypatch.setattr(files.torch, "save", full_disk_at_step_2)
    status, err = run_cli(pretrain_vae.main, [config], capsys)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert status == 2 and err.count("\n") == 1, err
    assert "could not write " + str(run / "ckpt_0000002.pt") + " (no space left on the device)" in err
    assert "ckpt_0000001.pt (step 1), continue from it with --resume auto" in err
    assert checkpoint_names(run) == ["ckpt_0000001.pt"] and not [n for n in os.listdir(run) if n.startswith(".tmp")]
    pretrain_vae.main([config, "--resume", "auto"])
    assert checkpoint_names(run) == ["ckpt_0000001.pt", "ckpt_0000002.pt", "ckpt_0000003.pt"]


def test_a_read_only_run_directory_is_one_sentence(tmp_path, shapes_dir, monkeypatch, capsys):
    """Root ignores a directory's mode bits (the tests run as root), so the refusal is simulated where the run
    first writes: its lock file, then (with the lock taken) its first atomic write."""
    import builtins
    import errno

    import files

    def read_only_lock(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, *args, **kwargs)

    config = write_vae_config(tmp_path, shapes_dir, steps=1, val_every=1)
    monkeypatch.setattr(files, "open", read_only_lock, raising=False)  # exclusive_lock opens the lock file
    status, err = run_cli(pretrain_vae.main, [config], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"cannot use {tmp_path / 'run'} as the run directory: read-only file system" in err
    monkeypatch.undo()

    def no_temporary_files(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", no_temporary_files)
    status, err = run_cli(pretrain_vae.main, [config], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"could not write {tmp_path / 'run' / 'environment.json'} (permission denied)" in err  # the first file


def test_ctrl_c_says_where_the_run_stopped_and_how_to_continue(tmp_path, shapes_dir, monkeypatch, capsys):
    config = write_vae_config(tmp_path, shapes_dir, steps=4, val_every=1)
    real_lr = pretrain_vae.set_scheduled_lr

    def interrupted_at_step_2(optimizer, step, cfg):
        if step == 2:
            raise KeyboardInterrupt
        return real_lr(optimizer, step, cfg)

    monkeypatch.setattr(pretrain_vae, "set_scheduled_lr", interrupted_at_step_2)
    status, err = run_cli(pretrain_vae.main, [config], capsys)
    monkeypatch.undo()
    assert status == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: stopped by Ctrl-C; ") and "ckpt_0000002.pt (step 2), continue from it with " \
                                                          "--resume auto" in err
    pretrain_vae.main([config, "--resume", "auto"])
    assert checkpoint_names(tmp_path / "run")[-1] == "ckpt_0000004.pt"


class RunsACommand:
    """A pickle that calls os.system when loaded without weights_only (torch words its refusal in lower case)."""

    def __reduce__(self):
        return os.system, ("touch PWNED",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_every_refused_unsafe_checkpoint_says_it_could_execute_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "crafted.pt"
    torch.save({"kind": "vae", "config": {}, "payload": RunsACommand()}, path)
    with pytest.raises(UserError) as caught:
        load_checkpoint(str(path))
    message = str(caught.value)
    assert "(posix.system)" in message and "can execute arbitrary code" in message and "\n" not in message
    import pickle
    with open(tmp_path / "protocol4.pt", "wb") as f:  # an opcode the safe load refuses before it sees the global
        pickle.dump({"kind": "vae", "payload": RunsACommand()}, f, protocol=4)
    with pytest.raises(UserError, match=r"not a readable checkpoint \(UnpicklingError: Unsupported operand 149\); .*"
                                        r"crafted; .*weights_only=False\) can execute arbitrary code"):
        load_checkpoint(str(tmp_path / "protocol4.pt"))
    assert not (tmp_path / "PWNED").exists()


def test_ranges_that_would_crash_later_are_refused_first(tmp_path, shapes_dir):
    import evaluate
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    config = write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=vae, steps=1, val_every=1)
    with pytest.raises(UserError, match=r"config key 'num_slots' must be at least 1, got 0"):
        train_ocl.main([config, "--num_slots", "0"])
    with pytest.raises(UserError, match=r"8-pixel patches, which do not divide resolution 36; use a multiple of 8"):
        train_ocl.main([config, "--method", "dinosaur", "--guidance", "none", "--encoder", "dino_biglittle",
                        "--resolution", "36", "--out_dir", str(tmp_path / "dino")])
    for flag, value, least in (("samples", "-3", 0), ("batch_size", "0", 1), ("num_workers", "-1", 0)):
        with pytest.raises(UserError, match=f"--{flag} must be at least {least}, got {value}"):
            evaluate.main([vae, "--separability", "--data_dir", shapes_dir, f"--{flag}", value])


def test_overwrite_moves_the_old_evaluation_and_keeps_a_vae_inside_the_run_readable(tmp_path, shapes_dir):
    run = tmp_path / "run"
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    config = write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=vae, steps=1, val_every=1)
    train_ocl.main([config])
    (run / "eval_val").mkdir()
    (run / "eval_val" / "metrics.json").write_text("{}")  # as evaluate.py RUN leaves it
    train_ocl.main([config, "--overwrite", "true"])
    (aside,) = [n for n in os.listdir(run) if n.startswith("old-")]
    assert not (run / "eval_val").exists() and (run / aside / "eval_val" / "metrics.json").read_text() == "{}"
    # a VAE kept inside the run directory (best.pt of a VAE run copied there) would move before it is read
    os.replace(vae, run / "best.pt")
    before = sorted(os.listdir(run))
    with pytest.raises(UserError, match=r"vae_ckpt .*best.pt lies in .*run, whose run files move to .*before the VAE "
                                        r"is read; copy the VAE out"):
        train_ocl.main([config, "--overwrite", "true", "--vae_ckpt", str(run / "best.pt")])
    assert sorted(n for n in os.listdir(run) if n != ".lock") == before


def test_a_full_disk_while_logging_names_the_log(tmp_path, shapes_dir, monkeypatch, capsys):
    import builtins
    import errno

    import runs

    def full_log(path, *args, **kwargs):
        if str(path).endswith("log.jsonl") and "a" in args:
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(runs, "open", full_log, raising=False)  # RunLog appends to its logs
    status, err = run_cli(pretrain_vae.main, [write_vae_config(tmp_path, shapes_dir, steps=1)], capsys)
    assert status == 2 and f"could not write {tmp_path / 'run' / 'log.jsonl'} (no space left on the device)" in err


def test_torch_s_writer_failing_on_a_full_disk_is_the_full_disk_sentence(tmp_path, shapes_dir, monkeypatch, capsys):
    """A large checkpoint on a full disk fails inside torch's zip writer as a RuntimeError, not an OSError."""
    import files
    real_save = torch.save

    def writer_fails_at_step_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:
            f.write(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 5312 vs 5212")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(files.torch, "save", writer_fails_at_step_2)
    status, err = run_cli(pretrain_vae.main, [write_vae_config(tmp_path, shapes_dir, steps=3, val_every=1)], capsys)
    run = tmp_path / "run"
    assert status == 2 and err.count("\n") == 1, err
    assert f"could not write {run / 'ckpt_0000002.pt'} (the write failed, most likely no space left on the device)" \
           in err and "ckpt_0000001.pt (step 1), continue from it with --resume auto" in err
    assert checkpoint_names(run) == ["ckpt_0000001.pt"] and not [n for n in os.listdir(run) if n.startswith(".tmp")]


@pytest.mark.parametrize("error,words", [
    (RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's "
                  "workers are out of shared memory. Please try to raise your shared memory limit."),
     "the data loader workers ran out of shared memory (DataLoader worker (pid 4242) is killed by signal: Bus error."),
    (RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "RuntimeError: unable to write to file </torch_18692_1915367643_0>: No space left on device (28)"),
     "the data loader workers ran out of shared memory (RuntimeError: unable to write to file </torch_18692_"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
     "out of GPU memory (CUDA out of memory"),
    (MemoryError(), "out of host memory (MemoryError); lower batch_size or val_batch_size, or the model's size"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:2345"),
     "another rank of this torchrun job stopped or stalled, so this rank cannot go on ("),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1200000ms for "
                  "recv operation to complete"), "another rank of this torchrun job stopped or stalled"),
])
def test_faults_of_the_machine_are_one_sentence(error, words, capsys):
    def failing(argv):
        raise error

    status, err = run_cli(failing, [], capsys)
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: " + words), err
    if "shared memory" in words:
        assert "--num_workers 0" in err and "/dev/shm" in err


def test_other_runtime_errors_keep_their_traceback():
    from errors import run_main

    def failing():
        raise RuntimeError("a bug in the code")

    with pytest.raises(RuntimeError, match="a bug in the code"):
        run_main(failing)


def test_a_resume_on_a_retrained_guidance_vae_says_so(tmp_path, shapes_dir):
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    config = write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=vae, steps=1, val_every=1)
    train_ocl.main([config])
    save_vae(tmp_path / "vae.pt", "msf", 8, num_scales=2)  # retrained with another architecture
    resume = [config, "--resume", "auto", "--steps", "2", "--allow_changed", "steps"]
    with pytest.raises(UserError, match=r"ckpt_0000001.pt was trained with another guidance VAE than .*vae.pt holds "
                                        r"now \(it was retrained or replaced since: .* differs\); put the VAE the run"):
        train_ocl.main(resume)
    save_vae(tmp_path / "vae.pt", "msf", 8)  # retrained with the same architecture: other weights
    state = torch.load(vae, weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, vae)
    with pytest.raises(UserError, match="was trained with another guidance VAE"):
        train_ocl.main(resume)
    save_vae(tmp_path / "vae.pt", "msf", 8)  # the VAE it was trained with, back in place
    train_ocl.main(resume)
    assert checkpoint_names(tmp_path / "run")[-1] == "ckpt_0000002.pt"
