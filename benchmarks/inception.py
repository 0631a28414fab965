"""Speed of FID feature extraction: the Flax port against the PyTorch archive.

Both run in this process on the same 28x28 uint8 images, taking them all the
way to the 2048 features (8-bit pixels -> /255 -> bilinear resize to 299 ->
2x - 1 -> Inception):

- Flax: `cign_jax.evaluation.inception.FeatureExtractor` with the FID preprocessing
  fused into the compiled function (what `cign_jax.evaluation.fid` uses).
- PyTorch: the weight archive itself (`torch.jit.load` of default_1.pt, the
  TorchScript module the Flax weights are converted from), fed by
  `F.interpolate(bilinear, align_corners=False)`, in inference mode, with
  `torch.set_num_threads(--threads)`.

Both use the same batch size. After a warm-up (compilation, TorchScript's
profiling runs), the two alternate for --rounds rounds of --batches batches
each; the best and median images/s are printed, plus CPU-seconds per image
(process time), which is steadier than wall time when other processes share
the CPU. Device-agnostic: JAX runs on its default backend, PyTorch on CUDA
when available.

  python benchmarks/inception.py                 # defaults as reported
  python benchmarks/inception.py --batch-size 16 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--batch-size",
      type=int,
      default=None,
      help="images per call (default: the library's default, "
      "8 on CPU, 64 on accelerators)",
  )
  parser.add_argument(
      "--batches", type=int, default=3, help="batches per timed round"
  )
  parser.add_argument(
      "--rounds",
      type=int,
      default=4,
      help="timed rounds per framework (alternating)",
  )
  parser.add_argument(
      "--threads", type=int, default=2, help="torch.set_num_threads"
  )
  parser.add_argument(
      "--max-features",
      type=int,
      default=2048,
      choices=(64, 192, 768, 2048),
      help="deepest tap for the Flax port (PyTorch always "
      "runs the whole archive)",
  )
  parser.add_argument(
      "--no-torch", action="store_true", help="time the Flax port only"
  )
  parser.add_argument(
      "--shallow",
      action="store_true",
      help="also time the Flax port up to the 64/192/768 taps",
  )
  return parser.parse_args(argv)


def _cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def _load():
  try:
    return "load average %.2f %.2f %.2f" % os.getloadavg()
  except OSError:
    return "load average n/a"


def main(argv=None):
  args = _parse(argv)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo not in sys.path:
    sys.path.insert(0, repo)

  import jax  # pylint: disable=import-outside-toplevel
  from cign_jax.evaluation import fid, inception  # pylint: disable=import-outside-toplevel

  batch_size = args.batch_size or inception.default_batch_size()
  n = batch_size * args.batches
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(n, 28, 28, 1)).astype(np.uint8)

  print(
      f"command: python benchmarks/inception.py "
      f"{' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}".rstrip()
  )
  print(
      f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
      f"({jax.default_backend()}); {_cpu_name()}, {os.cpu_count()} CPUs"
  )
  print(
      f"batch size {batch_size}, {args.batches} batches per round, "
      f"{args.rounds} rounds; {_load()}"
  )

  # --- Flax -----------------------------------------------------------------
  t0 = time.perf_counter()
  extractor = inception.FeatureExtractor(batch_size=batch_size)
  t1 = time.perf_counter()

  def run_flax(max_features=args.max_features):
    return extractor.extract(
        pixels, max_features, preprocess=fid.preprocess_pixels
    )

  flax_first = run_flax()  # compiles
  t2 = time.perf_counter()
  print(
      f"flax: weights {t1 - t0:.1f} s, compile + first round "
      f"{t2 - t1:.1f} s"
  )
  runs = {"flax": run_flax}

  # --- PyTorch --------------------------------------------------------------
  torch_first = None
  if not args.no_torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      torch = None
      print("torch not installed: Flax only")
    if torch is not None:
      torch.set_num_threads(args.threads)
      device = "cuda" if torch.cuda.is_available() else "cpu"
      module = torch.jit.load(
          str(inception.fetch_archive()), map_location=device
      ).eval()
      tensor = torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2)

      def run_torch():
        outs = []
        with torch.inference_mode():
          for start in range(0, n, batch_size):
            x = tensor[start : start + batch_size].to(device).float() / 255.0
            x = torch.nn.functional.interpolate(
                x, size=(299, 299), mode="bilinear", align_corners=False
            )
            x = x.expand(-1, 3, -1, -1) * 2.0 - 1.0
            outs.append(module(x).cpu())
          if device == "cuda":
            torch.cuda.synchronize()
        return torch.cat(outs).numpy()

      t3 = time.perf_counter()
      torch_first = run_torch()  # TorchScript profiles its first calls
      run_torch()
      print(
          f"torch {torch.__version__} on {device}, {args.threads} threads: "
          f"warm-up {time.perf_counter() - t3:.1f} s"
      )
      runs["torch"] = run_torch

  if torch_first is not None and args.max_features == 2048:
    ours, theirs = flax_first[2048], torch_first
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(
        f"2048 features, Flax vs PyTorch: max relative difference " f"{rel:.1e}"
    )

  # --- Timed rounds, alternating ------------------------------------------
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for _ in range(args.rounds):
    for name, fn in runs.items():
      c0, w0 = time.process_time(), time.perf_counter()
      fn()
      wall[name].append(time.perf_counter() - w0)
      cpu[name].append(time.process_time() - c0)

  print(
      f"\nimages/s (best / median of {args.rounds} rounds of {n} images), "
      f"CPU-s per image (best); {_load()}"
  )
  for name in runs:
    best = n / min(wall[name])
    median = n / statistics.median(wall[name])
    cpu_per = min(cpu[name]) / n
    print(
        f"  {name:6s} {best:7.2f} / {median:7.2f} img/s   "
        f"{cpu_per:.3f} CPU-s/img"
    )
  if "torch" in runs:
    ratio = min(wall["torch"]) / min(wall["flax"])
    print(f"  Flax / PyTorch speed (best rounds): {ratio:.2f}x")

  if args.shallow:
    print("\nFlax up to a shallower tap (FID64/192/768 need no more):")
    for size in (64, 192, 768):
      run_flax(size)
      times = []
      for _ in range(max(2, args.rounds // 2)):
        w0 = time.perf_counter()
        run_flax(size)
        times.append(time.perf_counter() - w0)
      print(f"  up to {size:4d}: {n / min(times):7.2f} img/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
