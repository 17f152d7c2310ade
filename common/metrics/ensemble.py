"""Fusing an ensemble of segmentations: STAPLE consensus, mean and per-voxel uncertainty.

MedSegDiff (Wu et al., MIDL 2023, arXiv 2211.00611) samples several masks per image (5 in the paper) from
different noise and fuses them with STAPLE. The official code's "STAPLE" is a weighted mean; here it is the
real expectation-maximisation algorithm:

- :func:`staple`: binary STAPLE (Warfield, Zou, Wells, "Simultaneous truth and performance level estimation
  (STAPLE)", IEEE TMI 23(7), 2004) through ITK's ``itk.STAPLEImageFilter``.
- :func:`multilabel_staple`: multi-label STAPLE (Rohlfing, Russakoff, Maurer, "Performance-based classifier
  combination in atlas-based image segmentation using expectation-maximization parameter estimation", IEEE TMI
  23(8), 2004), the algorithm of ITK's ``MultiLabelSTAPLEImageFilter``. That filter is not wrapped in the ITK
  5.4.x Python packages, so the EM iteration is written here in NumPy (see the function for details).
- :func:`ensemble_mean`, :func:`ensemble_uncertainty`: per-voxel mean and standard deviation of the samples
  (the uncertainty map shown next to a MedSegDiff prediction).

Every function accepts NumPy arrays or torch tensors, either stacked ``(N, *spatial)`` or as a sequence of ``N``
arrays of shape ``spatial``, and returns the kind it was given (torch results on the input's device).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ensemble_mean", "ensemble_uncertainty", "multilabel_staple", "staple"]

ArrayLike = np.ndarray | torch.Tensor


def _stack(samples: ArrayLike | Sequence[ArrayLike], name: str) -> tuple[np.ndarray, torch.Tensor | None]:
    """``(N, *spatial)`` NumPy array from an array, a tensor or a sequence of them; also the first tensor seen."""
    reference = None
    if isinstance(samples, torch.Tensor):
        reference = samples
        array = samples.detach().cpu().numpy()
    elif isinstance(samples, np.ndarray):
        array = samples
    else:
        items = list(samples)
        if not items:
            raise ValueError(f"{name}: got an empty sequence.")
        tensors = [s for s in items if isinstance(s, torch.Tensor)]
        reference = tensors[0] if tensors else None
        arrays = [s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s) for s in items]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"{name}: all samples must have the same shape, got {sorted(shapes)}.")
        array = np.stack(arrays)
    if array.ndim < 2 or array.shape[0] < 1:
        raise ValueError(f"{name}: expected (N, *spatial) samples, got shape {array.shape}.")
    return array, reference


def _like(array: np.ndarray, reference: torch.Tensor | None, dtype: torch.dtype | None = None) -> ArrayLike:
    """Return ``array`` as a tensor on ``reference``'s device if the input was torch, else as NumPy."""
    if reference is None:
        return array
    return torch.as_tensor(np.ascontiguousarray(array), device=reference.device, dtype=dtype)


def _check_raters(array: np.ndarray, name: str) -> None:
    if array.shape[0] < 2:
        raise ValueError(f"{name}: needs at least two segmentations, got {array.shape[0]}.")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise ValueError(f"{name}: segmentations must be numeric or boolean, got dtype {array.dtype}.")


def staple(
    masks: ArrayLike | Sequence[ArrayLike], threshold: float = 0.5, max_iterations: int = 100
) -> tuple[ArrayLike, ArrayLike]:
    """Binary STAPLE consensus of ``N`` masks (ITK's ``STAPLEImageFilter``): ``(N, *spatial) -> (*spatial, *spatial)``.

    STAPLE jointly estimates each mask's sensitivity and specificity and the per-voxel probability that the true
    segmentation is foreground, by expectation-maximisation (Warfield et al. 2004); a mask that disagrees with
    the others gets low performance estimates and little say. Foreground is the value 1 (the masks must hold only
    0 and 1, or booleans). The consensus is ``probability > threshold`` (default 0.5, the maximum a posteriori
    label). ITK's Python wrapping provides the filter for ``double`` images only, so the masks are passed as
    float64 images holding 0/1 (ITK compares to the foreground value exactly, so no precision is lost).

    When no mask has any foreground, or every voxel of every mask is foreground, the EM estimate is undefined
    (ITK returns NaN); the unanimous mask is returned instead, with a probability map equal to it.

    Args:
        masks: ``N >= 2`` binary masks, stacked ``(N, *spatial)`` or a sequence; 2D, 3D or 4D; NumPy or torch.
        threshold: probability above which a voxel is foreground in the consensus.
        max_iterations: EM iterations at most (ITK's ``MaximumIterations``).

    Returns:
        ``(consensus, probability)``: the consensus mask, in the dtype of the (stacked) input, and the foreground
        probability (float64 NumPy, or a float32 tensor on the input's device for torch input).
    """
    array, reference = _stack(masks, "staple")
    _check_raters(array, "staple")
    spatial_dims = array.ndim - 1
    if spatial_dims not in (2, 3, 4):
        raise ValueError(f"staple: masks must be 2D, 3D or 4D (ITK's wrapping), got {spatial_dims}D.")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("staple: masks must be binary (0/1 or boolean); threshold probabilities first.")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"staple: threshold must be in [0, 1), got {threshold}.")
    if max_iterations < 1:
        raise ValueError(f"staple: max_iterations must be positive, got {max_iterations}.")
    binary = array.astype(np.float64)

    foreground = binary.sum()
    if foreground == 0 or foreground == binary.size:
        probability = binary[0].copy()
    else:
        import itk  # imported here: loading ITK takes seconds and only STAPLE needs it

        image_type = itk.Image[itk.D, spatial_dims]
        staple_filter = itk.STAPLEImageFilter[image_type, image_type].New()
        staple_filter.SetForegroundValue(1.0)
        staple_filter.SetMaximumIterations(int(max_iterations))
        for i, mask in enumerate(binary):
            staple_filter.SetInput(i, itk.image_from_array(np.ascontiguousarray(mask)))
        staple_filter.Update()
        probability = np.asarray(itk.array_from_image(staple_filter.GetOutput()), dtype=np.float64)
        if not np.isfinite(probability).all():
            raise RuntimeError("staple: ITK's STAPLE returned non-finite probabilities for these masks.")

    consensus = (probability > threshold).astype(array.dtype)
    return _like(consensus, reference, reference.dtype if reference is not None else None), _like(
        probability, reference, torch.float32
    )


def _pattern_codes(labels: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group voxels by their tuple of rater labels.

    ``labels``: ``(N, V)`` int64. Returns ``(patterns (P, N), counts (P,), inverse (V,))`` with
    ``labels[:, v] == patterns[inverse[v]]``.
    """
    raters = labels.shape[0]
    if num_labels**raters <= 2**62:
        codes = np.zeros(labels.shape[1], dtype=np.int64)
        for r in range(raters):
            codes = codes * num_labels + labels[r]
        unique, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
        patterns = np.empty((unique.size, raters), dtype=np.int64)
        rest = unique.copy()
        for r in reversed(range(raters)):
            patterns[:, r] = rest % num_labels
            rest //= num_labels
        return patterns, counts, inverse.reshape(-1)
    patterns, inverse, counts = np.unique(labels.T, axis=0, return_inverse=True, return_counts=True)
    return patterns, counts, inverse.reshape(-1)


def multilabel_staple(
    label_maps: ArrayLike | Sequence[ArrayLike], max_iterations: int = 100, tolerance: float = 1e-5
) -> tuple[ArrayLike, ArrayLike]:
    """Multi-label STAPLE consensus of ``N`` label maps: ``(N, *spatial) -> (*spatial, (L, *spatial))``.

    Rohlfing et al. 2004, as in ITK's ``MultiLabelSTAPLEImageFilter`` (not wrapped in ITK's Python packages).
    Labels are ``0 .. L-1`` with ``L = max label + 1``. Each rater ``r`` has a confusion matrix
    ``theta_r[j, l] = P(rater says j | truth is l)``. Iterated until the largest change of any ``theta`` entry is
    below ``tolerance`` (ITK's termination threshold) or ``max_iterations``:

    - E-step: ``W[v, l] ∝ prior[l] * prod_r theta_r[d_r(v), l]`` (normalised over ``l``);
    - M-step: ``theta_r[j, l] = sum_{v: d_r(v) = j} W[v, l] / sum_v W[v, l]``.

    As in ITK, ``prior[l]`` is the fixed frequency of label ``l`` over all raters, and ``theta`` starts from each
    rater's agreement with the majority vote. Departures, both documented: the initial confusion counts get one
    pseudo-count per entry (so that a label the vote never chose still has a valid column), and an exact tie of
    posteriors goes to the lowest label (ITK writes a separate "undecided" label). Because ``W`` depends on a
    voxel only through its tuple of rater labels, the EM runs over the distinct tuples weighted by their counts:
    exactly the same estimate, in time independent of the image size.

    Args:
        label_maps: ``N >= 2`` integer label maps (non-negative), stacked ``(N, *spatial)`` or a sequence.
        max_iterations: EM iterations at most.
        tolerance: stop when no confusion-matrix entry changes by more than this.

    Returns:
        ``(consensus, posterior)``: the consensus label map (input dtype) and the posterior ``W`` as an
        ``(L, *spatial)`` map (float64 NumPy, or float32 tensor on the input's device for torch input).
    """
    array, reference = _stack(label_maps, "multilabel_staple")
    _check_raters(array, "multilabel_staple")
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError("multilabel_staple: label maps must hold integer labels.")
    labels = array.astype(np.int64).reshape(array.shape[0], -1)
    if labels.min() < 0:
        raise ValueError(f"multilabel_staple: labels must be non-negative, got minimum {labels.min()}.")
    if max_iterations < 1:
        raise ValueError(f"multilabel_staple: max_iterations must be positive, got {max_iterations}.")
    if tolerance < 0:
        raise ValueError(f"multilabel_staple: tolerance must be non-negative, got {tolerance}.")
    raters = labels.shape[0]
    num_labels = int(labels.max()) + 1

    patterns, counts, inverse = _pattern_codes(labels, num_labels)
    weights = counts.astype(np.float64)
    prior = np.bincount(labels.reshape(-1), minlength=num_labels).astype(np.float64)
    prior /= prior.sum()
    log_prior = np.log(np.clip(prior, 1e-300, None))

    # initial confusion matrices from agreement with the majority vote (ties to the lowest label)
    votes = np.stack([np.bincount(p, minlength=num_labels) for p in patterns]).argmax(axis=1)
    theta = np.ones((raters, num_labels, num_labels))
    for r in range(raters):
        np.add.at(theta[r], (patterns[:, r], votes), weights)
    theta /= theta.sum(axis=1, keepdims=True)

    posterior = np.zeros((patterns.shape[0], num_labels))
    for _ in range(int(max_iterations)):
        # E-step, in log space: a product of many small probabilities underflows
        log_w = np.broadcast_to(log_prior, posterior.shape).copy()
        for r in range(raters):
            log_w += np.log(np.clip(theta[r][patterns[:, r]], 1e-300, None))
        log_w -= log_w.max(axis=1, keepdims=True)
        posterior = np.exp(log_w)
        posterior /= posterior.sum(axis=1, keepdims=True)
        # M-step
        mass = (weights[:, None] * posterior).sum(axis=0)
        new_theta = theta.copy()
        for r in range(raters):
            counts_r = np.zeros((num_labels, num_labels))
            np.add.at(counts_r, patterns[:, r], weights[:, None] * posterior)
            valid = mass > 0  # a label with no posterior mass keeps its previous column
            new_theta[r][:, valid] = counts_r[:, valid] / mass[valid]
        change = np.abs(new_theta - theta).max()
        theta = new_theta
        if change < tolerance:
            break

    consensus = posterior.argmax(axis=1)[inverse].reshape(array.shape[1:]).astype(array.dtype)
    posterior_map = np.moveaxis(posterior[inverse], -1, 0).reshape(num_labels, *array.shape[1:])
    return _like(consensus, reference, reference.dtype if reference is not None else None), _like(
        posterior_map, reference, torch.float32
    )


def _float_samples(samples: ArrayLike | Sequence[ArrayLike], name: str) -> tuple[np.ndarray, torch.Tensor | None]:
    array, reference = _stack(samples, name)
    return array.astype(np.float64), reference


def ensemble_mean(samples: ArrayLike | Sequence[ArrayLike]) -> ArrayLike:
    """Per-voxel mean of ``N`` samples: ``(N, *shape) -> (*shape)`` (float64 NumPy or float32 torch)."""
    array, reference = _float_samples(samples, "ensemble_mean")
    return _like(array.mean(axis=0), reference, torch.float32)


def ensemble_uncertainty(samples: ArrayLike | Sequence[ArrayLike]) -> ArrayLike:
    """Per-voxel standard deviation of ``N`` samples: ``(N, *shape) -> (*shape)``.

    The population standard deviation (``ddof=0``): exactly 0 where all samples agree, positive where they do
    not; for binary samples with foreground fraction ``p`` it is ``sqrt(p (1 - p))``, at most 0.5.
    """
    array, reference = _float_samples(samples, "ensemble_uncertainty")
    return _like(array.std(axis=0), reference, torch.float32)
