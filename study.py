"""The comparisons of the paper on the synthetic data, end to end, written up as a Markdown report.

    python study.py demo                      # make demo: SLATE with VQ vs MSF guidance, one seed, smoke-size
    python study.py full [--seeds 0 1 2] [--parts main ablations video] [--steps_scale 1] [--device auto]
                         [--ablation_seeds ...] [--video_seeds ...]

`demo` generates `shapes`, pretrains a small VQ-VAE and a small MSF VAE, trains SLATE with each, and evaluates
both side by side (ARI, ARIfg, mIoU, mBO and the guidance's object separability), and writes OUT/summary.json
({"vq": {...}, "msf": {...}} with "ari", "ari_fg", "miou", "mbo" in percent on the validation split); it is sized to
finish in about 15 minutes on a 2-core CPU, far too short to reproduce the paper's numbers.

`full` runs what the README's Results section reports, from the `*_shapes*.yaml` configs:
  main       SLATE with VQ, grouped and MSF guidance, every seed (mean ± std), and the VAEs' separability
             (paper Table 4 form: before / after inter-scale fusion, scale-variant part, final; every scale);
  ablations  paper Table 5 on SLATE + MSF: no inter-scale fusion, no intra-scale fusion, shared scale-variant
             codebook, N = 2 / 4 scales, guidance scales [1, 2] and [2];
  video      STEVE with VQ and MSF guidance on `shapes_video`.
Every stage runs as its own process with `--resume auto`, so an interrupted study continues where it stopped
and finished runs are not repeated. The report goes to OUT/report.md (default runs/study).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import yaml

from common import atomic_write_text, strict_json
from data import load_split

ROOT = os.path.dirname(os.path.abspath(__file__))

# (training, validation) samples of the synthetic data used by the demo and the study.
DATA_SIZES = {"shapes": (2000, 200), "shapes_video": (300, 50)}
# Paper Table 5 (upper part) as VAE overrides of configs/vae_msf_shapes.yaml.
VAE_ABLATIONS = {  # label: (run name, overrides)
    "no inter-scale fusion": ("nointer", {"inter_scale_fusion": "false"}),
    "no intra-scale fusion": ("nointra", {"intra_scale_fusion": "false"}),
    "shared scale-variant codebook": ("sharedsv", {"sv_codebook": "shared"}),
    "N = 2 scales": ("n2", {"num_scales": "2"}),
    "N = 4 scales": ("n4", {"num_scales": "4"}),
}
# Paper Table 5 (lower right) as SLATE overrides, guided by the main MSF VAE.
SCALE_ABLATIONS = {"guidance scales [1, 2]": ("scales12", "[1,2]"), "guidance scale [2]": ("scales2", "[2]")}


class Study:
    def __init__(self, out: str, device: str, steps_scale: float, log_every: int = 0):
        self.out, self.device, self.steps_scale, self.log_every = out, device, steps_scale, log_every
        self.timings = []

    def run(self, script: str, args: list, what: str) -> None:
        """One stage as a subprocess; a failure stops the study with the stage's own message."""
        command = [sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args]
        print(f"\n=== {what}\n$ {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT)
        if result.returncode:
            sys.exit(f"study: stage '{what}' failed (exit {result.returncode}); fix it and rerun the same command, "
                     f"finished stages are kept")
        self.timings.append((what, time.perf_counter() - start))

    def steps(self, config: str, override: int = 0) -> list:
        steps = override
        if not steps:
            with open(os.path.join(ROOT, config)) as f:
                steps = yaml.safe_load(f)["steps"]
        return ["--steps", max(1, int(round(steps * self.steps_scale)))]

    def common(self) -> list:
        args = ["--device", self.device, "--resume", "auto"]
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
        self.run("prepare_data.py", [name, "--out", target, "--num_train", sizes[0], "--num_val", sizes[1]],
                 f"generate {name}")
        return line

    def vae(self, name: str, config: str, overrides: dict = None, steps: int = 0) -> str:
        out = os.path.join(self.out, name)
        extra = [x for k, v in (overrides or {}).items() for x in (f"--{k}", v)]
        self.run("pretrain_vae.py", [config, "--out_dir", out] + self.steps(config, steps) + self.common() + extra,
                 f"pretrain {name}")
        return out

    def ocl(self, name: str, config: str, vae: str, seed: int, overrides: dict = None, steps: int = 0) -> str:
        out = os.path.join(self.out, name)
        extra = [x for k, v in (overrides or {}).items() for x in (f"--{k}", v)]
        self.run("train_ocl.py", [config, "--out_dir", out, "--vae_ckpt", vae, "--seed", seed]
                 + self.steps(config, steps) + self.common() + extra, f"train {name}")
        return out

    def evaluate(self, runs: list, name: str, extra: list = ()) -> dict:
        out = os.path.join(self.out, "eval", name)
        self.run("evaluate.py", list(runs) + ["--out", out, "--device", self.device] + list(extra),
                 f"evaluate {name}")
        with open(os.path.join(out, "metrics.json")) as f:
            return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Report tables.

METRICS = ("ari", "ari_fg", "miou", "mbo")


def number(value, digits: int = 1) -> str:
    """A metric cell; metrics.json stores an undefined metric (e.g. ARIfg without foreground) as null."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def mean_std_row(label: str, metrics: dict, keys=METRICS) -> str:
    runs = metrics["runs"]
    if len(runs) == 1:
        cells = [number(runs[0][k]) for k in keys]
    else:
        cells = [f"{number(metrics[k])} ± {number(metrics[k + '_std'])}" for k in keys]
    return f"| {label} | " + " | ".join(cells) + " |"


def metric_header(first: str, keys=METRICS) -> list:
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


def demo(args) -> list:
    study = Study(args.out or os.path.join(ROOT, "runs", "demo"), args.device, 1.0, log_every=50)
    study.data("shapes")
    study.data("shapes_video")  # not trained on here; ready for the STEVE configs
    runs = {}
    for guidance in ("vq", "msf"):
        vae = study.vae(f"vae_{guidance}", f"configs/vae_{guidance}_shapes.yaml", steps=args.vae_steps,
                        overrides={"val_every": args.vae_steps, "val_samples": 64})
        runs[guidance] = study.ocl(f"slate_{guidance}", f"configs/slate_{guidance}_shapes.yaml", vae, 0,
                                   steps=args.ocl_steps, overrides={"val_every": args.ocl_steps, "val_samples": 64})
    metrics = study.evaluate([runs["vq"], runs["msf"]], "slate_vq_vs_msf", ["--compare", "--separability"])
    summary = demo_summary(metrics, {runs[g]: g for g in runs})
    atomic_write_text(os.path.join(study.out, "summary.json"), strict_json(summary, indent=2) + "\n")
    lines = ["# Demo: SLATE with VQ vs MSF guidance on `shapes` (smoke-size run)", "",
             f"VAEs {args.vae_steps} steps, SLATE {args.ocl_steps} steps, one seed, 64x64 images, validation split "
             f"of 200 images. Far too short to reproduce the paper; README 'Results' says what was measured.", "",
             "| guidance | ARI | ARIfg | mIoU | mBO | separability inter ↑ | intra ↓ | inter/intra ↑ |",
             "|---|---|---|---|---|---|---|---|"]
    for run in metrics["runs"]:
        lines.append(f"| {run['name']} | {number(run['ari'])} | {number(run['ari_fg'])} | {number(run['miou'])} | "
                     f"{number(run['mbo'])} | {number(run['sep_inter'], 3)} | {number(run['sep_intra'], 3)} | "
                     f"{number(ratio(run['sep_inter'], run['sep_intra']))} |")
    lines += ["", "Metrics in percent, background counted as a segment (README, 'Evaluation protocol'). Separability: KMeans on each "
              "image's scale-1 guidance vectors, k = its number of ground-truth segments.",
              "", f"Figures: {os.path.relpath(os.path.join(study.out, 'eval', 'slate_vq_vs_msf'), ROOT)}/"]
    return finish(study, lines)


def full(args) -> list:
    study = Study(args.out or os.path.join(ROOT, "runs", "study"), args.device, args.steps_scale)
    seeds = args.seeds
    lines = ["# Study: multi-scale fusion on the synthetic data", "",
             f"Seeds: main {seeds}, ablations {args.ablation_seeds}, video {args.video_seeds}; "
             f"steps x{args.steps_scale} of the `*_shapes*.yaml` configs; "
             f"device: {device_name(args.device)}. "
             f"Metrics in percent, mean ± std over seeds, background counted as a segment.", ""]
    if "main" in args.parts or "ablations" in args.parts:
        lines += [study.data("shapes"), ""]
    vaes = {}
    if "main" in args.parts or "ablations" in args.parts:
        for guidance in ("vq", "grouped", "msf") if "main" in args.parts else ("msf",):
            vaes[guidance] = study.vae(f"vae_{guidance}", f"configs/vae_{guidance}_shapes.yaml")
    if "main" in args.parts:
        lines += ["## SLATE on `shapes`: VQ vs grouped vs MSF guidance", ""] + metric_header("guidance")
        for guidance in ("vq", "grouped", "msf"):
            runs = [study.ocl(f"slate_{guidance}_s{s}", f"configs/slate_{guidance}_shapes.yaml", vaes[guidance], s)
                    for s in seeds]
            lines.append(mean_std_row(guidance, study.evaluate(runs, f"slate_{guidance}")))
        separability = study.evaluate([vaes[g] for g in ("vq", "grouped", "msf")], "separability",
                                      ["--separability", "--samples", 200])
        lines += ["", "## Object separability of the guidance (paper Table 4 form)", "",
                  "KMeans on each validation image's guidance vectors (k = its ground-truth segments), 200 images. "
                  "MSF rows: scale-invariant part before (`si_before`) and after (`si_after`) inter-scale fusion, "
                  "scale-variant part (`sv`), final `X_n`.", ""] + separability_table(separability)
    if "ablations" in args.parts:
        lines += ["", "## Ablations on SLATE + MSF (paper Table 5)", ""] + metric_header("variant")
        reference = [study.ocl(f"slate_msf_s{s}", "configs/slate_msf_shapes.yaml", vaes["msf"], s)
                     for s in args.ablation_seeds]  # the main part's runs where the seeds overlap
        lines.append(mean_std_row("full MSF (reference)", study.evaluate(reference, "slate_msf_reference")))
        for label, (slug, overrides) in VAE_ABLATIONS.items():
            vae = study.vae(f"vae_msf_{slug}", "configs/vae_msf_shapes.yaml", overrides)
            runs = [study.ocl(f"slate_msf_{slug}_s{s}", "configs/slate_msf_shapes.yaml", vae, s)
                    for s in args.ablation_seeds]
            lines.append(mean_std_row(label, study.evaluate(runs, f"slate_msf_{slug}")))
        for label, (slug, scales) in SCALE_ABLATIONS.items():
            runs = [study.ocl(f"slate_msf_{slug}_s{s}", "configs/slate_msf_shapes.yaml", vaes["msf"], s,
                              {"guidance_scales": scales}) for s in args.ablation_seeds]
            lines.append(mean_std_row(label, study.evaluate(runs, f"slate_msf_{slug}")))
    if "video" in args.parts:
        lines += ["", study.data("shapes_video"), ""]
        lines += ["", "## STEVE on `shapes_video`: VQ vs MSF guidance (one score per 24-frame video)", ""]
        lines += metric_header("guidance")
        for guidance in ("vq", "msf"):
            vae = study.vae(f"vae_{guidance}_video", f"configs/vae_{guidance}_shapes_video.yaml")
            runs = [study.ocl(f"steve_{guidance}_s{s}", f"configs/steve_{guidance}_shapes_video.yaml", vae, s)
                    for s in args.video_seeds]
            lines.append(mean_std_row(guidance, study.evaluate(runs, f"steve_{guidance}")))
    return finish(study, lines)


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
    parser.add_argument("--out", default="", help="study directory (default runs/demo or runs/study)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="full: OCL seeds")
    parser.add_argument("--ablation_seeds", type=int, nargs="+", default=None,
                        help="full: OCL seeds of the ablations (default --seeds)")
    parser.add_argument("--video_seeds", type=int, nargs="+", default=None,
                        help="full: OCL seeds of the STEVE runs (default --seeds)")
    parser.add_argument("--parts", nargs="+", default=["main", "ablations", "video"],
                        choices=("main", "ablations", "video"), help="full: which parts to run")
    parser.add_argument("--steps_scale", type=float, default=1.0, help="full: multiply every config's steps")
    parser.add_argument("--vae_steps", type=int, default=300, help="demo: VAE pretraining steps")
    parser.add_argument("--ocl_steps", type=int, default=500, help="demo: SLATE training steps")
    args = parser.parse_args(argv)
    args.ablation_seeds = args.ablation_seeds or args.seeds
    args.video_seeds = args.video_seeds or args.seeds
    (demo if args.preset == "demo" else full)(args)


if __name__ == "__main__":
    main()
