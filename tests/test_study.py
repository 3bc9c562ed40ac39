"""study.py: the demo's summary.json is read off evaluate.py's metrics.json, one entry per guidance."""

import json
import math
import os

import numpy as np
import pytest

import pretrain_vae
import study
import train_ocl
from config import load_config
from helpers import ROOT, STOPPABLE_STAGE, hold_flock


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
    final = {"runs": [{"checkpoint": os.path.join(runs["msf"], "ckpt_0005500.pt"), "ari": 1.0, "ari_fg": 2.0,
                       "miou": 3.0, "mbo": 4.0}]}  # the demo scores each run's final checkpoint
    assert study.demo_summary(final, {path: g for g, path in runs.items()}) == {
        "msf": {"ari": 1.0, "ari_fg": 2.0, "miou": 3.0, "mbo": 4.0}}
    with pytest.raises(ValueError, match="none of the demo's runs"):
        study.demo_summary({"runs": [{"checkpoint": str(tmp_path / "other" / "best.pt")}]},
                           {runs["vq"]: "vq"})


def student_t_two_sided_p(t: float, dof: int) -> float:
    """Two-sided p-value of Student's t by integrating its density numerically (independent of scipy)."""
    x = np.linspace(abs(t), abs(t) + 2000.0, 2_000_001)
    density = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2)) * (
        1 + x ** 2 / dof) ** (-(dof + 1) / 2)
    return float(2 * np.trapezoid(density, x))


def test_paired_table_gives_per_seed_differences_and_a_paired_t_test():
    def metrics(values):  # evaluate.py's metrics.json shape: one entry per run, in seed order
        return {"runs": [{"ari": v, "ari_fg": v + 10, "miou": 20.0, "mbo": None if v < 0 else 30.0} for v in values]}
    vq, msf = [10.0, 12.0, 20.0], [11.0, 14.0, 23.0]  # differences 1, 2, 3
    lines = study.paired_table(metrics(vq), metrics(msf), [0, 1, 2])
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    cells = [c.strip() for c in rows["ari"].strip("|").split("|")]
    assert cells[1:5] == ["+1.0", "+2.0", "+3.0", "+2.0"]
    # t = mean(d) / (sd(d) / sqrt(n)) = 2 / (1 / sqrt 3), 2 degrees of freedom
    assert float(cells[5]) == pytest.approx(student_t_two_sided_p(2 * math.sqrt(3), 2), abs=1e-3)
    assert rows["miou"].strip("|").split("|")[-1].strip() == "n/a"  # no spread of differences: no test
    with_undefined = study.paired_table(metrics([-1.0, 2.0]), metrics([1.0, 2.0]), [0, 1])
    assert [c.strip() for c in with_undefined[-1].strip("|").split("|")][-2:] == ["n/a", "n/a"]
    with pytest.raises(ValueError, match="runs for 3 seeds"):
        study.paired_table(metrics([1.0, 2.0]), metrics([1.0, 2.0]), [0, 1, 2])


def test_run_all_runs_stages_side_by_side_and_stops_on_a_failure(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("import sys, time\nopen(sys.argv[1], 'w').write(str(time.time()))\n"
                      "if int(sys.argv[2]):\n    sys.exit(int(sys.argv[2]))\n"  # a failing stage fails at once
                      "time.sleep(1.0)\nopen(sys.argv[1], 'a').write(' ' + str(time.time()))\n")
    runner = study.Study(str(tmp_path / "study"), "cpu", 1.0, jobs=2)
    marks = [tmp_path / f"mark{i}" for i in range(3)]
    runner.run_all([(str(script), [marks[i], 0], f"stage {i}") for i in range(3)])
    spans = [tuple(map(float, m.read_text().split())) for m in marks]
    assert spans[1][0] < spans[0][1] and spans[0][0] < spans[1][1]  # the first two overlapped
    assert spans[2][0] >= min(spans[0][1], spans[1][1])  # the third waited for a free slot
    assert sorted(what for what, _ in runner.timings) == ["stage 0", "stage 1", "stage 2"]
    assert (tmp_path / "study" / "logs" / "stage_0.log").exists()

    failing = [(str(script), [tmp_path / "f0", 3], "bad"), (str(script), [tmp_path / "f1", 0], "good"),
               (str(script), [tmp_path / "f2", 0], "later")]
    with pytest.raises(SystemExit, match="'bad' \\(exit 3"):
        runner.run_all(failing)
    assert (tmp_path / "f1").read_text().count(" ") == 1  # the stage running beside it finished
    assert not (tmp_path / "f2").exists()  # nothing new started after the failure


def test_run_all_runs_a_chain_in_order_without_waiting_for_the_other_chains(tmp_path):
    script = tmp_path / "stage.py"  # writes its start time, sleeps argv[2] seconds, appends its end time
    script.write_text("import sys, time\nopen(sys.argv[1], 'w').write(str(time.time()))\n"
                      "time.sleep(float(sys.argv[2]))\nopen(sys.argv[1], 'a').write(' ' + str(time.time()))\n")
    runner = study.Study(str(tmp_path / "study"), "cpu", 1.0, jobs=2)
    first, second, slow = (tmp_path / name for name in ("first", "second", "slow"))
    runner.run_all([[(str(script), [first, 0.1], "first"), (str(script), [second, 0.1], "second")],
                    (str(script), [slow, 2.0], "slow")])
    spans = {p.name: tuple(map(float, p.read_text().split())) for p in (first, second, slow)}
    assert spans["second"][0] >= spans["first"][1]  # in order within the chain
    assert spans["second"][1] < spans["slow"][1]  # and it did not wait for the slow chain to end
    assert [what for what, _ in runner.timings][-1] == "slow"


def test_binding_table_names_the_first_validation_at_or_above_the_threshold(tmp_path):
    def write_log(name, rows):
        run = tmp_path / name
        run.mkdir()
        (run / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(run)

    train_row = {"step": 600, "loss": 0.1, "lr": 1e-4}  # training rows carry no validation metrics
    bound = write_log("bound", [  # out of order, as a resumed run may leave none but a reader must not assume it
        {"step": 1500, "val_ari_fg": 61.0, "val_mbo": 31.0, "val_mask_entropy": 40.0},
        {"step": 500, "val_ari_fg": None, "val_mbo": 20.0, "val_mask_entropy": 100.0},
        train_row,
        {"step": 1000, "val_ari_fg": 50.0, "val_mbo": 25.0, "val_mask_entropy": 60.0}])
    unbound = write_log("unbound", [{"step": 500, "val_ari_fg": 49.9, "val_mbo": 10.0, "val_mask_entropy": 99.0}])
    empty = write_log("empty", [train_row])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in study.binding_table([bound, unbound, empty])[2:]]
    assert rows[0] == ["bound", "1000", "1500", "61.0", "31.0", "40.0"]  # 50.0 counts: "at or above"
    assert rows[1] == ["unbound", "not bound", "500", "49.9", "10.0", "99.0"]
    assert rows[2][:2] == ["empty", "no validation logged"]


def test_the_full_study_scores_each_runs_last_checkpoint_not_its_best(tmp_path, monkeypatch):
    runs = [tmp_path / "run_s0", tmp_path / "run_s1"]
    for run, steps in zip(runs, ([100, 900, 1000], [50, 200])):
        run.mkdir()
        for name in [f"ckpt_{step:07d}.pt" for step in steps] + ["best.pt"]:
            (run / name).write_bytes(b"")
    runner = study.Study(str(tmp_path / "study"), "cpu", 1.0)
    given = []

    def fake_run(script, args, what):  # stands in for evaluate.py: records its inputs, writes its metrics.json
        given.append(args[:args.index("--out")])
        out = args[args.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump({"runs": []}, f)

    monkeypatch.setattr(runner, "run", fake_run)
    runner.evaluate([str(r) for r in runs], "final", final=True)
    runner.evaluate([str(r) for r in runs], "best")
    assert given[0] == [str(runs[0] / "ckpt_0001000.pt"), str(runs[1] / "ckpt_0000200.pt")]
    assert given[1] == [str(r) for r in runs]  # a run directory: evaluate.py takes its best.pt


def test_table_rows_show_one_run_or_mean_and_std_with_the_size_and_background_columns():
    one = {"runs": [{"ari": 10.0, "ari_fg": 60.04, "miou": 30.0, "mbo": None, "mbo_small": 12.34, "mbo_medium": None,
                     "mbo_large": 70.0, "bg_iou": 51.7, "bg_slots": 2.6}]}
    assert study.mean_std_row("vq", one) == "| vq | 10.0 | 60.0 | 30.0 | n/a | 12.3 | n/a | 70.0 | 51.7 | 2.6 |"
    seeds = {"runs": [{}, {}], "ari": 21.4, "ari_std": 2.3, "ari_fg": 60.2, "ari_fg_std": 2.0, "miou": 36.8,
             "miou_std": 1.3, "mbo": 37.8, "mbo_std": 1.3}  # written before the size and background columns existed
    assert study.mean_std_row("vq", seeds) == ("| vq | 21.4 ± 2.3 | 60.2 ± 2.0 | 36.8 ± 1.3 | 37.8 ± 1.3 | n/a | n/a | "
                                               "n/a | n/a | n/a |")
    assert study.metric_header("guidance")[0] == ("| guidance | ari | ari_fg | miou | mbo | mbo_small | mbo_medium | "
                                                  "mbo_large | bg_iou | bg_slots |")


@pytest.mark.parametrize("method", sorted(study.DEMO_METHODS))
def test_each_demo_has_its_configs_and_they_name_the_demos_vaes(method):
    """`study.py demo --method M` trains configs/vae_<g>_easy.yaml and then configs/M_<g>_easy.yaml over it, for each
    of its guidances g: both must exist, the OCL config's VAE must be that VAE config's run (the demo passes the
    path, a config naming another would mislead a reader), and its guidance kind must be g."""
    for guidance in study.DEMO_METHODS[method]["guidance"]:
        vae = load_config(pretrain_vae.OPTIONS, [os.path.join(ROOT, "configs", f"vae_{guidance}_easy.yaml")])
        ocl = load_config(train_ocl.OPTIONS, [os.path.join(ROOT, "configs", f"{method}_{guidance}_easy.yaml")])
        assert ocl["method"] == method and ocl["guidance"] == vae["quantizer"] == guidance
        assert ocl["vae_ckpt"] == vae["out_dir"] and vae["data_dir"] == "data/shapes_easy"
        data = study.DEMO_METHODS[method].get("data", "shapes_easy")  # STEVE: the easy videos the demo generates
        assert ocl["data_dir"] == f"data/{data}" and data in study.DATA_SIZES and data in study.DATA_COMMANDS


def test_a_demo_of_a_method_that_has_not_bound_says_so(tmp_path):
    with pytest.raises(SystemExit) as stop:
        study.main(["demo", "--method", "slotdiffusion", "--out", str(tmp_path / "demo")])
    assert "no configuration of slotdiffusion has bound on the CPU yet" in str(stop.value)
    assert not os.path.exists(tmp_path / "demo")  # refused before anything is generated


def stopped_study(runner, stages, capsys) -> str:
    """The last stderr line of run_all under run_main, stopped by SIGTERM from one of its stages (exit 143)."""
    from errors import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: runner.run_all(stages))
    err = capsys.readouterr().err
    assert stopped.value.code == 143 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_stopped_study_stops_its_running_stages_and_says_so_in_one_sentence(tmp_path, capsys, jobs):
    script = tmp_path / "stage.py"
    script.write_text(STOPPABLE_STAGE)
    runner = study.Study(str(tmp_path / "study"), "cpu", 1.0, jobs=jobs)
    first, second = tmp_path / "first", tmp_path / "second"
    if jobs == 1:
        stages, marks = [(str(script), [first, first], "first")], [first]
    else:
        stages = [(str(script), [first, "-"], "first"), (str(script), [second, first], "second")]
        marks = [first, second]
    last = stopped_study(runner, stages, capsys)
    named = "the running stage 'first' stopped too, keeping its checkpoints" if jobs == 1 else \
        "the running stages 'first', 'second' stopped too, keeping their checkpoints"
    assert last == f"error: stopped by SIGTERM; {named}; rerun the same command to continue, finished stages are kept"
    for mark in marks:  # each stage was told (SIGTERM, which a trainer takes as Ctrl-C) and has ended
        assert (tmp_path / (mark.name + ".stopped")).read_text() == "SIGTERM"
        pid = int(mark.read_text())
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"  # ended, only not reaped yet


def test_a_stage_log_still_written_by_an_earlier_study_is_not_reopened(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("import sys\nopen(sys.argv[1], 'w').write('ran')\n")
    runner = study.Study(str(tmp_path / "study"), "cpu", 1.0, jobs=2)
    logs = tmp_path / "study" / "logs"
    logs.mkdir(parents=True)
    (logs / "train_a.log").write_text("what the orphaned stage wrote\n")
    with hold_flock(logs / "train_a.log"):  # the stage of a study killed with kill -9, still running
        with pytest.raises(SystemExit, match=r"'train a' \(a stage of an earlier study that was stopped is still "
                                             r"running and writing .*train_a.log; wait for it to end or stop it\)"):
            runner.run_all([(str(script), [tmp_path / "a"], "train a"), (str(script), [tmp_path / "b"], "train b")])
    assert (logs / "train_a.log").read_text() == "what the orphaned stage wrote\n" and not (tmp_path / "a").exists()
    runner.run_all([(str(script), [tmp_path / "a"], "train a")])  # free again: appended to, under a header
    text = (logs / "train_a.log").read_text()
    assert text.startswith("what the orphaned stage wrote\n=== ") and "study starts train a\n$ " in text
    assert (tmp_path / "a").read_text() == "ran"


def test_the_full_study_runs_and_reports_only_the_guidances_asked_for(tmp_path, monkeypatch):
    """`--guidances vq msf`: no grouped VAE or model is trained or scored, the tables name VQ and MSF and pair MSF
    with VQ, and the no-model rows evaluate.py scored stand beside them; the stages are recorded instead of run."""
    trained, scored = [], []

    def fake_run_all(self, stages):
        for entry in stages:
            for script, args, what in entry if isinstance(entry, list) else [entry]:
                trained.append(what)
                out = args[args.index("--out_dir") + 1]
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "log.jsonl"), "w") as f:
                    f.write(json.dumps({"step": 10, "val_ari_fg": 60.0, "val_mbo": 30.0, "val_mask_entropy": 50.0})
                            + "\n")

    def fake_evaluate(self, runs, name, extra=(), final=False):
        scored.append(name)
        if name == "separability":
            return {"runs": []}
        row = {key: 10.0 for key in study.COLUMNS}
        return dict({"runs": [row for _ in runs], "baselines": {"grid_2x3": {"ari_fg": 54.3}}}, **row,
                    **{key + "_std": 0.0 for key in study.COLUMNS})

    monkeypatch.setattr(study.Study, "run_all", fake_run_all)
    monkeypatch.setattr(study.Study, "evaluate", fake_evaluate)
    monkeypatch.setattr(study.Study, "data", lambda self, name: f"Data: `data/{name}`.")
    study.main(["full", "--setting", "slate_easy", "--parts", "main", "--guidances", "msf", "vq", "--seeds", "0", "1",
                "--out", str(tmp_path / "study")])
    assert [what.split()[-1] for what in trained] == ["vae_vq", "vae_msf", "slate_vq_s0", "slate_vq_s1",
                                                      "slate_msf_s0", "slate_msf_s1"]
    assert scored == ["slate_vq", "slate_msf", "separability"]
    report = (tmp_path / "study" / "report.md").read_text()
    assert "## slate on `shapes_easy`: VQ vs MSF guidance" in report
    assert "Paired by seed, msf minus VQ" in report and "grouped" not in report.split("## When")[0]
    assert "| no model: grid 2x3 | n/a | 54.3 | n/a |" in report  # the bar beside the runs
