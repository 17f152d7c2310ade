"""What a dataset layout is: :class:`DatasetLayout`, the registry of layouts, and what a folder scan returns.

A layout is one public dataset's convention, written down once (as nnU-Net writes a dataset down in its
``dataset.json`` and file naming): how to find its cases in a folder (the scanner), which datalist keys hold
paths, where a case may go in a split, its label convention and channel order, the expected image dimensions and
intensity rule, what groups cases for splitting, and its synthetic writer. The integrity check
(:mod:`common.data.integrity`), the datalist builder (:mod:`common.data.datalist`), the datalist loader
(:mod:`common.data.decathlon`), the synthetic writer (:mod:`common.data.synthetic.write`) and the defect planter
(:mod:`common.data.synthetic.defects`) take a layout name and read everything else from its definition.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.data.labels import get_label_convention

__all__ = [
    "ANY",
    "DATASET",
    "EVALUATION",
    "HOUNSFIELD",
    "NII",
    "NON_NEGATIVE",
    "TEST",
    "DatasetLayout",
    "LayoutScan",
    "Problem",
    "find_layout",
    "get_layout",
    "layout_names",
    "path_keys",
    "posix_path",
    "register_layout",
    "stray_problems",
    "subfolders",
    "unregister_layout",
    "visible_entries",
]

NII = ".nii.gz"

#: The ``case`` of a problem that belongs to no single case (no case found, ``dataset.json``, an orphan mask).
DATASET = "(dataset)"

#: Split roles of a scanned item: it may go to any list / to validation or testing only / to testing only.
ANY, EVALUATION, TEST = "any", "eval", "test"
_ROLES = (ANY, EVALUATION, TEST)

#: Intensity rules: a CT in Hounsfield units (it holds air, below -500 HU) / MRI or PET, non-negative.
HOUNSFIELD, NON_NEGATIVE = "hounsfield", "non_negative"
_VALUE_RULES = (HOUNSFIELD, NON_NEGATIVE)


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset: the case, the file (or folder) and what is wrong.

    ``str(problem)`` is ``"<case>: <path>: <problem>"``, one line. ``case`` is the case id (``BraTS2021_00003``,
    ``BRATS_002``, ``study_0255``, ``<subject>/<image_id>`` for ADNI pairs) or :data:`DATASET`.
    """

    case: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.case}: {self.path}: {self.problem}"


@dataclass
class LayoutScan:
    """What a layout's scanner found in a folder.

    Attributes:
        items: one datalist item per complete case, paths relative to the folder (POSIX separators). Keys:
            BraTS ``case, image (t1c, t1, t2, flair), [label]``; MSD ``case, image, [label], channel_order``;
            MosMed ``case, image, category, [label]``; ADNI ``case (image id), subject, mri, pet``.
        problems: missing files, duplicates, orphan masks, an empty folder: the case cannot be used.
        stray: files or folders inside the layout's folders that belong to no case (harmless to the bundles,
            reported by ``verify_dataset``, ignored by ``build_datalist``).
    """

    items: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stray: list[Problem] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class DatasetLayout:
    """One public dataset layout: everything the data code needs to know about it, in one place.

    Args:
        name: the layout's name, as given to ``--layout`` and written to the datalist's ``"layout"``.
        scan: ``scan(data_dir) -> LayoutScan``: finds every case from the file names alone (no image is read);
            raises :class:`~common.errors.DataError` when the folder cannot be in the layout at all.
        image_keys: datalist keys of an item's image paths (ADNI: ``("mri", "pet")``); ``"label"`` holds labels.
        image_files: number of files in an item's ``image`` list when the modalities are separate files (BraTS:
            4), checked by the integrity check; ``None``: one file per image key.
        channel_order: channel names of a 4D image file (MSD: FLAIR, T1w, T1gd, T2w), written to the datalist
            and its items; the integrity check then expects 4D images with that many channels (else 3D).
        channel_reorder: index order bringing the image channels to ``modalities``
            (``common.data.labels.ReorderChannelsd``); ``None`` when they already are.
        modalities: the image channels as the bundles see them (brain: ``BRAIN_MODALITIES``), written to the
            datalist; ``None`` for single-image layouts.
        label_convention: a key of ``common.data.labels.LABEL_CONVENTIONS`` (written to the datalist); ``None``:
            labels are binary masks (0/1).
        has_labels: whether the layout has label files at all (ADNI pairs have none).
        value_rule: :data:`NON_NEGATIVE` (MRI, PET) or :data:`HOUNSFIELD` (CT) for the image intensities.
        group_key: item key that groups cases for splitting, so that no group is in two lists (ADNI:
            ``"subject"``).
        labelled_role, unlabelled_role: where an item with / without a ``label`` may go in a split (:data:`ANY`,
            :data:`EVALUATION`: validation or testing, :data:`TEST`: testing only).
        evaluation_label: when labelled items are evaluation data, the label path of a case relative to the
            folder, with ``{case}`` (MosMed: ``masks/{case}_mask.nii.gz``); ``validate_datalist_no_leak`` refuses
            a training case whose label exists on disk.
        image_defines_case: the case is its one image file (a MosMed study), so without it there is no case
            (the ``missing_modality`` defect does not exist).
        synthetic_writer: ``writer(output_dir, num_cases, shape, seed, progress, **synthetic_options,
            **generator_kwargs)`` writing phantoms in the layout and returning the case ids, or its dotted name (resolved when writing, so that the layout definitions, which the
            packaged bundles vendor with the integrity check, do not import the phantom generators); ``None``:
            no synthetic data.
        synthetic_options: further keyword arguments of ``synthetic_writer`` (the BraTS file naming).
        synthetic_shape: the writer's default grid (x, y, z).
        synthetic_truth: a per-case synthetic-only label written by the writer, relative path with ``{case}``;
            the defect planter moves it with its case.
    """

    name: str
    scan: Callable[[str], LayoutScan]
    image_keys: tuple[str, ...] = ("image",)
    image_files: int | None = None
    channel_order: tuple[str, ...] | None = None
    channel_reorder: tuple[int, ...] | None = None
    modalities: tuple[str, ...] | None = None
    label_convention: str | None = None
    has_labels: bool = True
    value_rule: str = NON_NEGATIVE
    group_key: str = "case"
    labelled_role: str = ANY
    unlabelled_role: str = TEST
    evaluation_label: str | None = None
    image_defines_case: bool = False
    synthetic_writer: Callable[..., list[str]] | str | None = None
    synthetic_options: Mapping[str, Any] = field(default_factory=dict)
    synthetic_shape: tuple[int, int, int] | None = None
    synthetic_truth: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a layout needs a name, got {self.name!r}")
        if self.label_convention is not None:
            get_label_convention(self.label_convention)  # raises, listing the known conventions
        if self.value_rule not in _VALUE_RULES:
            raise ValueError(f"{self.name}: value_rule must be one of {_VALUE_RULES}, got {self.value_rule!r}")
        for role in (self.labelled_role, self.unlabelled_role):
            if role not in _ROLES:
                raise ValueError(f"{self.name}: split roles must be one of {_ROLES}, got {role!r}")
        if self.synthetic_writer is not None and self.synthetic_shape is None:
            raise ValueError(f"{self.name}: a synthetic_writer needs a default synthetic_shape")

    @property
    def path_keys(self) -> tuple[str, ...]:
        """Datalist keys of an item that hold paths (joined onto the data folder when loading)."""
        return (*self.image_keys, "label") if self.has_labels else self.image_keys

    def split_role(self, item: Mapping[str, Any]) -> str:
        """Where a scanned item may go: :data:`ANY`, :data:`EVALUATION` or :data:`TEST`."""
        return self.labelled_role if "label" in item else self.unlabelled_role

    def datalist_header(self) -> dict[str, Any]:
        """Dataset-level datalist keys: ``label_convention``, ``modalities``, ``channel_order`` (those it has)."""
        header: dict[str, Any] = {}
        if self.label_convention is not None:
            header["label_convention"] = self.label_convention
        if self.modalities is not None:
            header["modalities"] = list(self.modalities)
        if self.channel_order is not None:
            header["channel_order"] = list(self.channel_order)
        return header


# ----------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, DatasetLayout] = {}


def register_layout(layout: DatasetLayout) -> DatasetLayout:
    """Make ``layout`` known by its name to every tool and function taking a layout name; return it.

    Raises:
        ValueError: a layout of that name is already registered.
    """
    if layout.name in _REGISTRY:
        raise ValueError(f"layout {layout.name!r} is already registered")
    _REGISTRY[layout.name] = layout
    return layout


def unregister_layout(name: str) -> None:
    """Forget the layout ``name`` (a test's or a plugin's); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def layout_names() -> tuple[str, ...]:
    """The registered layouts' names, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


def get_layout(layout: str | DatasetLayout) -> DatasetLayout:
    """The registered :class:`DatasetLayout` named ``layout`` (a layout object is returned as it is).

    Raises:
        ValueError: unknown layout, listing the known ones.
    """
    if isinstance(layout, DatasetLayout):
        return layout
    if not isinstance(layout, str) or layout not in _REGISTRY:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[layout]


def find_layout(name: Any) -> DatasetLayout | None:
    """The registered layout named ``name``, or ``None`` (for a datalist's ``"layout"``, which may be anything)."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def path_keys() -> tuple[str, ...]:
    """Every registered layout's path keys, each once (``image``, ``label``, ``mri``, ``pet``, ...)."""
    return tuple(dict.fromkeys(key for layout in _REGISTRY.values() for key in layout.path_keys))


# ----------------------------------------------------------------------------------------------- scan helpers


def posix_path(*parts: str) -> str:
    """A datalist path: ``parts`` joined with ``/`` (datalists use POSIX separators on every system)."""
    return "/".join(parts)


def visible_entries(folder: str) -> list[os.DirEntry]:
    """Entries of ``folder`` sorted by name, hidden ones (macOS ``._*`` files, ``.DS_Store``) left out."""
    return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)


def subfolders(folder: str) -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted."""
    return [e.name for e in visible_entries(folder) if e.is_dir()]


def stray_problems(case: str, folder: str, expected: Callable[[str], Any], what: str) -> list[Problem]:
    """A :class:`Problem` for each visible entry of ``folder`` whose name ``expected`` rejects (``what``: why)."""
    return [
        Problem(case, os.path.join(folder, e.name), f"unexpected {'folder' if e.is_dir() else 'file'} ({what})")
        for e in visible_entries(folder)
        if not expected(e.name)
    ]
