"""The brain bundles' evaluate configs report distances in millimetres of the grid the metric is computed on.

Each test reads the bundle's own ``train.json`` + ``evaluate.json``, runs the config's preprocessing (and, for
MedSegDiff, its postprocessing with ``Invertd``) on a case written as NIfTI with an anisotropic, permuted and
flipped affine, and feeds the config's metric handlers. The distances must equal medpy's and surface-distance's on
the original arrays with the file's own voxel spacing, and differ from the same computation in voxels (or in the
resized grid's spacing): the evaluation path, not just the function, uses millimetres.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import surface_distance
import torch
from ignite.engine import Engine
from medpy.metric import binary as medpy_binary
from monai.bundle import ConfigParser
from monai.data import MetaTensor

BUNDLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bundles")
# voxel axis 0 is world y at 1.2 mm, axis 1 world x at 0.9 mm (flipped), axis 2 world z at 3 mm
AFFINE = np.array([[0, -0.9, 0, 40.0], [1.2, 0, 0, -30.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
ZOOMS = (1.2, 0.9, 3.0)  # per voxel axis, as nibabel's header reports them
SHAPE = (40, 36, 14)


def box(lo, hi) -> np.ndarray:
    out = np.zeros(SHAPE, bool)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return out


def brats_labels(offset: int) -> np.ndarray:
    """BraTS 2021 labels (1 necrotic, 2 edema, 4 enhancing); ``offset`` moves the tumour core in z."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[box((8, 8, 3), (30, 28, 11))] = 2
    seg[np.roll(box((13, 12, 5), (24, 22, 9)), offset, axis=2)] = 4
    seg[np.roll(box((16, 15, 6), (21, 19, 8)), offset, axis=2)] = 1
    return seg


def regions(seg: np.ndarray) -> list[np.ndarray]:
    return [np.isin(seg, (1, 4)), seg > 0, seg == 4]  # TC, WT, ET


def write_case(folder, seg_ref: np.ndarray, seg_pred: np.ndarray) -> tuple[list[str], str, str]:
    rng = np.random.default_rng(0)
    brain = box((3, 3, 1), (37, 33, 13))
    images = []
    for m in ("t1ce", "t1", "t2", "flair"):
        data = np.where(brain, 100 + 10 * rng.random(SHAPE) + 50 * (seg_ref > 0), 0).astype(np.float32)
        images.append(str(folder / f"{m}.nii.gz"))
        nib.save(nib.Nifti1Image(data, AFFINE), images[-1])
    paths = []
    for name, seg in (("ref", seg_ref), ("pred", seg_pred)):
        paths.append(str(folder / f"{name}_seg.nii.gz"))
        nib.save(nib.Nifti1Image(seg, AFFINE), paths[-1])
    assert tuple(nib.load(paths[0]).header.get_zooms()) == pytest.approx(ZOOMS)
    return images, paths[0], paths[1]


def directed_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """max of the directed 95th percentiles over medpy's surface distances (see test_segmentation_metrics)."""
    directed = getattr(medpy_binary, "__surface_distances")
    return max(np.percentile(directed(pred, ref, spacing, 1), 95), np.percentile(directed(ref, pred, spacing, 1), 95))


def parser_for(bundle: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLES, bundle, "configs", f) for f in ("train.json", "evaluate.json")])
    parser["bundle_root"] = os.path.join(BUNDLES, bundle)
    parser["data_list_file_path"] = "/nonexistent.json"  # default dataset info: BraTS 2021 labels
    parser["device"] = "$torch.device('cpu')"
    for k, v in overrides.items():
        parser[k] = v
    return parser


def run_metrics(parser: ConfigParser, items: list[dict]) -> Engine:
    """The config's key metric and additional metrics on an engine whose output is ``items`` (decollated)."""
    engine = Engine(lambda e, item: [item])
    metrics = {
        **parser.get_parsed_content("validate#key_metric"),
        **parser.get_parsed_content("validate#additional_metrics"),
    }
    for name, metric in metrics.items():
        metric.attach(engine, name)
    engine.run(items, max_epochs=1)
    return engine


def check_against_references(engine: Engine, preds: list[np.ndarray], refs: list[np.ndarray], spacing, tolerance_mm):
    details = engine.state.metric_details
    for c, (p, g) in enumerate(zip(preds, refs)):
        expected = directed_hd95(p, g, spacing)
        assert float(details["hd95_mm"][0, c]) == pytest.approx(expected, abs=0.01)
        distances = surface_distance.compute_surface_distances(g, p, spacing)
        nsd = surface_distance.compute_surface_dice_at_tolerance(distances, tolerance_mm)
        assert float(details["nsd"][0, c]) == pytest.approx(nsd, abs=1e-4)
        assert float(details["dice"][0, c]) == pytest.approx(medpy_binary.dc(p, g), abs=1e-4)


def test_hlwa_evaluation_is_in_mm_of_the_image_grid(tmp_path):
    seg_ref, seg_pred = brats_labels(0), brats_labels(2)  # the core two slices (6 mm) off
    images, ref_path, pred_path = write_case(tmp_path, seg_ref, seg_pred)
    parser = parser_for("brats_mri_hlwa_segmentation")
    preprocess = parser.get_parsed_content("validate#preprocessing")
    ref = preprocess({"image": images, "label": ref_path})
    pred = preprocess({"image": images, "label": pred_path})  # the same crop (the image's foreground)
    assert ref["label"].shape[1:] != SHAPE  # reoriented and cropped: not the file's grid
    engine = run_metrics(parser, [{"pred": pred["label"], "label": ref["label"]}])
    refs, preds = regions(seg_ref), regions(seg_pred)
    check_against_references(engine, preds, refs, ZOOMS, parser.get_parsed_content("nsd_tolerance_mm"))
    tc_voxels = directed_hd95(preds[0], refs[0], (1.0, 1.0, 1.0))
    assert abs(float(engine.state.metric_details["hd95_mm"][0, 0]) - tc_voxels) > 1.0
    assert float(engine.state.metric_details["hd95_mm"][0, 0]) == pytest.approx(6.0, abs=0.01)


def test_medsegdiff_evaluation_is_in_mm_of_the_original_grid(tmp_path):
    seg_ref = brats_labels(0)
    images, ref_path, _ = write_case(tmp_path, seg_ref, seg_ref)
    parser = parser_for("brats_mri_medsegdiff_segmentation", roi_size=[16, 16], num_ensemble=1)
    item = parser.get_parsed_content("validate#preprocessing")({"image": images, "label": ref_path})
    image = item["image"]
    resized_spacing = np.linalg.norm(image.affine.numpy()[:3, :3], axis=0)
    assert image.shape[1:3] == (16, 16) and not np.allclose(sorted(resized_spacing), sorted(ZOOMS))
    # a network output on the network's (resized) grid: the bright tumour of the image, two voxels off in-plane
    logits = torch.roll((image[:1] > image[:1].max() * 0.6).float(), 2, dims=1)
    pred = MetaTensor(logits, meta=image.meta, applied_operations=image.applied_operations)
    out = parser.get_parsed_content("validate#postprocessing")({**item, "pred": pred})
    assert out["pred"].shape == out["label"].shape == (1, *SHAPE)  # inverted to the original grid
    engine = run_metrics(parser, [{"pred": out["pred"], "label": out["label"]}])
    p, g = out["pred"][0].numpy() > 0.5, regions(seg_ref)[1]
    assert p.any() and 0.0 < medpy_binary.dc(p, g) < 1.0
    check_against_references(engine, [p], [g], ZOOMS, parser.get_parsed_content("nsd_tolerance_mm"))
    ours = float(engine.state.metric_details["hd95_mm"][0, 0])
    assert abs(ours - directed_hd95(p, g, (1.0, 1.0, 1.0))) > 0.5
    assert abs(ours - directed_hd95(p, g, tuple(resized_spacing[[1, 0, 2]]))) > 0.5  # not the resized grid's
