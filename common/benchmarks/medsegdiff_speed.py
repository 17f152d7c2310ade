"""Where MedSegDiff inference spends its time, and what whole-volume batching buys.

Two measurements on a real T1 (nilearn's MNI152 ICBM 2009a template, 1 mm, cropped to 181 x 217 x 181 and used for
all four channels, as in the issue that asked for this), each configuration in a fresh process:

- :func:`profile_inference`: the bundle's ``configs/inference.json`` on that case, end to end (the process's wall
  time, imports and config parsing included) and broken down into loading and preprocessing, network passes,
  the rest of sampling, STAPLE fusion, inverse transforms and writing, with the peak resident memory. The
  configurations differ only by overrides (:data:`PROFILE_VARIANTS`): the previous default of 32 (slice, sample)
  pairs per network call, the current default, and the memory-layout and bf16 switches where the configs have them.
  The weights are a seeded random initialisation (timing does not depend on them); each configuration's mask is
  compared with the first default run's.
- :func:`whole_volume_vs_slice_by_slice`: DDIM-10 x 5 samples of the same slices, once as one whole-volume chain
  (network calls of ``batch_size`` pairs) and once slice by slice (one chain per slice of its 5 members, what
  ``DiffusionInferer.sample`` per slice does); both give the same masks (same noise per slice and member).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from common.benchmarks.medsegdiff import BUNDLE
from common.benchmarks.report import write_report
from common.io import atomic_path

REPO = os.path.dirname(os.path.dirname(BUNDLE))
#: name -> overrides of inference.json; ``None`` values name switches that only some versions of the configs have
PROFILE_VARIANTS: dict[str, dict[str, Any]] = {
    "previous default (32 pairs per call)": {"sample_batch_size": 32},
    "default": {},
    "channels_last": {"channels_last": True},
    "channels_last + bf16 autocast": {"channels_last": True, "amp": True, "amp_dtype": "bfloat16"},
}


def mni_case(output_dir: str, shape: tuple[int, int, int] = (181, 217, 181)) -> tuple[str, str]:
    """Write the MNI152 T1 (cropped about its centre to ``shape``) as the four BraTS 2021 files of one case.

    Returns ``(dataset_dir, datalist)``; the datalist's ``testing`` list holds the case.
    """
    import nibabel as nib
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    array = np.asarray(template.dataobj, dtype=np.float32)
    start = [(n - m) // 2 for n, m in zip(array.shape, shape)]
    if any(s < 0 for s in start):
        raise ValueError(f"shape {shape} is larger than the template {array.shape}")
    crop = array[tuple(slice(s, s + m) for s, m in zip(start, shape))]
    affine = np.array(template.affine, dtype=float)
    affine[:3, 3] += affine[:3, :3] @ np.array(start)
    case = "MNI152_T1"
    os.makedirs(os.path.join(output_dir, case), exist_ok=True)
    files = []
    for modality in ("t1ce", "t1", "t2", "flair"):  # the bundle's channel order T1c, T1, T2, FLAIR
        name = f"{case}/{case}_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(crop, affine), os.path.join(output_dir, name))
        files.append(name)
    datalist = os.path.join(output_dir, "datalist.json")
    with open(datalist, "w") as f:
        json.dump({"layout": "brats2021", "testing": [{"case": case, "image": files}]}, f)
    return output_dir, datalist


def _inference_parser(dataset_dir: str, datalist: str, overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "inference.json"))
    parser.update({"bundle_root": BUNDLE, "dataset_dir": dataset_dir, "data_list_file_path": datalist, **overrides})
    return parser


def profile_child(dataset_dir: str, datalist: str, overrides_json: str) -> None:
    """One profiled inference (run by :func:`profile_inference` in a fresh interpreter); prints one JSON line."""
    overrides = json.loads(overrides_json)
    times: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return out

    parser = _inference_parser(dataset_dir, datalist, overrides)
    parser.get_parsed_content("initialize")
    network = parser.get_parsed_content("network")
    state = torch.load(parser.get_parsed_content("ckpt_path"), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    network.eval()
    calls: list[int] = []
    clock: list[float] = []
    network.register_forward_pre_hook(lambda m, a, k: clock.append(time.perf_counter()), with_kwargs=True)

    def after(module, args, kwargs, output):
        times["network passes"] = times.get("network passes", 0.0) + time.perf_counter() - clock.pop()
        calls.append(int(kwargs.get("x", args[0] if args else None).shape[0]))

    network.register_forward_hook(after, with_kwargs=True)
    item = timed("load + preprocess", parser.get_parsed_content("dataset").__getitem__, 0)
    inferer = parser.get_parsed_content("inferer")
    image = item["image"][None].to(parser.get_parsed_content("device"))
    with torch.no_grad(), torch.autocast("cuda", enabled=bool(parser.get_parsed_content("amp")) and image.is_cuda):
        item["pred"] = timed("sampling", inferer, image, network)[0].cpu()
    times["sampling (besides network passes)"] = times.pop("sampling") - times["network passes"]
    data = item
    for transform in parser.get_parsed_content("postprocessing").transforms:
        name = {"FuseEnsembled": "ensemble fusion", "Invertd": "inverse transforms"}.get(
            type(transform).__name__, type(transform).__name__
        )
        data = timed(name, transform, data)
    timed("writing", parser.get_parsed_content("writers"), data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(json.dumps({"stages": times, "network_calls": len(calls), "pairs": int(sum(calls)), "peak_gb": peak}))


def profile_inference(
    work_dir: str = "runs/speed_medsegdiff",
    num_inference_steps: int = 1,
    num_ensemble: int = 2,
    variants: dict[str, dict[str, Any]] | None = None,
    threads: int | None = None,
    shape: tuple[int, int, int] = (181, 217, 181),
) -> dict[str, Any]:
    """Profile the bundle's inference on the MNI152 case (``shape``) for each configuration (module docstring)."""
    import nibabel as nib

    work_dir = os.path.abspath(work_dir)
    dataset_dir, datalist = mni_case(os.path.join(work_dir, f"mni152_{'x'.join(map(str, shape))}"), shape)
    results: dict[str, Any] = {}
    masks: dict[str, np.ndarray] = {}
    base = _inference_parser(dataset_dir, datalist, {})
    for name, extra in (variants or PROFILE_VARIANTS).items():
        missing = [k for k in extra if k not in base]
        parser = _inference_parser(dataset_dir, datalist, extra)
        if missing:
            print(f"[{name}] skipped: inference.json has no {missing}", flush=True)
            continue
        tag = "".join(c if c.isalnum() else "_" for c in name)
        torch.manual_seed(0)  # the same weights for every configuration of the same network
        ckpt = os.path.join(work_dir, f"random_init_{tag}.pt")
        with atomic_path(ckpt) as tmp:
            torch.save(parser.get_parsed_content("network_def").state_dict(), tmp)
        out_dir = os.path.join(work_dir, "out", tag)
        overrides = {
            "ckpt_path": ckpt,
            "output_dir": out_dir,
            "num_inference_steps": num_inference_steps,
            "num_ensemble": num_ensemble,
            **({"num_threads": int(threads)} if threads else {}),
            **extra,
        }
        cmd = [sys.executable, "-m", "common.benchmarks.medsegdiff_speed", "profile_child", dataset_dir, datalist]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        print(f"[{name}] running inference ({num_inference_steps} step x {num_ensemble} samples) ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([*cmd, json.dumps(overrides)], capture_output=True, text=True, cwd=REPO, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"profiling {name} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = wall
        row["startup_seconds"] = wall - sum(row["stages"].values())
        masks[name] = np.asarray(nib.load(os.path.join(out_dir, "MNI152_T1_seg.nii.gz")).dataobj)
        results[name] = row
        print(
            f"[{name}] {wall:.1f} s in all, peak {row['peak_gb']:.2f} GB: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in row["stages"].items()),
            flush=True,
        )
    base = results.get("previous default (32 pairs per call)")
    for name, row in results.items():
        if "default" in masks:
            row["voxels_differing_from_default"] = int((masks[name] != masks["default"]).sum())
        row["speedup_vs_previous_default"] = base["wall_seconds"] / row["wall_seconds"] if base else None
    return {
        "case": "MNI152 T1 181x217x181 (all four channels)",
        "num_inference_steps": num_inference_steps,
        "num_ensemble": num_ensemble,
        "threads": threads or torch.get_num_threads(),
        "variants": results,
    }


@torch.no_grad()
def whole_volume_vs_slice_by_slice(
    work_dir: str = "runs/speed_medsegdiff",
    network_overrides: dict[str, Any] | None = None,
    slices: int | None = None,
    num_inference_steps: int = 10,
    num_ensemble: int = 5,
    batch_size: int | None = None,
    shape: tuple[int, int, int] = (181, 217, 181),
) -> dict[str, Any]:
    """DDIM-``num_inference_steps`` x ``num_ensemble`` on the MNI152 case's axial slices (all brain slices, or a slab
    of ``slices`` through the middle): one whole-volume chain vs one chain per slice. Returns seconds and agreement.

    ``network_overrides`` (e.g. the demo profile's smaller network at roi 32) apply to inference.json; the weights
    are a seeded random initialisation.
    """
    from common.engines.diffusion import DiffusionSegmentationInferer

    dataset_dir, datalist = mni_case(
        os.path.join(os.path.abspath(work_dir), f"mni152_{'x'.join(map(str, shape))}"), shape
    )
    parser = _inference_parser(dataset_dir, datalist, network_overrides or {})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    image = parser.get_parsed_content("dataset")[0]["image"].as_tensor()
    brain = torch.nonzero(image.flatten(0, -2).abs().amax(dim=0) > 0).flatten()
    if slices is not None:
        middle = brain[len(brain) // 2]
        brain = torch.arange(middle - slices // 2, middle - slices // 2 + slices)
    volume = image[None, ..., brain]
    batch = int(batch_size or parser.get_parsed_content("sample_batch_size"))
    scheduler = parser.get_parsed_content("sampling_scheduler")
    common = {"num_inference_steps": num_inference_steps, "num_ensemble": num_ensemble}
    whole_inferer = DiffusionSegmentationInferer(scheduler, batch_size=batch, **common)
    start = time.perf_counter()
    whole = whole_inferer(volume, network)
    whole_s = time.perf_counter() - start
    per_slice = DiffusionSegmentationInferer(scheduler, batch_size=num_ensemble, **common)
    start = time.perf_counter()
    alone = torch.stack([per_slice.sample(volume[..., z], network, keys=[(0, z)]) for z in range(volume.shape[-1])], -1)
    alone_s = time.perf_counter() - start
    return {
        "roi": list(parser.get_parsed_content("roi_size")),
        "channels": list(parser.get_parsed_content("network_def#channels")),
        "slices": int(volume.shape[-1]),
        "steps": num_inference_steps,
        "ensemble": num_ensemble,
        "batch_size": batch,
        "whole_volume_seconds": whole_s,
        "slice_by_slice_seconds": alone_s,
        "speedup": alone_s / whole_s,
        "masks_identical": bool(torch.equal(whole, alone)),
    }


def run_speed(
    work_dir: str = "runs/speed_medsegdiff",
    threads: int | None = None,
    slab: int = 6,
) -> dict[str, Any]:
    """Both measurements; prints a table and writes ``speed_medsegdiff.{json,md}`` to ``work_dir``.

    The bundle's default network is timed on a slab of ``slab`` slices (its cost per slice does not depend on the
    volume), the demo profile's network on every brain slice.
    """
    from common.benchmarks.medsegdiff import demo_recipe

    if threads:
        torch.set_num_threads(int(threads))
    profile = profile_inference(work_dir, threads=threads)
    recipe = demo_recipe()
    demo = {k: v for k, v in recipe.items() if k.startswith("network_def#") or k == "roi_size"}
    demo["sample_batch_size"] = 64
    batching = {
        "default network": whole_volume_vs_slice_by_slice(work_dir, slices=slab),
        "demo network": whole_volume_vs_slice_by_slice(work_dir, network_overrides=demo),
    }
    for name, row in batching.items():
        print(
            f"[{name}] whole volume {row['whole_volume_seconds']:.1f} s, slice by slice {row['slice_by_slice_seconds']:.1f} s "
            f"({row['speedup']:.2f}x), masks identical: {row['masks_identical']}",
            flush=True,
        )
    results = {"profile": profile, "batching": batching, "torch_threads": torch.get_num_threads()}
    write_report(work_dir, "speed_medsegdiff", results, format_speed(results))
    return results


def format_speed(results: dict[str, Any]) -> str:
    """Markdown tables of :func:`run_speed`'s results."""
    profile = results["profile"]
    variants = profile["variants"]
    stages = list(dict.fromkeys(k for row in variants.values() for k in row["stages"]))
    lines = [
        f"{profile['case']}, DDIM {profile['num_inference_steps']} step x {profile['num_ensemble']} samples, "
        f"{profile['threads']} threads, seeded random weights:",
        "",
        "| configuration | total (s) | speed-up | startup, imports, config (s) | "
        + " | ".join(f"{s} (s)" for s in stages)
        + " | network calls | peak memory (GB) | voxels differing from default |",
        "| --- | ---: | ---: | ---: | " + "---: | " * len(stages) + "---: | ---: | ---: |",
    ]
    for name, row in variants.items():
        speed = row.get("speedup_vs_previous_default")
        lines.append(
            f"| {name} | {row['wall_seconds']:.1f} | {f'{speed:.2f}x' if speed else ''} | {row['startup_seconds']:.1f} | "
            + " | ".join(f"{row['stages'].get(s, 0.0):.1f}" for s in stages)
            + f" | {row['network_calls']} | {row['peak_gb']:.2f} | {row.get('voxels_differing_from_default', '')} |"
        )
    lines += [
        "",
        "| network | roi | slices | DDIM steps x samples | pairs per call | whole volume (s) | slice by slice (s) | speed-up | "
        "same masks |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, row in results["batching"].items():
        lines.append(
            f"| {name} (channels {row['channels']}) | {'x'.join(map(str, row['roi']))} | {row['slices']} | "
            f"{row['steps']} x {row['ensemble']} | {row['batch_size']} | {row['whole_volume_seconds']:.1f} | "
            f"{row['slice_by_slice_seconds']:.1f} | {row['speedup']:.2f}x | {row['masks_identical']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "profile_child":
        profile_child(*sys.argv[2:])
