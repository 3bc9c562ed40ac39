"""The comparisons of the paper on the synthetic data, end to end, written up as a Markdown report.

    python study.py demo                      # make demo: the binding configuration with VQ vs MSF guidance
    python study.py full [--seeds 0 1 2] [--parts main ablations video] [--steps_scale 1] [--device auto]
                         [--ablation_seeds ...] [--video_seeds ...] [--guidances vq grouped msf] [--jobs 1]

`demo` generates `shapes_easy` (large flat-colour objects, 32x32), pretrains a small VQ-VAE and a small MSF VAE side
by side, trains Slot Attention with the mixture decoder over each one's guidance side by side (the configuration
that binds on a CPU, README 'Results'), evaluates both (ARI, ARIfg, mIoU, mBO and the guidance's object
separability), and writes OUT/summary.json ({"vq": {...}, "msf": {...}} with "ari", "ari_fg", "miou", "mbo" in
percent on the validation split); it is sized to finish within 20 minutes on a 2-core CPU, install included.

`full` runs the study the README's Results section describes. `--setting easy` (default): the mixture configuration
that binds on a CPU (`mixture_*_easy.yaml`, `vae_*_easy.yaml`); `--setting multisize`: the same on objects of many
sizes (`shapes --style multisize`, radius 4-40 px at 128, `mixture_*_multisize.yaml`), scored per object size;
`--setting slate_easy`: SLATE's binding configuration on `shapes_easy` (`slate_*_easy.yaml`; its grouped arm is OGDR);
`--setting shapes`: SLATE on the multi-scale data (`slate_*_shapes.yaml`, `vae_*_shapes.yaml`).
  main       VQ, grouped and MSF guidance (or those `--guidances` names), every seed (mean ± std), and the VAEs'
             separability (paper Table 4 form: before / after inter-scale fusion, scale-variant part, final; every
             scale);
  ablations  paper Table 5 with MSF guidance: no inter-scale fusion, no intra-scale fusion, shared scale-variant
             codebook, N = 2 / 4 scales, guidance scales [1, 2] (SLATE only: the mixture decoder reads one scale)
             and [2];
  video      STEVE with VQ and MSF guidance on `shapes_video`.
The main part also compares each guidance with VQ seed by seed (paired differences, paired t-test).
Every stage runs as its own process with `--resume auto`, so an interrupted study continues where it stopped
and finished runs are not repeated; stopping the study (Ctrl-C, SIGTERM, even kill -9) stops its running stages,
each keeping its checkpoints. `--jobs N` runs up to N independent stages at once (all VAEs, then all OCL
runs; each concurrent stage appends to OUT/logs/STAGE.log). On one GPU the processes take turns: eight of the binding
configuration's runs side by side on an H200 trained 2.1x as fast in all as one alone (README, the study), so a GPU
helps these small models less than its size suggests. The report goes to OUT/report.md (default runs/study).
"""

import argparse
import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
import time

import torch
from scipy import stats as scipy_stats

import pretrain_vae
import train_ocl
from config import load_config, ranged
from data import load_split
from errors import UserError, run_main
from files import atomic_write_text, exclusive_lock, strict_json
from runs import resolve_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))

# (training, validation) samples of the synthetic data used by the demo and the study, and how each is generated.
DATA_SIZES = {"shapes": (2000, 200), "shapes_video": (300, 50), "shapes_easy": (4000, 200),
              "shapes_multisize": (4000, 200), "shapes_video_easy": (4000, 20)}
DATA_COMMANDS = {"shapes": ["shapes"], "shapes_video": ["shapes_video"], "shapes_easy": ["shapes", "--style", "easy"],
                 "shapes_multisize": ["shapes", "--style", "multisize"],
                 "shapes_video_easy": ["shapes_video", "--style", "easy", "--frames", "12"]}
# Paper Table 5 (upper part) as overrides of the setting's MSF VAE config.
VAE_ABLATIONS = {  # label: (run name, overrides)
    "no inter-scale fusion": ("nointer", {"inter_scale_fusion": "false"}),
    "no intra-scale fusion": ("nointra", {"intra_scale_fusion": "false"}),
    "shared scale-variant codebook": ("sharedsv", {"sv_codebook": "shared"}),
    "N = 2 scales": ("n2", {"num_scales": "2"}),
    "N = 4 scales": ("n4", {"num_scales": "4"}),
}
# Paper Table 5 (lower right) as OCL overrides, guided by the main MSF VAE (the mixture decoder reads one scale).
SCALE_ABLATIONS = {"guidance scales [1, 2]": ("scales12", "[1,2]"), "guidance scale [2]": ("scales2", "[2]")}
# What the main and ablation parts train: `easy`, the configuration that binds on a CPU (Slot Attention + the mixture
# decoder over the guidance, large flat objects at 32 px), or `shapes`, SLATE on the multi-scale data at 64 px.
SETTINGS = {
    "easy": {"data": "shapes_easy", "vae": "configs/vae_{}_easy.yaml", "ocl": "configs/mixture_{}_easy.yaml",
             "method": "mixture", "scales": {"guidance scale [2]": ("scales2", "[2]")}},
    "multisize": {"data": "shapes_multisize", "vae": "configs/vae_{}_multisize.yaml",
                  "ocl": "configs/mixture_{}_multisize.yaml", "method": "mixture",
                  "scales": {"guidance scale [2]": ("scales2", "[2]")}},
    "shapes": {"data": "shapes", "vae": "configs/vae_{}_shapes.yaml", "ocl": "configs/slate_{}_shapes.yaml",
               "method": "slate", "scales": SCALE_ABLATIONS},
    "slate_easy": {"data": "shapes_easy", "vae": "configs/vae_{}_easy.yaml", "ocl": "configs/slate_{}_easy.yaml",
                   "method": "slate", "scales": SCALE_ABLATIONS},
}


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


def _stop_with(libc, parent: int) -> None:
    """A stage's preexec_fn on Linux: SIGTERM to the stage when the study's process `parent` ends, however it ends
    (kill -9 included), so no stage runs on without its study; the stage stops as on Ctrl-C, keeping its
    checkpoints."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the study ended before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def start_stage(command: list, **kwargs) -> subprocess.Popen:
    """A stage's process, in the repository root; on Linux it is stopped when the study ends."""
    stop = None
    if sys.platform.startswith("linux"):  # libc is loaded here: a forked child should not load libraries
        stop = functools.partial(_stop_with, ctypes.CDLL(None, use_errno=True), os.getpid())
    return subprocess.Popen(command, cwd=ROOT, preexec_fn=stop, **kwargs)


def stop_stages(stop: KeyboardInterrupt, stages: list, patience: float = 60.0) -> KeyboardInterrupt:
    """End the running `stages` [(process, what)] of a study stopped by Ctrl-C or SIGTERM: each gets SIGTERM, which
    it takes as Ctrl-C (its checkpoints kept), and is killed if it has not ended within `patience` seconds. Returns
    the stop to raise, whose words (run_main's sentence) name them."""
    for process, _ in stages:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + patience
    for process, _ in stages:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    named = ", ".join(f"'{what}'" for _, what in stages)
    stopped = f"the running stage {named} stopped too, keeping its checkpoints; " if len(stages) == 1 else (
        f"the running stages {named} stopped too, keeping their checkpoints; " if stages else "")
    return type(stop)(stopped + "rerun the same command to continue, finished stages are kept")


class Study:
    def __init__(self, out: str, device: str, steps_scale: float, log_every: int = 0, jobs: int = 1, amp: str = ""):
        self.out, self.device, self.steps_scale, self.log_every, self.amp = out, device, steps_scale, log_every, amp
        self.jobs = max(1, jobs)
        self.timings = []

    def command(self, script: str, args: list) -> list:
        return [sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args]

    def run(self, script: str, args: list, what: str) -> None:
        """One stage as a subprocess, its output on the console; a failure stops the study with the stage's own
        message."""
        command = self.command(script, args)
        print(f"\n=== {what}\n$ {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        process = start_stage(command)
        try:
            returncode = process.wait()
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the stage stops too, keeping its checkpoints
            raise stop_stages(stop, [(process, what)]) from None
        if returncode:
            sys.exit(f"study: stage '{what}' failed (exit {returncode}); fix it and rerun the same command, "
                     f"finished stages are kept")
        self.timings.append((what, time.perf_counter() - start))

    def run_all(self, stages: list) -> None:
        """Independent stages [(script, args, what)], `self.jobs` at a time (one at a time: `run`). An entry may also
        be a chain, a list of stages that run one after another in one slot (a VAE, then the model it guides), so a
        chain that finishes early does not wait for the others. Each concurrent stage appends its output to
        OUT/logs/WHAT.log under a header line, holding the log's lock while it runs (a log still held by a stage of
        an earlier study that was killed is not reopened: that stage fails), and gets an equal share of the CPU
        threads. After a failure no new stage starts (nor the rest of its chain); the running ones finish, then the
        study stops naming the failed stages' logs. Ctrl-C or SIGTERM stops the running stages too (stop_stages)."""
        chains = [list(entry) if isinstance(entry, list) else [entry] for entry in stages]
        if self.jobs == 1:
            for chain in chains:
                for stage in chain:
                    self.run(*stage)
            return
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.jobs)))
        running, failed = [], []

        def start(chain):
            (script, args, what), rest = chain[0], chain[1:]
            log_path = os.path.join(self.out, "logs", what.replace(" ", "_") + ".log")
            command = self.command(script, args)
            print(f"=== start {what} (log: {os.path.relpath(log_path, ROOT)})\n$ {' '.join(command[1:])}", flush=True)
            try:  # the stage holds its log's lock as long as it runs, also if this study is killed meanwhile
                log = exclusive_lock(log_path, "")
            except UserError:
                failed.append(f"'{what}' (a stage of an earlier study that was stopped is still running and writing "
                              f"{log_path}; wait for it to end or stop it)")
                print(f"=== FAILED {what}: an earlier study's stage still writes {log_path}", flush=True)
                return
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} study starts {what}\n$ {' '.join(command[1:])}\n")
            log.flush()
            process = start_stage(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((process, log, what, log_path, time.perf_counter(), rest))

        try:
            self._run_chains(chains, running, failed, start)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the running stages stop too, keeping their checkpoints
            raise stop_stages(stop, [(entry[0], entry[2]) for entry in running]) from None
        if failed:
            sys.exit(f"study: {len(failed)} stage(s) failed: {'; '.join(failed)}; fix and rerun the same command, "
                     f"finished stages are kept")

    def _run_chains(self, chains: list, running: list, failed: list, start) -> None:
        """run_all's loop: start chains while slots are free and nothing failed, collect the stages that end."""
        while chains or running:
            while chains and not failed and len(running) < self.jobs:
                start(chains.pop(0))
            if failed and not running:
                break
            time.sleep(0.2)
            for entry in list(running):
                process, log, what, log_path, began, rest = entry
                if process.poll() is None:
                    continue
                running.remove(entry)
                log.close()
                if process.returncode:
                    failed.append(f"'{what}' (exit {process.returncode}, log {log_path})")
                    print(f"=== FAILED {what}: see {log_path}", flush=True)
                    continue
                self.timings.append((what, time.perf_counter() - began))
                print(f"=== done {what} ({time.perf_counter() - began:.0f} s)", flush=True)
                if rest and not failed:
                    start(rest)

    def steps(self, config: str, override: int = 0) -> list:
        steps = override
        if not steps:  # through the stage's own options: a config may leave steps at its default
            options = pretrain_vae.OPTIONS if os.path.basename(config).startswith("vae_") else train_ocl.OPTIONS
            steps = load_config(options, [os.path.join(ROOT, config)])["steps"]
        return ["--steps", max(1, int(round(steps * self.steps_scale)))]

    def common(self) -> list:
        args = ["--device", self.device, "--resume", "auto"]
        args += ["--amp", self.amp] if self.amp else []  # else each config's (auto: bf16 on a GPU, off on a CPU)
        return args + (["--log_every", self.log_every] if self.log_every else [])

    def data(self, name: str) -> str:
        """Generate data/NAME at the study's size, unless it is there at that size already (the demo and the study
        share one size, so either reuses the other's data); returns the report's line on it."""
        target = os.path.join(ROOT, "data", name)
        sizes = DATA_SIZES[name]
        line = f"Data: `data/{name}`, {sizes[0]} training and {sizes[1]} validation samples."
        if os.path.isfile(os.path.join(target, "val.lmdb")):
            found = tuple(len(load_split(os.path.join(target, f"{split}.lmdb"))) for split in ("train", "val"))
            if found == sizes:
                print(f"using the existing {target}")
                return line
            print(f"{target} has {found[0]} training / {found[1]} validation samples, the study uses "
                  f"{sizes[0]} / {sizes[1]}: generating it anew")
        self.run("prepare_data.py", DATA_COMMANDS[name] + ["--out", target, "--num_train", sizes[0], "--num_val",
                                                          sizes[1]], f"generate {name}")
        return line

    def vae_stage(self, name: str, config: str, overrides: dict = None, steps: int = 0) -> tuple:
        """(run directory, stage) of a VAE pretraining; `vae` runs it at once."""
        out = os.path.join(self.out, name)
        extra = [x for k, v in (overrides or {}).items() for x in (f"--{k}", v)]
        return out, ("pretrain_vae.py", [config, "--out_dir", out] + self.steps(config, steps) + self.common()
                     + extra, f"pretrain {name}")

    def ocl_stage(self, name: str, config: str, vae: str, seed: int, overrides: dict = None,
                  steps: int = 0) -> tuple:
        """(run directory, stage) of an OCL training run; `ocl` runs it at once."""
        out = os.path.join(self.out, name)
        extra = [x for k, v in (overrides or {}).items() for x in (f"--{k}", v)]
        return out, ("train_ocl.py", [config, "--out_dir", out, "--vae_ckpt", vae, "--seed", seed]
                     + self.steps(config, steps) + self.common() + extra, f"train {name}")

    def vae(self, *args, **kwargs) -> str:
        out, stage = self.vae_stage(*args, **kwargs)
        self.run(*stage)
        return out

    def ocl(self, *args, **kwargs) -> str:
        out, stage = self.ocl_stage(*args, **kwargs)
        self.run(*stage)
        return out

    def evaluate(self, runs: list, name: str, extra: list = (), final: bool = False) -> dict:
        """evaluate.py on run directories (each one's best.pt), or with `final` on each run's last checkpoint: the
        full study scores the last one, since best.pt is chosen on the validation images its tables score."""
        if final:
            runs = [resolve_checkpoint(run) for run in runs]
        out = os.path.join(self.out, "eval", name)
        self.run("evaluate.py", list(runs) + ["--out", out, "--device", self.device, "--overwrite"] + list(extra),
                 f"evaluate {name}")
        with open(os.path.join(out, "metrics.json")) as f:
            return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Report tables.

GUIDANCES = ("vq", "grouped", "msf")  # the main part's arms, in the tables' order
GUIDANCE_NAMES = {"vq": "VQ", "grouped": "grouped", "msf": "MSF"}
METRICS = ("ari", "ari_fg", "miou", "mbo")
SIZE_COLUMNS = ("mbo_small", "mbo_medium", "mbo_large")  # mBO of objects under 1 %, 1-5 %, 5 % and more of the image
# The tables add mBO per object size (metrics.mbo_by_size) and where the background went (metrics.background_split).
COLUMNS = METRICS + SIZE_COLUMNS + ("bg_iou", "bg_slots")


def number(value, digits: int = 1) -> str:
    """A metric cell; metrics.json stores an undefined metric (e.g. ARIfg without foreground) as null."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def mean_std_row(label: str, metrics: dict, keys=COLUMNS) -> str:
    """One table row of `keys` from evaluate.py's metrics.json; a metric missing or undefined (null) shows n/a."""
    runs = metrics["runs"]
    if len(runs) == 1:
        cells = [number(runs[0].get(k)) for k in keys]
    else:
        cells = ["n/a" if metrics.get(k) is None else f"{number(metrics[k])} ± {number(metrics.get(k + '_std'))}"
                 for k in keys]
    return f"| {label} | " + " | ".join(cells) + " |"


def baseline_rows(metrics: dict, keys=COLUMNS) -> list:
    """Table rows of the no-model segmentations evaluate.py scores beside the runs (the whole image as one segment,
    a fixed grid of as many cells as slots): the bar a run must clear to have found objects, not places."""
    return [f"| no model: {name.replace('_', ' ')} | " + " | ".join(number(values.get(k)) for k in keys) + " |"
            for name, values in metrics.get("baselines", {}).items()]


def metric_header(first: str, keys=COLUMNS) -> list:
    return [f"| {first} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]


def separability_table(metrics: dict) -> list:
    lines = ["| VAE | representation | scale | inter ↑ | intra ↓ | inter/intra | object ARI ↑ | tokens/image |",
             "|---|---|---|---|---|---|---|---|"]
    for run in metrics["runs"]:
        for key, value in run["separability"]["table"].items():
            representation, scale = key.rsplit("_scale", 1)
            lines.append(f"| {run['name']} | {representation} | {scale} | {number(value['inter'], 3)} | "
                         f"{number(value['intra'], 3)} | {number(value['ratio'], 2)} | "
                         f"{number(value['object_ari'], 1)} | {number(value['tokens'], 1)} |")
    for run in metrics["runs"]:
        used = ", ".join(f"{name} {100 * share:.0f} %" for name, share in run["separability"]["codes_used"].items())
        lines.append(f"\nCodes used by {run['name']} over these images: {used}.")
    return lines


# A run counts as bound from its first validation (every `val_every` steps, on the validation split) with ARIfg at or
# above this many percent: uniform or blob-like masks stay far below it (README 'Results', the binding ladder).
BOUND_ARI_FG = 50.0


def validation_curve(run_dir: str) -> list:
    """The validation rows of a run's log.jsonl, in step order."""
    rows = []
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                if "val_ari_fg" in entry:
                    rows.append(entry)
    return sorted(rows, key=lambda entry: entry["step"])


def binding_table(runs: list) -> list:
    """When each run's slots bound (first validation with ARIfg >= BOUND_ARI_FG) and where its last validation
    stood."""
    lines = [f"| run | bound at step (first validation with ARIfg ≥ {BOUND_ARI_FG:.0f}) | last validation step | "
             "ARIfg | mBO | mask entropy (% of ln slots) |", "|---|---|---|---|---|---|"]
    for run_dir in runs:
        curve = validation_curve(run_dir)
        if not curve:
            lines.append(f"| {os.path.basename(run_dir)} | no validation logged | | | | |")
            continue
        bound = next((entry["step"] for entry in curve if (entry["val_ari_fg"] or 0) >= BOUND_ARI_FG), None)
        last = curve[-1]
        lines.append(f"| {os.path.basename(run_dir)} | {bound if bound is not None else 'not bound'} | "
                     f"{last['step']} | {number(last['val_ari_fg'])} | {number(last.get('val_mbo'))} | "
                     f"{number(last.get('val_mask_entropy'))} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------

def demo_summary(metrics: dict, guidance_of: dict) -> dict:
    """runs/demo/summary.json: {guidance: {"ari", "ari_fg", "miou", "mbo"}} in percent on the validation split, from
    evaluate.py's metrics.json (`guidance_of` maps each run's checkpoint path to its guidance)."""
    summary, known = {}, {os.path.realpath(path): g for path, g in guidance_of.items()}
    for run in metrics["runs"]:
        checkpoint = os.path.realpath(run["checkpoint"])  # a checkpoint file, or the run directory that holds it
        guidance = known.get(checkpoint) or known.get(os.path.dirname(checkpoint))
        if guidance is None:
            raise ValueError(f"{run['checkpoint']} is none of the demo's runs {sorted(guidance_of)}")
        summary[guidance] = {key: run[key] for key in METRICS}
    return summary


# `study.py demo --method M`: each method's binding configuration on `shapes_easy` (configs/M_<guidance>_easy.yaml)
# with MSF guidance and its baseline's; STEVE on the easy videos (`data`), guided by the VAEs of `shapes_easy`. A
# method is listed once a configuration of it has bound on the CPU (docs/results.md, "Methods on the CPU").
DEMO_METHODS = {
    "mixture": {"guidance": ("vq", "msf"), "title": "Slot Attention + mixture decoder"},
    "slate": {"guidance": ("vq", "msf"), "title": "SLATE"},
    "ogdr": {"guidance": ("grouped", "msf"), "title": "OGDR"},
    "sysbinder": {"guidance": ("vq", "msf"), "title": "SysBinder"},
    "steve": {"guidance": ("vq", "msf"), "title": "STEVE", "data": "shapes_video_easy"},
}
NOT_YET_BOUND = ("slotdiffusion", "dinosaur")


def demo(args) -> list:
    """A method's binding configuration end to end: easy data, its baseline's VAE and the MSF VAE side by side, the
    method over each one's guidance side by side, then both evaluated together."""
    method = args.method
    if method not in DEMO_METHODS:
        sys.exit(f"study: no configuration of {method} has bound on the CPU yet, so there is no demo of it; "
                 f"docs/results.md ('Methods on the CPU') says what was tried. Demos: {', '.join(DEMO_METHODS)}")
    spec = DEMO_METHODS[method]
    default_out = os.path.join(ROOT, "runs", "demo" if method == "mixture" else f"demo_{method}")
    study = Study(args.out or default_out, args.device, 1.0, log_every=50, jobs=args.jobs)
    data = spec.get("data", "shapes_easy")
    for name in dict.fromkeys(["shapes_easy", data]):  # the VAEs learn on shapes_easy
        study.data(name)
    runs, chains = {}, []
    for guidance in spec["guidance"]:  # each guidance's VAE, then the model it guides: two chains side by side
        vae, vae_stage = study.vae_stage(f"vae_{guidance}", f"configs/vae_{guidance}_easy.yaml",
                                         steps=args.vae_steps, overrides={"val_every": args.vae_steps})
        runs[guidance], ocl_stage = study.ocl_stage(f"{method}_{guidance}", f"configs/{method}_{guidance}_easy.yaml",
                                                    vae, 0, steps=args.ocl_steps)
        chains.append([vae_stage, ocl_stage])
    study.run_all(chains)
    name = f"{method}_{'_vs_'.join(spec['guidance'])}"
    metrics = study.evaluate([runs[g] for g in spec["guidance"]], name, ["--compare", "--separability"],
                             final=True)  # not best.pt: it is chosen on the same validation images
    summary = demo_summary(metrics, {runs[g]: g for g in runs})
    atomic_write_text(os.path.join(study.out, "summary.json"), strict_json(summary, indent=2) + "\n")
    steps = study.steps(f"configs/{method}_msf_easy.yaml", args.ocl_steps)[1]
    samples = f"{DATA_SIZES[data][1]} {'videos (one score per video)' if data == 'shapes_video_easy' else 'images'}"
    lines = [f"# Demo: {spec['title']} over {' vs '.join(g.upper() for g in spec['guidance'])} guidance on "
             f"`{data}`", "",
             f"VAEs {args.vae_steps} steps, {spec['title']} {steps} steps, one seed, 32x32 frames of large flat-colour "
             f"objects, each run's final checkpoint on the validation split of {samples}. docs/results.md has the "
             f"binding ladder this configuration comes from and what it means.", "",
             "| guidance | ARI | ARIfg | mIoU | mBO | mask entropy | separability inter ↑ | intra ↓ | inter/intra ↑ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in metrics["runs"]:  # a video run has no separability (it is measured on images)
        inter, intra = run.get("sep_inter"), run.get("sep_intra")
        lines.append(f"| {run['name']} | {number(run['ari'])} | {number(run['ari_fg'])} | {number(run['miou'])} | "
                     f"{number(run['mbo'])} | {number(run.get('mask_entropy'))} | {number(inter, 3)} | "
                     f"{number(intra, 3)} | {number(ratio(inter, intra))} |")
    lines += [row + " – | – | – | – |" for row in baseline_rows(metrics, ("ari", "ari_fg", "miou", "mbo"))]
    lines += ["", "Metrics in percent, background counted as a segment (README, 'Evaluation protocol'); mask entropy "
              "in % of ln(slots), 100 = uniform. Separability: KMeans on each image's scale-1 guidance vectors, k = its "
              "number of ground-truth segments. No model: the same images cut into one segment, or into a fixed grid "
              "of as many cells as slots, which a run must beat to have found objects rather than places.", "",
              "## When the slots bound", ""]
    lines += binding_table([runs[g] for g in spec["guidance"]])
    lines += ["", f"Figures: {os.path.relpath(os.path.join(study.out, 'eval', name), ROOT)}/ and each run's "
              f"figures/"]
    return finish(study, lines)


def full(args) -> list:
    study = Study(args.out or os.path.join(ROOT, "runs", "study"), args.device, args.steps_scale, jobs=args.jobs,
                  amp=args.amp)
    seeds, parts, setting = args.seeds, args.parts, SETTINGS[args.setting]
    method = setting["method"]
    lines = ["# Study: multi-scale fusion on the synthetic data", "",
             f"Seeds: main {seeds}, ablations {args.ablation_seeds}, video {args.video_seeds}; "
             f"setting `{args.setting}`: {setting['ocl'].format('*')} guided by {setting['vae'].format('*')}; "
             f"steps x{args.steps_scale} of the configs; "
             f"device: {device_name(args.device)}; {study.jobs} stage(s) at a time. "
             f"Metrics in percent, mean ± std over seeds, background counted as a segment, of each run's final "
             f"checkpoint on the validation split (not best.pt, which is chosen on the same images). bg_iou: "
             f"the background's best IoU with one slot; bg_slots: how many slots hold >= 10 % of the background "
             f"(a count); mbo_small / medium / large: mBO of the objects under 1 %, from 1 to under 5 %, and 5 % or "
             f"more of the image (n/a where a split has no such object).", ""]
    if "main" in parts or "ablations" in parts:
        lines += [study.data(setting["data"]), ""]
    if "video" in parts:
        lines += [study.data("shapes_video"), ""]

    # Every VAE first (they are independent), then every OCL run, then the evaluations and tables.
    vae_specs = {}  # run name -> (config, overrides)
    guidances = [g for g in GUIDANCES if g in args.guidances]  # the main part's arms, in the tables' order
    vae_guidances = [g for g in GUIDANCES if ("main" in parts and g in guidances) or ("ablations" in parts and
                                                                                        g == "msf")]
    for guidance in vae_guidances:
        vae_specs[f"vae_{guidance}"] = (setting["vae"].format(guidance), None)
    if "ablations" in parts:
        for slug, overrides in VAE_ABLATIONS.values():
            vae_specs[f"vae_msf_{slug}"] = (setting["vae"].format("msf"), overrides)
    if "video" in parts:
        for guidance in ("vq", "msf"):
            vae_specs[f"vae_{guidance}_video"] = (f"configs/vae_{guidance}_shapes_video.yaml", None)
    vaes, stages = {}, []
    for name, (config, overrides) in vae_specs.items():
        vaes[name], stage = study.vae_stage(name, config, overrides, steps=args.vae_steps or 0)
        stages.append(stage)
    study.run_all(stages)

    groups, stages = {}, []  # (part, label) -> (run directories in seed order, evaluation name); OCL stages

    def plan(part, label, name, config, vae, run_seeds, overrides=None, evaluation=""):
        runs = []
        for seed in run_seeds:
            out, stage = study.ocl_stage(f"{name}_s{seed}", config, vaes[vae], seed, overrides,
                                         steps=0 if part == "video" else args.ocl_steps)
            runs.append(out)
            if stage not in stages:  # the ablations' reference shares the main part's MSF runs
                stages.append(stage)
        groups[part, label] = runs, evaluation or name

    if "main" in parts:
        for guidance in guidances:
            plan("main", guidance, f"{method}_{guidance}", setting["ocl"].format(guidance), f"vae_{guidance}", seeds)
    if "ablations" in parts:
        plan("ablations", "full MSF (reference)", f"{method}_msf", setting["ocl"].format("msf"), "vae_msf",
             args.ablation_seeds, evaluation=f"{method}_msf_reference")
        for label, (slug, _) in VAE_ABLATIONS.items():
            plan("ablations", label, f"{method}_msf_{slug}", setting["ocl"].format("msf"), f"vae_msf_{slug}",
                 args.ablation_seeds)
        for label, (slug, scales) in setting["scales"].items():
            plan("ablations", label, f"{method}_msf_{slug}", setting["ocl"].format("msf"), "vae_msf",
                 args.ablation_seeds, {"guidance_scales": scales})
    if "video" in parts:
        for guidance in ("vq", "msf"):
            plan("video", guidance, f"steve_{guidance}", f"configs/steve_{guidance}_shapes_video.yaml",
                 f"vae_{guidance}_video", args.video_seeds)
    study.run_all(stages)

    def evaluated(part, label):
        return study.evaluate(*groups[part, label], final=True)

    if "main" in parts:
        names = " vs ".join(GUIDANCE_NAMES[g] for g in guidances)
        lines += [f"## {method} on `{setting['data']}`: {names} guidance", ""] + metric_header("guidance")
        main = {guidance: evaluated("main", guidance) for guidance in guidances}
        lines += [mean_std_row(guidance, metrics) for guidance, metrics in main.items()]
        lines += baseline_rows(next(iter(main.values())))
        for guidance in [g for g in ("msf", "grouped") if g in main and "vq" in main]:
            lines += ["", f"Paired by seed, {guidance} minus VQ (same seed, same data; t-test on the per-seed "
                          f"differences):", ""] + paired_table(main["vq"], main[guidance], seeds,
                                                               METRICS + SIZE_COLUMNS)
        separability = study.evaluate([vaes[f"vae_{g}"] for g in guidances], "separability",
                                      ["--separability", "--samples", 200])
        lines += ["", "## Object separability of the guidance (paper Table 4 form)", "",
                  "KMeans on each validation image's guidance vectors (k = its ground-truth segments), 200 images. "
                  "MSF rows: scale-invariant part before (`si_before`) and after (`si_after`) inter-scale fusion, "
                  "scale-variant part (`sv`), final `X_n`.", ""] + separability_table(separability)
    if "ablations" in parts:
        lines += ["", f"## Ablations on {method} + MSF (paper Table 5)", ""] + metric_header("variant")
        lines += [mean_std_row(label, evaluated(part, label)) for part, label in groups if part == "ablations"]
    if "main" in parts or "ablations" in parts:
        trained = [run for (part, _), (runs, _) in groups.items() if part != "video" for run in runs]
        lines += ["", "## When the slots bound", "", "From each run's validation curve (log.jsonl, every `val_every` "
                  "steps on the validation split).", ""] + binding_table(list(dict.fromkeys(trained)))
    if "video" in parts:
        lines += ["", "## STEVE on `shapes_video`: VQ vs MSF guidance (one score per 24-frame video)", ""]
        lines += metric_header("guidance")
        video = {guidance: evaluated("video", guidance) for guidance in ("vq", "msf")}
        lines += [mean_std_row(guidance, metrics) for guidance, metrics in video.items()]
        lines += ["", "Paired by seed, MSF minus VQ:", ""] + paired_table(video["vq"], video["msf"],
                                                                           args.video_seeds)
    return finish(study, lines)


def paired_table(baseline: dict, other: dict, seeds: list, keys=METRICS) -> list:
    """Per-seed differences other - baseline of each metric (evaluate.py's metrics.json of each group, runs in seed
    order), their mean, and the two-sided p-value of a paired t-test (n/a below two seeds or with undefined
    metrics)."""
    header = "| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | paired t-test p |"
    lines = [header, "|---" * (len(seeds) + 3) + "|"]
    for key in keys:
        a = [run.get(key) for run in baseline["runs"]]
        b = [run.get(key) for run in other["runs"]]
        if len(a) != len(seeds) or len(b) != len(seeds):
            raise ValueError(f"{len(a)} and {len(b)} runs for {len(seeds)} seeds")
        if any(v is None for v in a + b):
            differences = [None if x is None or y is None else y - x for x, y in zip(a, b)]
            lines.append(f"| {key} | " + " | ".join(number(d) for d in differences) + " | n/a | n/a |")
            continue
        differences = [y - x for x, y in zip(a, b)]
        p = None
        if len(seeds) >= 2 and len(set(differences)) > 1:
            p = float(scipy_stats.ttest_rel(b, a).pvalue)
        lines.append(f"| {key} | " + " | ".join(f"{d:+.1f}" for d in differences) +
                     f" | {sum(differences) / len(differences):+.1f} | {number(p, 3)} |")
    return lines


def device_name(setting: str) -> str:
    if setting != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def finish(study: Study, lines: list) -> list:
    lines += ["", "## Wall-clock time per stage", "", "Of this invocation: a stage finished by an earlier one is "
              "skipped and shows only its start-up time.", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {what} | {seconds:.0f} |" for what, seconds in study.timings]
    path = os.path.join(study.out, "report.md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nreport: {path}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=("demo", "full"))
    parser.add_argument("--method", default="mixture", choices=tuple(DEMO_METHODS) + NOT_YET_BOUND,
                        help="demo: the method whose binding configuration runs (default mixture, `make demo`); "
                             "writes runs/demo (mixture) or runs/demo_METHOD")
    parser.add_argument("--out", default="", help="study directory (default runs/demo[_METHOD] or runs/study)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seeds", type=ranged(int, "--seeds", min=0), nargs="+", default=[0, 1, 2],
                        help="full: OCL seeds")
    parser.add_argument("--ablation_seeds", type=ranged(int, "--ablation_seeds", min=0), nargs="+", default=None,
                        help="full: OCL seeds of the ablations (default --seeds)")
    parser.add_argument("--video_seeds", type=ranged(int, "--video_seeds", min=0), nargs="+", default=None,
                        help="full: OCL seeds of the STEVE runs (default --seeds)")
    parser.add_argument("--parts", nargs="+", default=["main", "ablations", "video"],
                        choices=("main", "ablations", "video"), help="full: which parts to run")
    parser.add_argument("--guidances", nargs="+", default=list(GUIDANCES), choices=GUIDANCES,
                        help="full: the main part's guidances (default all three; the paired tables set MSF and "
                             "grouped against VQ where it is among them)")
    parser.add_argument("--steps_scale", type=ranged(float, "--steps_scale", above=0.0), default=1.0,
                        help="full: multiply every config's steps")
    parser.add_argument("--setting", choices=tuple(SETTINGS), default="easy",
                        help="full: the main and ablation parts on easy (the mixture configuration that binds on a "
                             "CPU), multisize (the same on objects of many sizes), slate_easy (SLATE's binding "
                             "configuration) or shapes (SLATE on the multi-scale data)")
    parser.add_argument("--jobs", type=ranged(int, "--jobs", min=1), default=None,
                        help="independent stages run at once (e.g. 2 on 2 CPU cores, 8 on one GPU; 1 = one after "
                             "another; default: demo 2, the VQ and MSF pipelines side by side, full 1)")
    parser.add_argument("--amp", default="", choices=("", "auto", "bf16", "fp16", "off"),
                        help="full: mixed precision of every stage (default: each config's, i.e. bf16 on a GPU)")
    parser.add_argument("--vae_steps", type=ranged(int, "--vae_steps", min=1), default=None,
                        help="VAE pretraining steps (default: demo 1000, full each config's x --steps_scale)")
    parser.add_argument("--ocl_steps", type=ranged(int, "--ocl_steps", min=0), default=0,
                        help="OCL training steps of every run but the video part's (default: the config's); "
                             "--steps_scale multiplies it too")
    args = parser.parse_args(argv)
    args.jobs = args.jobs or (2 if args.preset == "demo" else 1)
    if args.preset == "demo" and args.vae_steps is None:
        args.vae_steps = 1000
    args.ablation_seeds = args.ablation_seeds or args.seeds
    args.video_seeds = args.video_seeds or args.seeds
    (demo if args.preset == "demo" else full)(args)


if __name__ == "__main__":
    run_main(main)
