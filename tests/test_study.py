"""study.py: the demo's summary.json is read off evaluate.py's metrics.json, one entry per guidance."""

import os

import pytest

import study


def test_demo_summary_maps_each_guidance_to_its_runs_metrics(tmp_path):
    runs = {"vq": str(tmp_path / "slate_vq"), "msf": str(tmp_path / "slate_msf")}
    metrics = {"runs": [  # as evaluate.py --compare writes it: checkpoint files, in the order given
        {"checkpoint": os.path.join(runs["vq"], "best.pt"), "ari": 10.0, "ari_fg": 20.0, "miou": 30.0, "mbo": 40.0,
         "miou_fg": 1.0, "mask_entropy": 99.0},
        {"checkpoint": os.path.join(runs["msf"], "best.pt"), "ari": 11.0, "ari_fg": 55.5, "miou": 31.0, "mbo": 33.0,
         "miou_fg": 2.0, "mask_entropy": 50.0}]}
    summary = study.demo_summary(metrics, {path: guidance for guidance, path in runs.items()})
    assert summary == {"vq": {"ari": 10.0, "ari_fg": 20.0, "miou": 30.0, "mbo": 40.0},
                       "msf": {"ari": 11.0, "ari_fg": 55.5, "miou": 31.0, "mbo": 33.0}}
    with pytest.raises(ValueError, match="none of the demo's runs"):
        study.demo_summary({"runs": [{"checkpoint": str(tmp_path / "other" / "best.pt")}]},
                           {runs["vq"]: "vq"})
