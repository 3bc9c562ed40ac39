"""evaluate.py end to end: rebuilds models from checkpoints, agrees with training-time validation, aggregates
seeds, measures VAE separability, fails clearly on bad checkpoints, and loads older ones by one rule."""

import json
import math
import os

import numpy as np
import pytest
import torch

import evaluate
import train_ocl
from checkpoints import load_for_evaluation
from config import load_config
from data import OCLDataset
from errors import UserError
from helpers import read_jsonl, save_vae, write_ocl_config

pytest.importorskip("sklearn")
from sklearn.metrics import adjusted_rand_score  # noqa: E402  (after the skip)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_dir):
    """Two tiny SLATE + MSF runs (seeds 0 and 1), validated on the whole val split at the end."""
    root = tmp_path_factory.mktemp("eval")
    vae = save_vae(root / "vae.pt", "msf", 8)
    runs = []
    for seed in (0, 1):
        config = write_ocl_config(root, shapes_dir, None, name=f"seed{seed}.yaml", vae_ckpt=vae, steps=3, val_every=3,
                              val_samples=0, seed=seed, out_dir=str(root / f"seed{seed}"))
        train_ocl.main([config])
        runs.append(str(root / f"seed{seed}"))
    return root, vae, runs


def test_one_checkpoint_matches_training_validation(trained, tmp_path, shapes_dir):
    _, _, runs = trained
    evaluate.main([runs[0], "--out", str(tmp_path / "eval"), "--device", "cpu", "--num_workers", "0"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    validation = [e for e in read_jsonl(os.path.join(runs[0], "log.jsonl")) if "val_ari" in e][-1]
    for key in ("ari", "ari_fg", "miou", "mbo"):  # the whole split both times, through different code paths
        assert metrics[key] == pytest.approx(validation[f"val_{key}"], abs=1e-9), key
    assert 0 <= metrics["miou_fg"] <= 100 and metrics["runs"][0]["miou_count"] == 16
    # bg_slots is a mean count of slots (at least one slot holds >= 10 % of the background), not a percent
    assert 0 <= metrics["bg_iou"] <= 100 and 1 <= metrics["bg_slots"] <= 4  # write_ocl_config: 4 slots
    # per-size mBO: the object counts behind each group, counted here by a plain loop over the split's segments
    expected = {"small": 0, "medium": 0, "large": 0}
    dataset = OCLDataset(os.path.join(shapes_dir, "val.lmdb"), train=False, resolution=32)  # write_ocl_config's
    for index in range(len(dataset)):
        segment = np.asarray(dataset[index]["segment"])
        for object_id in set(segment.ravel().tolist()) - {0, 255}:
            share = (segment == object_id).sum() / segment.size
            expected["small" if share < 0.01 else "medium" if share < 0.05 else "large"] += 1
    assert {g: metrics["runs"][0][f"objects_{g}"] for g in expected} == expected
    for group, number in expected.items():
        assert (metrics[f"mbo_{group}"] is None) == (number == 0) or 0 <= metrics[f"mbo_{group}"] <= 100
    # the no-model rows: write_ocl_config's 4 slots -> a fixed 2 x 2 grid, scored here by sklearn on the quadrants
    quadrant = (np.arange(32)[:, None] >= 16) * 2 + (np.arange(32)[None, :] >= 16)
    by_sklearn = []
    for index in range(len(dataset)):
        segment = np.asarray(dataset[index]["segment"])
        keep = (segment != 0) & (segment != 255)
        if keep.any():
            by_sklearn.append(adjusted_rand_score(segment[keep], quadrant[keep]))
    assert set(metrics["baselines"]) == {"one_segment", "grid_2x2"}
    assert metrics["baselines"]["grid_2x2"]["ari_fg"] == pytest.approx(100 * np.mean(by_sklearn), abs=1e-9)
    assert metrics["baselines"]["one_segment"]["bg_slots"] == 1 and metrics["baselines"]["one_segment"]["ari"] == 0
    assert "no model: grid 2x2" in (tmp_path / "eval" / "table.md").read_text()
    figures = [n for n in os.listdir(tmp_path / "eval") if n.endswith(".png")]
    assert figures and (tmp_path / "eval" / "table.md").exists()


def test_seeds_are_aggregated_as_mean_and_std(trained, tmp_path):
    _, _, runs = trained
    evaluate.main(runs + ["--out", str(tmp_path / "eval"), "--device", "cpu", "--num_workers", "0",
                          "--figures", "0"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    values = [run["ari"] for run in metrics["runs"]]
    assert len(values) == 2
    assert metrics["ari"] == pytest.approx(np.mean(values)) and metrics["ari_std"] == pytest.approx(np.std(values))


def test_video_checkpoint_scores_whole_videos(tmp_path, video_dir):
    vae = save_vae(tmp_path / "vae.pt", "vq", 8)
    config = write_ocl_config(tmp_path, video_dir, None, method="steve", guidance="vq", vae_ckpt=vae, steps=1,
                          batch_size=2, val_every=1, val_batch_size=1, val_samples=0)
    train_ocl.main([config])
    evaluate.main([str(tmp_path / "run"), "--out", str(tmp_path / "eval"), "--device", "cpu", "--num_workers", "0",
                   "--figures", "2"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["runs"][0]["ari_count"] == 2  # one score per video, not per frame
    assert sorted(n for n in os.listdir(tmp_path / "eval") if n.endswith(".png")) == ["run_video0.png",
                                                                                     "run_video1.png"]


def test_vae_separability_table(trained, tmp_path, shapes_dir):
    root, _, _ = trained
    vq = save_vae(root / "vq.pt", "vq", 8)
    msf_vae = save_vae(root / "msf_sep.pt", "msf", 8)
    evaluate.main([vq, msf_vae, "--separability", "--data_dir", shapes_dir, "--samples", "6", "--out",
                   str(tmp_path / "sep"), "--device", "cpu", "--num_workers", "0"])
    runs = json.loads((tmp_path / "sep" / "metrics.json").read_text())["runs"]
    assert sorted(runs[0]["separability"]["table"]) == ["final_scale1"]
    assert sorted(runs[1]["separability"]["table"]) == sorted(f"{r}_scale{n}" for r in evaluate.REPRESENTATIONS
                                                              for n in (1, 2, 3))
    assert sorted(runs[1]["separability"]["codes_used"]) == [f"codebook{i}" for i in range(4)]
    for key in ("final_scale1", "si_before_scale1", "si_after_scale1", "sv_scale1"):
        row = runs[1]["separability"]["table"][key]  # 8x8 code maps at scale 1 (32-px images)
        assert row["inter"] > 0 and row["intra"] >= 0, key
        assert row["ratio"] is None or math.isfinite(row["ratio"]), key  # undefined (intra 0) is null
        assert -100 <= row["object_ari"] <= 100 and 1 <= row["tokens"] <= 64, key
    assert (tmp_path / "sep" / "vq_code_maps.png").exists() and (tmp_path / "sep" / "msf_sep_code_maps.png").exists()


def test_bad_checkpoints_fail_with_one_sentence(trained, tmp_path):
    root, vae, _ = trained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        evaluate.main([str(bad), "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="does not exist"):
        evaluate.main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="evaluate it with --separability"):
        evaluate.main([vae, "--out", str(tmp_path / "x"), "--data_dir", str(root)])
    state = torch.load(os.path.join(root, "seed0", "best.pt"), weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("decoder.")}
    torch.save(state, tmp_path / "pruned.pt")
    with pytest.raises(UserError, match="does not fit the model its own config describes"):
        evaluate.main([str(tmp_path / "pruned.pt"), "--out", str(tmp_path / "x")])
    state = torch.load(os.path.join(root, "seed0", "best.pt"), weights_only=True)
    del state["config"]["decoder_heads"]  # as if written before the key existed
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(UserError, match="older version: its config lacks 'decoder_heads'"):
        evaluate.main([str(tmp_path / "old.pt"), "--out", str(tmp_path / "x")])


def test_older_checkpoints_load_only_when_the_missing_keys_default_to_the_old_behaviour(trained, tmp_path):
    root, vae, _ = trained
    state = torch.load(os.path.join(root, "seed0", "best.pt"), weights_only=True)
    reference, _ = load_for_evaluation(os.path.join(root, "seed0", "best.pt"), torch.device("cpu"))
    # Keys that came later with the earlier behaviour as their default: the checkpoint loads and, the oracle, gives
    # the same masks as the untouched checkpoint.
    for key in ("sa_truncation", "guidance_noise", "query_sigma_anneal_fraction", "denoiser_ema", "video_queries"):
        del state["config"][key]
    for key in ("pyramid", "vae_losses", "vae_norm"):
        del state["vae_config"][key]
    torch.save(state, tmp_path / "older.pt")
    older, _ = load_for_evaluation(str(tmp_path / "older.pt"), torch.device("cpu"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    expected = reference.slots(images, 0.0)[1]
    torch.manual_seed(0)
    assert torch.equal(older.slots(images, 0.0)[1], expected)
    # A key whose default changed what it controls: refused, for the OCL config, its VAE's config and a VAE alone.
    del state["config"]["beta_start"]
    torch.save(state, tmp_path / "refused.pt")
    with pytest.raises(UserError, match="older version: its config lacks 'beta_start'"):
        load_for_evaluation(str(tmp_path / "refused.pt"), torch.device("cpu"))
    vae_state = torch.load(vae, weights_only=True)
    del vae_state["config"]["num_scales"]
    torch.save(vae_state, tmp_path / "vae_old.pt")
    with pytest.raises(UserError, match="older version: its config lacks 'num_scales'"):
        load_for_evaluation(str(tmp_path / "vae_old.pt"), torch.device("cpu"))
    config = write_ocl_config(tmp_path, str(root), None, vae_ckpt=str(tmp_path / "vae_old.pt"))
    with pytest.raises(UserError, match="older version: its config lacks 'num_scales'"):
        train_ocl.load_guidance_vae(load_config(train_ocl.OPTIONS, [config]))


def test_an_evaluation_names_its_checkpoint_and_never_overwrites_another(trained, capsys):
    _, _, runs = trained
    run = runs[1]
    fast = ["--device", "cpu", "--num_workers", "0", "--figures", "0", "--samples", "4"]
    evaluate.main([run] + fast)  # the run: its best.pt, into RUN/eval_val as before
    evaluate.main([os.path.join(run, "ckpt_0000003.pt")] + fast)  # a checkpoint of it: beside, named after it
    best = json.loads(open(os.path.join(run, "eval_val", "metrics.json")).read())
    step = json.loads(open(os.path.join(run, "eval_val_step3", "metrics.json")).read())
    assert best["runs"][0]["checkpoint"].endswith("best.pt")
    assert step["runs"][0]["checkpoint"].endswith("ckpt_0000003.pt")
    before = open(os.path.join(run, "eval_val", "metrics.json")).read()
    with pytest.raises(UserError, match=r"eval_val already holds the metrics of an earlier evaluation "
                                        r"\(metrics.json\); pass --overwrite to replace them, or choose another --out"):
        evaluate.main([run] + fast)
    assert open(os.path.join(run, "eval_val", "metrics.json")).read() == before
    evaluate.main([run, "--overwrite"] + fast)
    assert evaluate.default_output(run, "test") == os.path.join(run, "eval_test")
    assert evaluate.default_output(os.path.join(run, "ckpt_0000003.pt"), "val") == os.path.join(run, "eval_val_step3")


def test_a_dataset_regenerated_since_training_is_noted_in_the_report(trained, tmp_path, capsys):
    root, _, runs = trained
    state = torch.load(os.path.join(runs[0], "best.pt"), weights_only=True)
    state["data"]["fingerprint"] = "0123456789abcdef"  # trained on other data than data_dir holds now
    torch.save(state, tmp_path / "regenerated.pt")
    evaluate.main([str(tmp_path / "regenerated.pt"), "--out", str(tmp_path / "eval"), "--device", "cpu",
                   "--num_workers", "0", "--figures", "0", "--samples", "4"])
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: regenerated was trained")]
    assert len(note) == 2, note  # when it is found, and in the report
    assert "training split fingerprint 0123456789abcdef, now " in note[0] and "regenerated or re-pointed" in note[0]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["runs"][0]["data_note"] == note[0]
    assert note[0] in (tmp_path / "eval" / "table.md").read_text()
    evaluate.main([os.path.join(runs[0], "best.pt"), "--out", str(tmp_path / "same"), "--device", "cpu",
                   "--num_workers", "0", "--figures", "0", "--samples", "4"])
    assert "note: " not in capsys.readouterr().out  # its own data: nothing to say
