"""Throughput of every bundle's network and of MONAI's SegResNet, SwinUNETR and UNETR, before and after each speed
switch: training step time, inference time, peak memory and achieved FLOP/s against the device's peak.

Protocol (fixed before any result was looked at):

- Networks: each bundle's network as its ``configs/train.json`` (the GAN generator: ``train_gan.json``) defines it,
  and MONAI's SegResNet (Model Zoo ``brats_mri_segmentation`` settings), SwinUNETR (``feature_size=48``, as in
  MONAI's BraTS tutorial) and UNETR (ViT-B, MONAI's defaults).
- Inputs: ``brain``, one 4 x 128^3 crop (batch 1) for the brain networks (HLWA-UNet and the three MONAI ones);
  ``roi``, each bundle network's own training ROI and batch size from its config (MedSegDiff: 2 x 256^2 slices and
  their noisy masks; TransUNet: 16 x 128^2 slices; the GAN generator: 5 x 32 x 128 x 128; DC2Fusion: 1 x (MRI + PET)
  128^3; HLWA-UNet: 2 x 4 x 128^3).
- ``train``: one optimiser step, forward + backward of a mean-square loss of the (first) output + AdamW (the
  bundles' own losses differ and are not what is compared); ``warmup`` untimed steps, then the median of
  ``repeats`` timed ones. ``infer``: with the ``brain`` input, sliding-window inference (MONAI's
  ``SlidingWindowInferer``, ROI = the crop, overlap 0.5, window batch 1) of a whole 4 x 240 x 240 x 155 volume;
  with ``roi``, one forward of the ROI batch; both in eval mode without gradients.
- Variants: the network as it ships (float32; the collection's window attentions through SDPA), and that network
  with one switch changed: ``sdpa`` (the attention path toggled: explicit for HLWA-UNet / DC2Fusion, SDPA for
  SwinUNETR, whose MONAI default is explicit), ``bf16`` / ``fp16`` (autocast, :func:`~common.engines.acceleration.
  prepare_network`), ``channels_last``, ``compile`` (``torch.compile``, default options) and ``checkpointing``
  (the encoders' gradient checkpointing; training only).
- Every measurement runs in a fresh interpreter (:func:`child_main`), so one peak does not hide another: peak
  memory is the process's resident peak on the CPU (``ru_maxrss``, as in :mod:`common.benchmarks.hlwa`) and
  ``torch.cuda.max_memory_allocated`` on CUDA. A measurement that fails or runs past ``timeout_s`` is reported
  as such, never dropped.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on the shipped network in float32 with explicit attention
  (the same arithmetic as every variant), once per network, input and mode: the forward and backward of one
  step, or one forward times the number of network calls of the inference; recomputation by checkpointing is not
  counted (model FLOPs). Achieved FLOP/s = FLOPs / median time, against the device's *measured* matmul peak in the
  variant's dtype (:func:`matmul_peak`: the best of a few square matmuls, ``n = 2048`` on the CPU and 8192 on
  CUDA), not a datasheet figure.
- On CUDA (or with ``profile=True``) one extra step of each variant runs under ``torch.profiler``; the kernels
  whose names show attention (flash, memory-efficient, fmha, SDPA) are listed, and the trace is written to
  ``<work_dir>/traces/``.

Same command on the CPU and on CUDA; the report (``speed.json``, ``speed.md``) is written by
:func:`common.benchmarks.report.write_report`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from common.benchmarks.hlwa import SEGRESNET
from common.benchmarks.report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLES = os.path.join(REPO, "bundles")

SWITCHES = ("sdpa", "bf16", "fp16", "channels_last", "compile", "checkpointing")
INPUTS = ("brain", "roi")
MODES = ("train", "infer")
VOLUME = (240, 240, 155)
BRAIN_ROI = 128
TINY_BRAIN_ROI = 32
TINY_VOLUME = (40, 40, 36)
ATTENTION_PATTERNS = ("flash", "fmha", "efficient_attention", "scaled_dot_product", "cudnn_attention", "attention")


@dataclass(frozen=True)
class NetworkSpec:
    """How to build one benchmarked network and feed it.

    ``bundle``/``config``: the bundle config holding ``network_def`` (None for MONAI's networks, built from
    ``monai_def``); ``brain``: takes the 4 x 128^3 brain crop; ``roi``: takes a bundle ROI (its ``roi_kind`` says
    how to read it from the config); ``attention_arg``/``checkpoint_arg``: the constructor arguments the ``sdpa`` and
    ``checkpointing`` switches toggle, with the shipped value of the attention one in ``attention_default``;
    ``tiny``: network overrides for the tiny sizes of the unit test (bundle networks take their pipeline's test
    profile instead).
    """

    label: str
    bundle: str | None = None
    config: str = "configs/train.json"
    stage: str = "train"
    monai_def: dict[str, Any] | None = None
    brain: bool = False
    roi_kind: str | None = None
    attention_arg: str | None = None
    attention_default: bool = True
    checkpoint_arg: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)


NETWORKS: dict[str, NetworkSpec] = {
    "hlwa": NetworkSpec(
        "HLWA-UNet",
        bundle="brats_mri_hlwa_segmentation",
        brain=True,
        roi_kind="volume",
        attention_arg="fused_attention",
        checkpoint_arg="gradient_checkpointing",
    ),
    "medsegdiff": NetworkSpec(
        "MedSegDiff",
        bundle="brats_mri_medsegdiff_segmentation",
        roi_kind="diffusion",
        checkpoint_arg="gradient_checkpointing",
    ),
    "transunet": NetworkSpec("TransUNet", bundle="covid_ct_gan_transunet_segmentation", roi_kind="slice"),
    "covid_gan": NetworkSpec(
        "COVID GAN generator",
        bundle="covid_ct_gan_transunet_segmentation",
        config="configs/train_gan.json",
        stage="train_gan",
        roi_kind="volume",
    ),
    "dc2fusion": NetworkSpec(
        "DC2Fusion",
        bundle="adni_mri_pet_dc2fusion",
        roi_kind="fusion",
        attention_arg="fused_attention",
        checkpoint_arg="gradient_checkpointing",
    ),
    # MONAI Model Zoo brats_mri_segmentation's SegResNet, the HLWA benchmark's baseline
    "segresnet": NetworkSpec("SegResNet (MONAI)", monai_def=SEGRESNET, brain=True, tiny={"init_filters": 8}),
    "swinunetr": NetworkSpec(
        "SwinUNETR (MONAI)",
        monai_def={"_target_": "SwinUNETR", "in_channels": 4, "out_channels": 3, "feature_size": 48},
        brain=True,
        attention_arg="use_flash_attention",
        attention_default=False,
        checkpoint_arg="use_checkpoint",
        # group norm: at 32^3 the bottleneck is one voxel, which instance norm refuses
        tiny={"feature_size": 12, "depths": [1, 1, 1, 1], "norm_name": ("group", {"num_groups": 3})},
    ),
    "unetr": NetworkSpec(
        "UNETR (MONAI)",
        monai_def={"_target_": "UNETR", "in_channels": 4, "out_channels": 3, "img_size": "@roi"},
        brain=True,
        tiny={"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "feature_size": 8},
    ),
}


def parse_names(value, allowed, what: str) -> list[str]:
    """``"a,b"`` (or fire's tuple) -> ``["a", "b"]``, each in ``allowed``, no repeats."""
    names = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}: choose from {list(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a {what} is listed twice: {names}")
    if not names:
        raise ValueError(f"no {what} given: choose from {list(allowed)}")
    return names


def applicable(name: str, inp: str, mode: str, switch: str) -> bool:
    """Whether ``switch`` (or ``"shipped"``) applies to network ``name`` with input ``inp`` in ``mode``."""
    spec = NETWORKS[name]
    if (inp == "brain" and not spec.brain) or (inp == "roi" and spec.roi_kind is None):
        return False
    if switch == "sdpa":
        return spec.attention_arg is not None
    if switch == "checkpointing":
        return spec.checkpoint_arg is not None and mode == "train"
    return True


def variant_label(name: str, switch: str) -> str:
    """What the variant is, e.g. ``"float32, SDPA attention"`` for the shipped HLWA-UNet."""
    spec = NETWORKS[name]
    if switch == "shipped":
        attention = "" if spec.attention_arg is None else (", SDPA" if spec.attention_default else ", explicit attn")
        return f"shipped (float32{attention})"
    if switch == "sdpa":
        return "explicit attention" if spec.attention_default else "SDPA attention"
    return {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "channels_last": "channels-last",
            "compile": "torch.compile", "checkpointing": "grad. checkpointing"}[switch]  # fmt: skip


# ---------------------------------------------------------------- one measurement (runs in a child process)


def _bundle_parser(spec: NetworkSpec, tiny: bool):
    from monai.bundle import ConfigParser

    from common.bundle.pipeline import load_pipeline, stage_overrides

    bundle_dir = os.path.join(BUNDLES, spec.bundle)
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, spec.config))
    parser.update({"bundle_root": bundle_dir})
    if tiny:
        stage = next(s for s in load_pipeline(bundle_dir)["stages"] if s["name"] == spec.stage)
        keep = ("network_def", "roi_size", "batch_size", "pad_size")
        parser.update({k: v for k, v in stage_overrides(stage, "test").items() if k.startswith(keep)})
    return parser


def build(name: str, inp: str, switch: str, tiny: bool, brain_roi: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The network (float32, CPU) with ``switch``'s constructor argument applied, and one batch of inputs."""
    from monai.bundle import ConfigParser

    spec = NETWORKS[name]
    net_overrides: dict[str, Any] = {}
    if switch == "sdpa":
        net_overrides[spec.attention_arg] = not spec.attention_default
    elif switch == "explicit":  # the FLOP count: the same arithmetic, written out
        if spec.attention_arg is not None:
            net_overrides[spec.attention_arg] = False
    if switch == "checkpointing":
        net_overrides[spec.checkpoint_arg] = True
    if spec.bundle is not None:
        parser = _bundle_parser(spec, tiny)
        parser.update({f"network_def#{k}": v for k, v in net_overrides.items()})
        net = parser.get_parsed_content("network_def")
    else:
        roi = TINY_BRAIN_ROI if tiny else brain_roi
        definition = {**spec.monai_def, **(spec.tiny if tiny else {}), **net_overrides}
        net = ConfigParser({"roi": [roi] * 3, "net": definition}).get_parsed_content("net")
    gen = torch.Generator().manual_seed(0)
    if inp == "brain":
        roi = TINY_BRAIN_ROI if tiny else brain_roi
        return net, [torch.randn(1, 4, roi, roi, roi, generator=gen)]
    batch = int(parser.get_parsed_content("batch_size"))
    if spec.roi_kind == "volume":  # HLWA-UNet, the GAN generator
        channels = 4 if name == "hlwa" else 1
        return net, [torch.randn(batch, channels, *parser.get_parsed_content("roi_size"), generator=gen)]
    if spec.roi_kind == "fusion":
        return net, [torch.rand(batch, 2, *parser.get_parsed_content("roi_size"), generator=gen)]
    if spec.roi_kind == "slice":
        size = int(parser.get_parsed_content("network_def#img_size"))
        return net, [torch.randn(batch, 1, size, size, generator=gen)]
    # diffusion: (noisy mask, timesteps, image)
    roi = parser.get_parsed_content("roi_size")
    masks = len(parser.get_parsed_content("region_channels"))
    return net, [
        torch.randn(batch, masks, *roi, generator=gen),
        torch.randint(0, 1000, (batch,), generator=gen),
        torch.randn(batch, 4, *roi, generator=gen),
    ]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: str, dtype: str, n: int | None = None, repeats: int = 5) -> float:
    """Measured peak FLOP/s of ``torch.matmul`` on two ``n x n`` matrices of ``dtype`` (best of ``repeats``)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=dev).to(getattr(torch, dtype))
    torch.matmul(a, b)
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _attention_kernels(prof) -> list[str]:
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(p in n.lower() for p in ATTENTION_PATTERNS))


def measure(
    network: str,
    inp: str,
    mode: str,
    switch: str = "shipped",
    device: str = "cpu",
    tiny: bool = False,
    repeats: int = 3,
    warmup: int = 1,
    brain_roi: int = BRAIN_ROI,
    volume: tuple[int, ...] = VOLUME,
    profile: bool = False,
    trace_dir: str | None = None,
) -> dict[str, Any]:
    """One measurement (see the module docstring); ``switch="flops"`` counts FLOPs instead of timing.

    Returns ``seconds`` (the timed repeats), ``median_s``, ``first_s`` (the first, untimed call: includes
    compilation), ``calls`` (network calls per timed repeat), ``peak_gb``, ``flops_per_call`` (flops only) and
    ``attention_kernels`` (profiled only).
    """
    from common.engines.acceleration import prepare_network

    dev = torch.device(device)
    if dev.type == "cuda":  # peaks per measurement also when one child measures several (see run_benchmark)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    net, inputs = build(network, inp, "explicit" if switch == "flops" else switch, tiny, brain_roi)
    amp = switch in ("bf16", "fp16")
    prepare_network(
        net, dev, amp=amp, amp_dtype="bfloat16" if switch == "bf16" else "float16",
        channels_last=switch == "channels_last", compile=switch == "compile",
    )  # fmt: skip
    inputs = [x.to(dev) for x in inputs]
    calls = [0]
    net.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + 1))
    result: dict[str, Any] = {}
    sliding = mode == "infer" and inp == "brain"

    if mode == "train":
        net.train()
        optimiser = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def run_once() -> None:
            optimiser.zero_grad(set_to_none=True)
            _first(net(*inputs)).float().square().mean().backward()
            optimiser.step()

    else:
        from monai.inferers import SlidingWindowInferer

        net.eval()
        roi = inputs[0].shape[2:]
        size = TINY_VOLUME if tiny else tuple(volume)
        whole = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(1)).to(dev) if sliding else None
        inferer = SlidingWindowInferer(roi_size=list(roi), sw_batch_size=1, overlap=0.5)

        @torch.no_grad()
        def run_once() -> None:
            if sliding:
                inferer(whole, net)
            else:
                net(*inputs)

    if switch == "flops":
        if mode == "infer":  # one call; the timing child counts the calls of the inference
            with torch.no_grad():
                result["flops_per_call"] = count_flops(lambda: net(*inputs))
        else:
            result["flops_per_call"] = count_flops(run_once)
        return result

    t0 = time.perf_counter()
    for i in range(max(1, warmup)):
        if sliding and i == 0:  # the first call (and compilation) on one window, not a whole volume
            with torch.no_grad():
                net(*inputs)
        else:
            run_once()
        _sync(dev)
        if i == 0:
            result["first_s"] = time.perf_counter() - t0
    seconds = []
    for _ in range(repeats):
        calls[0] = 0
        _sync(dev)
        t0 = time.perf_counter()
        run_once()
        _sync(dev)
        seconds.append(time.perf_counter() - t0)
    result.update(seconds=seconds, median_s=sorted(seconds)[len(seconds) // 2], calls=calls[0])
    if dev.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            run_once()
            _sync(dev)
        result["attention_kernels"] = _attention_kernels(prof)
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            prof.export_chrome_trace(os.path.join(trace_dir, f"{network}_{inp}_{mode}_{switch}.json"))
    return result


def _measure_one(spec: dict[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    threads = spec.pop("threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    if "peak_dtype" in spec:
        return {"peak_flops": matmul_peak(spec["device"], spec["peak_dtype"])}
    return measure(**spec)


def child_main(spec_json: str) -> None:
    """Entry point of a measurement child: ``spec_json`` holds :func:`measure`'s arguments (and ``threads``), or a
    list of them (CUDA only, where each measurement resets the peak statistics); prints one JSON line, an object or
    a list of objects (``{"error": ...}`` for one that failed)."""
    spec = json.loads(spec_json)
    if isinstance(spec, dict):
        print(json.dumps(_measure_one(spec)))
        return
    results = []
    for k, one in enumerate(spec, 1):
        try:
            results.append(_measure_one(one))
        except Exception as err:  # reported in the table; the next measurement still runs
            results.append({"error": f"{type(err).__name__}: {err}"[:300]})
        what = [str(one[key]) for key in ("network", "inp", "mode", "switch", "peak_dtype") if key in one]
        print(f"  measured {k}/{len(spec)}: {' '.join(what)}", file=sys.stderr, flush=True)
    print(json.dumps(results))


# ---------------------------------------------------------------- the benchmark (parent process)


def _run_child(spec: dict[str, Any] | list[dict[str, Any]], timeout_s: float) -> Any:
    """Run :func:`child_main` in a fresh interpreter; an error or a timeout becomes ``{"error": ...}`` (for each
    measurement of a list)."""
    cmd = [sys.executable, "-m", "common.benchmarks.speed", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    many = isinstance(spec, list)  # a list streams the child's progress (its stderr) through
    try:
        out = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=None if many else subprocess.PIPE, text=True, cwd=REPO, env=env,
            timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        failed = {"error": f"timed out after {timeout_s:.0f} s"}
        return [failed] * len(spec) if many else failed
    if out.returncode != 0:
        lines = [line for line in (out.stderr or "").strip().splitlines() if line.strip()]
        failed = {
            "error": (lines[-1] if lines else f"exit status {out.returncode}")[:300],
            "stderr": (out.stderr or "")[-3000:],
        }
        return [failed] * len(spec) if many else failed
    return json.loads(out.stdout.strip().splitlines()[-1])


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return name


def run_benchmark(
    work_dir: str = "runs/benchmark_speed",
    networks=tuple(NETWORKS),
    inputs=INPUTS,
    modes=MODES,
    switches=None,
    device: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    brain_roi: int = BRAIN_ROI,
    volume: tuple[int, ...] = VOLUME,
    tiny: bool = False,
    threads: int | None = None,
    profile: bool | None = None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Measure every applicable (network, input, mode, variant) and write ``speed.json`` / ``speed.md``.

    Args:
        work_dir: where the report and the profiler traces go.
        networks, inputs, modes, switches: subsets (names or ``"a,b"``) of :data:`NETWORKS`, :data:`INPUTS`,
            :data:`MODES` and :data:`SWITCHES`; ``switches`` default: all, ``fp16`` only on CUDA. The shipped
            variant is always measured (the reference of every switch).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.
        repeats, warmup: timed and untimed steps per measurement (a sliding-window inference counts as one).
        brain_roi, volume: the brain crop edge and the whole volume of the sliding-window inference.
        tiny: tiny networks and sizes (the bundles' test profiles), for the unit test and a quick check.
        threads: ``torch.set_num_threads`` in every child (default: torch's default).
        profile: profile one extra step per variant and list the attention kernels (default: on CUDA only).
        timeout_s: limit per measurement; past it the measurement is reported as timed out.
    """
    networks = parse_names(networks, NETWORKS, "network")
    inputs = parse_names(inputs, INPUTS, "input")
    modes = parse_names(modes, MODES, "mode")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if switches is None:
        switches = [s for s in SWITCHES if s != "fp16" or dev.type == "cuda"]
    switches = parse_names(switches, SWITCHES, "switch")
    profile = dev.type == "cuda" if profile is None else bool(profile)
    work_dir = os.path.abspath(work_dir)
    base = {"device": str(dev), "tiny": bool(tiny), "brain_roi": int(brain_roi), "volume": [int(v) for v in volume]}
    if threads:
        base["threads"] = int(threads)

    plan = [
        (n, i, m, s)
        for n in networks
        for i in inputs
        for m in modes
        for s in ("shipped", *switches)
        if applicable(n, i, m, s)
    ]
    if not plan:
        raise ValueError(f"nothing to measure: none of {switches} applies to {networks} with {inputs}, {modes}")
    groups = list(dict.fromkeys((n, i, m) for n, i, m, _ in plan))  # in the plan's order
    dtypes = ["float32"] + [d for s, d in (("bf16", "bfloat16"), ("fp16", "float16")) if s in switches]
    total = len(plan) + len(groups) + len(dtypes)
    done = 0

    def progress(what: str, res: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        status = res.get("error") or ", ".join(
            f"{k} {res[k]:.3g}" for k in ("median_s", "peak_gb", "flops_per_call", "peak_flops") if k in res
        )
        print(f"[{done}/{total}] {what}: {status}", flush=True)

    results: dict[str, Any] = {
        "device": str(dev),
        "device_name": _device_name(dev),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "tiny": bool(tiny),
        "brain_roi": TINY_BRAIN_ROI if tiny else int(brain_roi),
        "volume": list(TINY_VOLUME if tiny else volume),
        "repeats": repeats,
        "peak_flops": {},
        "rows": [],
    }
    trace_dir = os.path.join(work_dir, "traces") if profile else None
    jobs: list[tuple[str, Any, dict[str, Any]]] = [("peak", d, {**base, "peak_dtype": d}) for d in dtypes]
    for n, i, m in groups:
        jobs.append(("flops", (n, i, m), {**base, "network": n, "inp": i, "mode": m, "switch": "flops"}))
        jobs += [
            ("row", p, {**base, "network": n, "inp": i, "mode": m, "switch": p[3], "repeats": repeats,
                        "warmup": max(warmup, 2) if p[3] == "compile" else warmup,  # the first calls compile
                        "profile": profile, "trace_dir": trace_dir})
            for p in plan if p[:3] == (n, i, m)
        ]  # fmt: skip
    if dev.type == "cuda":  # one child: CUDA start-up is slow, and each measurement resets the peak statistics
        measured = iter(_run_child([spec for _, _, spec in jobs], timeout_s * len(jobs)))
    else:  # the CPU's resident peak cannot be reset: one child per measurement
        measured = (_run_child(spec, timeout_s) for _, _, spec in jobs)
    flops: dict[tuple[str, str, str], int | None] = {}
    for (kind, key, _), res in zip(jobs, measured):
        if kind == "peak":
            results["peak_flops"][key] = res.get("peak_flops")
            progress(f"measured matmul peak, {key}", res)
            continue
        if kind == "flops":
            flops[key] = res.get("flops_per_call")
            progress(f"{' '.join(key)}: FLOPs", res)
            continue
        n, i, m, sw = key
        progress(f"{n} {i} {m} {variant_label(n, sw)}", res)
        row = {"network": n, "input": i, "mode": m, "switch": sw, "variant": variant_label(n, sw), **res}
        if flops.get((n, i, m)) is not None and "median_s" in res:
            row["flops"] = flops[(n, i, m)] * (res["calls"] if m == "infer" else 1)
            row["flops_per_s"] = row["flops"] / res["median_s"]
            peak = results["peak_flops"].get({"bf16": "bfloat16", "fp16": "float16"}.get(sw, "float32"))
            row["fraction_of_peak"] = row["flops_per_s"] / peak if peak else None
        results["rows"].append(row)
    shipped = {(r["network"], r["input"], r["mode"]): r for r in results["rows"] if r["switch"] == "shipped"}
    for row in results["rows"]:
        ref = shipped.get((row["network"], row["input"], row["mode"]))
        if ref is not None and "median_s" in ref and "median_s" in row:
            row["speedup"] = ref["median_s"] / row["median_s"]
    write_report(work_dir, "speed", results, format_table(results))
    return results


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report: the device and its measured peaks, then one row per measurement."""
    peaks = ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" if p else f"{d} failed" for d, p in results["peak_flops"].items())
    lines = [
        f"Device {results['device']} ({results['device_name']}), torch {results['torch']}, "
        f"{results['threads']} threads{', TINY sizes' if results['tiny'] else ''}. Measured matmul peak: {peaks}.",
        f"brain = 1 x 4 x {results['brain_roi']}^3 crop; roi = the bundle's training ROI and batch; infer on brain = "
        f"sliding window over 4 x {' x '.join(map(str, results['volume']))} (overlap 0.5), on roi = one forward. "
        f"Time: median of {results['repeats']} (s per step / per volume / per forward); speed-up against the shipped "
        "variant; peak memory: process RSS on the CPU, max allocated on CUDA; FLOPs: model FLOPs of the float32 "
        "network (FlopCounterMode), against the measured peak of the variant's dtype.",
        "",
        "| network | input | mode | variant | time (s) | speed-up | peak (GB) | GFLOP | GFLOP/s | % of peak | attention kernels |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["rows"]:
        label = NETWORKS[r["network"]].label
        if "error" in r:
            lines.append(f"| {label} | {r['input']} | {r['mode']} | {r['variant']} | {r['error']} | | | | | | |")
            continue

        def fmt(key: str, pattern: str, scale: float = 1.0, r: dict[str, Any] = r) -> str:
            return pattern.format(r[key] * scale) if r.get(key) is not None else "-"

        kernels = ", ".join(f"`{k}`" for k in r.get("attention_kernels", [])) if "attention_kernels" in r else "-"
        lines.append(
            f"| {label} | {r['input']} | {r['mode']} | {r['variant']} | {r['median_s']:.3g} | "
            f"{fmt('speedup', '{:.2f}x')} | {r['peak_gb']:.2f} | {fmt('flops', '{:.1f}', 1e-9)} | "
            f"{fmt('flops_per_s', '{:.1f}', 1e-9)} | {fmt('fraction_of_peak', '{:.1f}', 100.0)} | {kernels} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1])
