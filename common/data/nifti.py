"""Checked NIfTI reading for the command-line tools: every failure is a one-line ``DataError`` naming the file.

nibabel does the reading; this module only turns its many failure modes (missing file, not a NIfTI,
truncated gzip, wrong shape, NaN/Inf) into messages a user can act on. Bundles read images with MONAI's
``LoadImaged``; tools that check or convert data use :func:`load_nifti` first so that a bad file is
reported before hours of training, not in the middle of them.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from common.errors import DataError

__all__ = ["check_same_grid", "load_nifti"]

# what nibabel / gzip / zlib raise on unreadable or damaged files
_READ_ERRORS = (ImageFileError, HeaderDataError, EOFError, OSError, ValueError, zlib.error)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _open(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open ``path`` lazily (header only) as a NIfTI-1/2 image, or raise a ``DataError``."""
    if not os.path.isfile(path):
        raise DataError(path, "file not found" if not os.path.exists(path) else "not a file")
    try:
        img = nib.load(os.fspath(path))
    except _READ_ERRORS as err:
        raise DataError(path, f"not a readable NIfTI file ({_one_line(err)})") from err
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise DataError(path, f"not a NIfTI file (read as {type(img).__name__})")
    return img


def _expected(ndim: tuple[int, ...] | None, channels: int | None) -> str:
    dims = " or ".join(f"{n}D" for n in ndim) if ndim else "4D"
    return f"a {dims} image" + (f" with {channels} channels" if channels is not None else "")


def load_nifti(
    path: str | os.PathLike,
    *,
    ndim: int | tuple[int, ...] | None = None,
    channels: int | None = None,
    allow_nonfinite: bool = False,
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI file completely and check it, raising :class:`~common.errors.DataError` naming the file.

    Detected: a missing file; a file that is not a NIfTI (text or PNG bytes under a ``.nii.gz`` name);
    truncated or corrupt data (the whole array is read, so a cut gzip stream is found now); a wrong number
    of dimensions (``"expected a 4D image with 4 channels, got 3D shape (64, 64, 48)"``); a wrong channel
    count; NaN or infinite values (``"contains 12 NaN values"``).

    Axes of size 1 after the third are dropped when that makes the shape match ``ndim`` (some tools
    write 3D volumes as ``(X, Y, Z, 1)``).

    Args:
        path: the ``.nii`` or ``.nii.gz`` file.
        ndim: accepted number(s) of dimensions, e.g. ``3`` or ``(3, 4)``; ``None`` accepts any.
        channels: required size of the 4th (channel / time) axis, which the image must then have.
        allow_nonfinite: accept NaN and Inf values.
        dtype: dtype of the returned array (scaling from the header is applied first).

    Returns:
        ``(data, affine, header)``: the array in NIfTI axis order ``(X, Y, Z[, C])``, the 4x4 voxel-to-world
        affine (float64) and the nibabel header.
    """
    ndims = (ndim,) if isinstance(ndim, int) else (tuple(ndim) if ndim is not None else None)
    if channels is not None and ndims is None:
        ndims = (4,)
    img = _open(path)
    try:
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        raise DataError(path, f"truncated or corrupt image data ({_one_line(err)})") from err
    while ndims is not None and data.ndim not in ndims and data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if (ndims is not None and data.ndim not in ndims) or (
        channels is not None and (data.ndim < 4 or data.shape[3] != channels)
    ):
        raise DataError(path, f"expected {_expected(ndims, channels)}, got {data.ndim}D shape {data.shape}")
    if not allow_nonfinite and np.issubdtype(data.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = int(np.count_nonzero(np.isinf(data)))
        if n_nan or n_inf:
            found = " and ".join(s for s in (n_nan and f"{n_nan} NaN", n_inf and f"{n_inf} infinite") if s)
            raise DataError(path, f"contains {found} values")
    return data.astype(dtype, copy=False), np.asarray(img.affine, dtype=np.float64), img.header


def check_same_grid(paths_or_imgs: Sequence[str | os.PathLike | nib.Nifti1Image], atol: float = 1e-3) -> None:
    """Raise :class:`~common.errors.DataError` naming both files if two images lie on different voxel grids.

    The spatial shapes (first three axes, so a 4D image and its 3D label compare equal) and the affines
    (to ``atol``, in mm) of every image are compared with the first one's. Paths are opened lazily: only
    the headers are read.
    """
    grids = []
    for i, item in enumerate(paths_or_imgs):
        img = item if isinstance(item, nib.spatialimages.SpatialImage) else _open(item)
        name = os.fspath(item) if not isinstance(item, nib.spatialimages.SpatialImage) else img.get_filename()
        grids.append((name or f"<image {i}>", tuple(img.shape[:3]), np.asarray(img.affine, dtype=np.float64)))
    if not grids:
        return
    ref_name, ref_shape, ref_affine = grids[0]
    for name, shape, affine in grids[1:]:
        if shape != ref_shape:
            raise DataError(name, f"spatial shape {shape} differs from {ref_shape} of {ref_name}")
        if not np.allclose(affine, ref_affine, atol=atol):
            diff = float(np.abs(affine - ref_affine).max())
            raise DataError(name, f"affine differs from that of {ref_name} (max difference {diff:.4g})")
