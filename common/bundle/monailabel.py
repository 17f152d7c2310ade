"""Serving the collection's segmentation bundles with MONAI Label's ``monaibundle`` app.

MONAI Label (0.8.5, its own environment: ``python3 tools/monailabel_env.py``) runs a bundle's own configs: for
inference it instantiates ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` of
``configs/inference.json`` (dropping ``SaveImaged`` writers and appending its own restore and writer), loads
``models/model.pt`` into the network, and names the labels after the ``channel_def`` of the first output in
``metadata.json``; for training it runs ``configs/train.json`` with the ids ``bundle_root``, ``device``,
``train#trainer#max_epochs``, ``train#dataset#data``, ``validate#dataset#data`` and ``train#handlers``
overridden (the data being the annotated studies of its datastore, ``{"image", "label"}`` items). It passes no
other override, so a setting that differs from a config's default must be written into the config itself.

What this module does, so that the README's commands and the integration test do the same thing:

- :func:`write_app`: the ``monaibundle`` sample app (shipped inside the MONAI Label wheel) copied to an app
  folder, with the bundles under ``<app>/model/<name>`` (MONAI Label's place for local bundles, found with
  ``--conf models <name>,<name>``);
- :func:`pin_overrides`: write config overrides (``id#sub_id`` -> value) into a bundle's config file;
- :func:`write_study` / :func:`write_studies`: a MONAI Label study is ONE image file, so the four BraTS
  modality files of a case become one 4-channel NIfTI (channels last, in the collection's order T1c, T1, T2,
  FLAIR), and annotated cases get their label under ``labels/final/<study>.nii.gz``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.bundle import ConfigParser

from common.data.nifti import check_same_grid, load_nifti
from common.data.writers import save_nifti
from common.errors import DataError
from common.io import atomic_path

__all__ = [
    "LABELS_SUBDIR",
    "SEGMENTATION_BUNDLES",
    "monaibundle_app_source",
    "pin_overrides",
    "write_app",
    "write_studies",
    "write_study",
]

# the collection's bundles that MONAI Label can serve (the fusion bundle produces no label map)
SEGMENTATION_BUNDLES = (
    "brats_mri_hlwa_segmentation",
    "brats_mri_medsegdiff_segmentation",
    "covid_ct_gan_transunet_segmentation",
)
# where MONAI Label's local datastore keeps the final (annotated) label of a study
LABELS_SUBDIR = os.path.join("labels", "final")
_SAMPLE_APP = os.path.join("monailabel", "sample-apps", "monaibundle")


def monaibundle_app_source(env_prefix: str) -> str:
    """The ``monaibundle`` sample app that the MONAI Label wheel installs under ``<env_prefix>/monailabel``.

    ``monailabel apps --download`` copies the same folder from GitHub; the wheel's copy needs no network.

    Raises:
        FileNotFoundError: ``env_prefix`` holds no MONAI Label sample app (MONAI Label is not installed there).
    """
    path = os.path.join(env_prefix, _SAMPLE_APP)
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise FileNotFoundError(f"{path}: no monaibundle app; is MONAI Label installed in {env_prefix}?")
    return path


def write_app(app_dir: str, bundle_dirs: Sequence[str], sample_app: str) -> str:
    """Copy the ``monaibundle`` app to ``app_dir`` and each bundle folder to ``<app_dir>/model/<bundle name>``.

    Args:
        app_dir: the app folder to create (must not exist yet, so that nothing of the user's is overwritten).
        bundle_dirs: bundle folders (each holding ``configs/inference.json``); the folder name is the model name.
        sample_app: the ``monaibundle`` folder, e.g. from :func:`monaibundle_app_source`.

    Returns:
        ``app_dir``, to pass as ``monailabel start_server --app``.

    Raises:
        FileExistsError: ``app_dir`` exists.
        FileNotFoundError: a bundle folder has no ``configs/inference.json``.
    """
    if os.path.exists(app_dir):
        raise FileExistsError(f"{app_dir}: the app folder exists already; choose a new one")
    for bundle in bundle_dirs:
        if not os.path.isfile(os.path.join(bundle, "configs", "inference.json")):
            raise FileNotFoundError(f"{bundle}: not a bundle folder (no configs/inference.json)")
    shutil.copytree(sample_app, app_dir, ignore=shutil.ignore_patterns("__pycache__"))
    for bundle in bundle_dirs:
        name = os.path.basename(os.path.normpath(bundle))
        shutil.copytree(bundle, os.path.join(app_dir, "model", name), ignore=shutil.ignore_patterns("__pycache__"))
    return app_dir


def pin_overrides(config_path: str, overrides: Mapping[str, Any]) -> None:
    """Write ``overrides`` (config ids such as ``network_def#features`` -> values) into ``config_path``.

    MONAI Label runs a bundle's config as it is on disk, so a setting that a user would pass on the
    command line (``--num_inference_steps 10``) has to be written into the file. Each id must exist in the
    config or have an existing parent (as with MONAI's command-line overrides). The file is rewritten
    atomically with 4-space indentation.

    Raises:
        KeyError: an id whose parent does not exist in the config.
    """
    parser = ConfigParser()
    parser.read_config(config_path)
    for key, value in overrides.items():
        parent = key.rsplit("#", 1)[0] if "#" in key else ""
        if parent and parent not in parser:
            raise KeyError(f"{config_path}: cannot set {key!r}, the config has no {parent!r}")
        parser[key] = value
    content = parser.get()
    if content.get("_meta_") == {}:  # added by ConfigParser for metadata; a config file does not carry it
        content = {k: v for k, v in content.items() if k != "_meta_"}
    with atomic_path(config_path) as tmp:
        ConfigParser.export_config_file(content, tmp, fmt="json", indent=4)


def write_study(image_files: str | Sequence[str], path: str, channel_order: Sequence[int] | None = None) -> str:
    """Write one study for MONAI Label: the modality files of a case as one channels-last NIfTI.

    ``image_files`` are 3D images on one voxel grid (e.g. a BraTS case's T1c, T1, T2, FLAIR files, in the
    order the bundles expect), or a single 3D or 4D file. The affine of the first file is kept, so a label
    predicted on the study overlays the original files.

    Args:
        image_files: one path, or one path per channel.
        path: the study file to write (``.nii.gz``), written atomically.
        channel_order: optional reordering of the channels (indices into the stacked channels), e.g.
            :data:`common.data.labels.MSD_TO_STANDARD` for an MSD Task01 image.

    Returns:
        ``path``.

    Raises:
        DataError: a file is unreadable, not 3D where several files are stacked, or off the first file's grid.
        ValueError: ``channel_order`` is not a permutation of the channels.
    """
    files = [image_files] if isinstance(image_files, (str, os.PathLike)) else list(image_files)
    if not files:
        raise ValueError("image_files is empty: a study needs at least one image")
    if len(files) == 1:
        data, affine, _ = load_nifti(files[0], ndim=(3, 4))
    else:
        check_same_grid(files)
        volumes = [load_nifti(f, ndim=3) for f in files]
        data, affine = np.stack([v[0] for v in volumes], axis=-1), volumes[0][1]
    if channel_order is not None:
        channels = data.shape[3] if data.ndim == 4 else 1
        if sorted(int(c) for c in channel_order) != list(range(channels)):
            raise ValueError(f"channel_order must be a permutation of range({channels}), got {list(channel_order)}")
        if data.ndim == 4:
            data = data[..., [int(c) for c in channel_order]]
    save_nifti(data, affine, path, np.float32)
    return path


def write_studies(
    items: Sequence[Mapping[str, Any]],
    studies_dir: str,
    with_labels: Sequence[str] | bool = False,
    channel_order: Sequence[int] | None = None,
) -> list[str]:
    """Write datalist items (``{"case", "image"[, "label"]}``, absolute paths) as MONAI Label studies.

    Each item becomes ``<studies_dir>/<case>.nii.gz`` (:func:`write_study`); the labels of the cases named in
    ``with_labels`` (or of every item holding one, with ``True``) are copied, values unchanged, to
    ``<studies_dir>/labels/final/<case>.nii.gz``, which MONAI Label's datastore treats as annotated and
    trains on. Labels must be in the convention the bundle writes (its ``default_dataset_info``).

    Returns:
        the study ids (the case names), in the order of ``items``.

    Raises:
        DataError: a case named in ``with_labels`` has no label, or a file is unreadable.
        ValueError: two items share a case name.
    """
    cases = [str(item["case"]) for item in items]
    if len(set(cases)) != len(cases):
        raise ValueError(f"case names must be unique, got {cases}")
    labelled = set(cases) if with_labels is True else set(with_labels or ())
    unknown = labelled - set(cases)
    if unknown:
        raise ValueError(f"with_labels names cases that are not in items: {sorted(unknown)}")
    os.makedirs(os.path.join(studies_dir, LABELS_SUBDIR), exist_ok=True)
    for case, item in zip(cases, items):
        write_study(item["image"], os.path.join(studies_dir, f"{case}.nii.gz"), channel_order)
        if with_labels is True and "label" not in item or case not in labelled:
            continue
        if "label" not in item:
            raise DataError(case, "no 'label' in the datalist item, so it cannot be an annotated study")
        target = os.path.join(studies_dir, LABELS_SUBDIR, f"{case}.nii.gz")
        with atomic_path(target) as tmp:
            shutil.copyfile(item["label"], tmp)
    return cases
