"""Benchmarks, nanoGPT style: one line per figure, `name: value`, ratios measured side by side in one run.

    python bench.py                 # every figure at CPU-friendly sizes (each under a minute on 2 cores)
    python bench.py NAME [NAME ...] # only these figures
    python bench.py --full          # paper-size settings, for a GPU

Ratios are measured in one process with the two sides interleaved, because shared machines are noisy.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

FIGURES = {}


def figure(function):
    """Register a benchmark; it returns a dict of name -> value to print."""
    FIGURES[function.__name__] = function
    return function


# ----------------------------------------------------------------------------------------------------------------
# Data loading.

@figure
def loader_images_per_s(args):
    """Decoded and normalised 128x128 images per second through OCLDataset + DataLoader with 2 workers."""
    import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        prepare_data.write_synthetic("shapes", tmp, {"train": 512}, seed=0, min_objects=2, max_objects=6,
                                     frames=0, workers=2, progress=False)
        dataset = prepare_data.OCLDataset(os.path.join(tmp, "train.lmdb"), train=True)
        sampler = prepare_data.StepSampler(len(dataset), 64, seed=0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=2,
                                             persistent_workers=True, prefetch_factor=4)
        iterator = iter(loader)
        for _ in range(5):  # warm up the workers
            next(iterator)
        batches = 60 if args.full else 30
        start = time.perf_counter()
        images = 0
        for _ in range(batches):
            images += next(iterator)["image"].shape[0]
        elapsed = time.perf_counter() - start
        del iterator, loader
    return {"loader_images_per_s": round(images / elapsed)}


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"figures to run (default all): {', '.join(FIGURES)}")
    parser.add_argument("--full", action="store_true", help="paper-size settings (use on a GPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                               else ("cpu" if args.device == "auto" else args.device))
    wanted = args.names or list(FIGURES)
    unknown = [name for name in wanted if name not in FIGURES]
    if unknown:
        sys.exit(f"error: unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    print(f"device: {torch.cuda.get_device_name(args.device) if args.device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    for name in wanted:
        for key, value in FIGURES[name](args).items():
            print(f"{key}: {value}", flush=True)


if __name__ == "__main__":
    main()
