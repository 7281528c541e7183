"""Training throughput of the merging model, in reflections per second.

Prints one JSON line per configuration::

    {"name": "train_throughput", "value": ..., "unit": "reflections/s", "device": ...,
     "machine": ..., "d_model": ..., "n_layers": ..., "mc_samples": ..., "batch_reflections": ...}

Batches are synthetic (random rows, Wilson-like intensities, 8 metadata columns) and built
before timing, so only ``Trainer.learn_batch`` is measured.  Run
``python benchmarks/bench_training.py --quick`` for a short check.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from streamvi.merging.features import N_METADATA
from streamvi.merging.model.batch import Batch
from streamvi.merging.model.geometry import STATE_WIDTH, lattice_axes
from streamvi.merging.trainer import Trainer, TrainerConfig, resolve_device



@dataclass
class Case:
    d_model: int
    n_layers: int
    mc_samples: int
    images_per_batch: int
    amp_bf16: bool = False
    compile: bool = False
    #: per-image geometry refinement (docs/model.md change 9), on by default
    refine_geometry: bool = True


CASES = [
    Case(32, 2, 8, 8),      # `streamvi merge` default on the CPU
    Case(32, 2, 8, 8, refine_geometry=False),   # what the refinement costs
    Case(16, 2, 8, 8),      # `streamvi serve` default
    Case(32, 2, 8, 32),
    Case(32, 4, 32, 8),     # issue #3's reference size
    Case(32, 4, 8, 8),
    Case(256, 5, 32, 8),    # abismal's benchmark size
    Case(32, 20, 32, 8, amp_bf16=True, compile=True),
]
# a GPU wants more reflections per step than a CPU to amortise kernel launches
GPU_CASES = [
    Case(32, 2, 8, 256),
    Case(32, 2, 8, 256, refine_geometry=False),
    Case(16, 2, 8, 256),
    Case(32, 4, 32, 128),
    Case(32, 4, 32, 512),
    Case(256, 5, 32, 64),
    Case(256, 5, 32, 64, amp_bf16=True, compile=True),
    Case(32, 20, 32, 8),
    Case(32, 20, 32, 128),
    Case(32, 20, 32, 128, amp_bf16=True, compile=True),
]
QUICK_CASES = [Case(32, 2, 8, 8), Case(32, 4, 32, 8)]


def synthetic_batches(n_batches: int, images_per_batch: int, reflections_per_image: int,
                      n_rows: int, seed: int = 0) -> list[Batch]:
    """Ragged batches of whole images (±10 % reflections per image)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        counts = rng.integers(int(0.9 * reflections_per_image),
                              int(1.1 * reflections_per_image) + 1, size=images_per_batch)
        n = int(counts.sum())
        scale = np.repeat(rng.lognormal(0.0, 0.3, size=images_per_batch), counts)
        itrue = 1000.0 * scale * rng.exponential(1.0, size=n)
        sigiobs = 0.05 * itrue + 30.0
        offsets = np.concatenate([[0], np.cumsum(counts)])
        batches.append(Batch(
            asu_id=torch.as_tensor(rng.integers(0, n_rows, size=(1, n))),
            iobs=torch.as_tensor(itrue + rng.normal(0.0, sigiobs), dtype=torch.float32),
            sigiobs=torch.as_tensor(sigiobs, dtype=torch.float32),
            metadata=torch.as_tensor(_metadata(rng, n), dtype=torch.float32),
            image_index=torch.as_tensor(np.repeat(np.arange(images_per_batch), counts)),
            image_offsets=torch.as_tensor(offsets),
            half=torch.as_tensor(rng.integers(0, 2, size=images_per_batch)),
            image_id=torch.arange(images_per_batch),
            # per-image geometry refinement (on by default) costs its share of the step too
            geometry=torch.zeros((images_per_batch, STATE_WIDTH)),
            axes=torch.as_tensor(lattice_axes(
                rng.normal(size=(images_per_batch, 3, 3)) * 0.02 + np.eye(3) * 0.03)),
        ))
    return batches


def _metadata(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random features in :data:`streamvi.merging.features.METADATA_COLUMNS`' layout, with a unit
    scattered-beam direction so the geometry corrections have Ewald offsets to move."""
    meta = rng.normal(size=(n, N_METADATA))
    meta[:, 3] = 9.5                                      # photon energy, keV
    meta[:, 4] *= 1e-3                                    # Ewald offset, Å⁻¹
    meta[:, 5] = 1e-3                                     # profile radius, Å⁻¹
    meta[:, 6] = meta[:, 4] / meta[:, 5]
    meta[:, 7:10] /= np.linalg.norm(meta[:, 7:10], axis=1, keepdims=True)
    return meta


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: Case, device: torch.device, *, reflections_per_image: int, n_rows: int,
            warmup_steps: int, seconds: float, min_steps: int) -> dict:
    on_gpu = device.type == "cuda"
    amp, compiled = case.amp_bf16 and on_gpu, case.compile and on_gpu
    config = TrainerConfig(d_model=case.d_model, n_layers=case.n_layers,
                           mc_samples=case.mc_samples, device=str(device), amp_bf16=amp,
                           compile=compiled, warmup_reflections=10_000,
                           refine_geometry=case.refine_geometry)
    rng = np.random.default_rng(1)
    trainer = Trainer(config, centric=rng.uniform(size=n_rows) < 0.1,
                      epsilon=np.ones(n_rows), n_metadata=N_METADATA)
    batches = [b.to(device) for b in synthetic_batches(
        8, case.images_per_batch, reflections_per_image, n_rows)]
    for i in range(warmup_steps):
        trainer.learn_batch(batches[i % len(batches)])
    _sync(device)
    steps, reflections = 0, 0
    start = time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        batch = batches[steps % len(batches)]
        trainer.learn_batch(batch)
        steps += 1
        reflections += batch.n_reflections
    _sync(device)
    elapsed = time.perf_counter() - start
    return {
        "name": "train_throughput", "value": round(reflections / elapsed, 1),
        "unit": "reflections/s", "device": device.type, "machine": machine_name(device),
        "d_model": case.d_model, "n_layers": case.n_layers, "mc_samples": case.mc_samples,
        "batch_reflections": round(reflections / steps), "images_per_batch": case.images_per_batch,
        "amp_bf16": amp, "compile": compiled, "refine_geometry": case.refine_geometry,
        "steps": steps,
        "seconds_per_step": round(elapsed / steps, 5), "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="two small cases, short timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--reflections-per-image", type=int, default=800)
    parser.add_argument("--rows", type=int, default=12_000,
                        help="unique reflections (lysozyme to 1.8 Å: about 12,000)")
    parser.add_argument("--seconds", type=float, default=None, help="timing per case")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 6.0)
    cases = QUICK_CASES if args.quick else CASES + (GPU_CASES if device.type == "cuda" else [])
    for case in cases:
        try:
            figure = measure(case, device, reflections_per_image=args.reflections_per_image,
                             n_rows=args.rows, warmup_steps=2 if args.quick else 5,
                             seconds=seconds, min_steps=3)
        except Exception as exc:  # one failing case (e.g. compile) must not hide the others
            figure = {"name": "train_throughput", "error": f"{type(exc).__name__}: {exc}",
                      "device": device.type, "d_model": case.d_model,
                      "n_layers": case.n_layers, "mc_samples": case.mc_samples}
        print(json.dumps(figure), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
