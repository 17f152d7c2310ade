"""Which cases an inference run reads, and how a bad one is skipped without stopping the others.

A bundle's inference reads the ``testing`` list of a datalist (or another list, ``--inference_list``). A case can
be bad in two ways: a damaged file that the integrity check sees before the run (truncated, not NIfTI, NaNs, ...),
or a problem that only a transform finds (a chest CT whose lungs cannot be found, a CT too small to be one). Either
way the case is skipped with one WARNING line naming it, its file and the problem, the other cases are written, and
once every case has run the evaluator ends with a :class:`~common.errors.DataError` listing the skipped cases, so
the process exits with status 2 (see :mod:`common.cli`) although the good cases' outputs are there.

The pieces, wired in each ``configs/inference.json``::

    "datalist": "$inference_items(@data_list_file_path, @inference_list, @dataset_dir)",
    "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "$SkipOnDataError(@preprocessing)"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, ...},
    "cases": {"_target_": "common.data.inference.SkippedCases", "loader": "@dataloader", "output_dir": "@output_dir"},

(the transform an expression, not a ``_target_`` item, for ``ConfigWorkflow.check_properties``, which wants
``dataset#transform`` to refer to ``preprocessing``), with ``"val_data_loader": "@cases"`` in the evaluator, ``"@cases"`` in its handlers and
``"run": ["$@evaluator.run()", "$@cases.raise_if_skipped()"]``. A skipped case travels as a
*marker* (the item with :data:`SKIPPED_KEY` holding the reason) through the dataset and the ``DataLoader``, worker
processes included, and :class:`SkippedCases` takes it out in the main process before the evaluator sees it.

Why not a filtering collate function: with one case per batch, a dropped case leaves an empty batch that the engine
cannot run; why not skip inside the engine: ignite has no way to skip an iteration once its batch is fetched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

from ignite.engine import Engine, Events
from monai.transforms import Transform

from common.cli import data_error_message
from common.data.decathlon import datalist_info, load_datalist, without_labels
from common.data.integrity import screen_items
from common.data.layouts import path_keys
from common.errors import DataError

__all__ = ["SKIPPED_KEY", "SkipOnDataError", "SkippedCases", "inference_items"]

logger = logging.getLogger(__name__)

#: key of a skipped case's reason, ``"<file>: <problem>"``, in its data dictionary
SKIPPED_KEY = "skipped"


def _case_lists(content: Mapping[str, Any]) -> dict[str, list]:
    """The datalist's non-empty lists of cases (``training``, ``validation``, ...), not its lists of names."""
    return {k: v for k, v in content.items() if isinstance(v, list) and v and isinstance(v[0], Mapping)}


def _example_item(content: Mapping[str, Any]) -> str:
    """``{'case': ..., <path keys>: ...}`` shaped like the items of the datalist's other lists, for a message."""
    first = next((items[0] for items in _case_lists(content).values()), {})
    parts = ["'case': 'my_case'"]
    for key in path_keys():
        value = first.get(key)
        if key == "label" or value is None:
            continue
        if isinstance(value, list):
            parts.append(f"'{key}': [" + ", ".join(f"'/path/{key}_{i}.nii.gz'" for i in range(len(value))) + "]")
        else:
            parts.append(f"'{key}': '/path/{key}.nii.gz'")
    if len(parts) == 1:
        parts.append("'image': '/path/image.nii.gz'")
    return "{" + ", ".join(parts) + "}"


def _empty_list_problem(data_list_file_path: str, list_key: str) -> str:
    with open(data_list_file_path) as f:
        content = json.load(f)  # readable: load_datalist has just read it
    others = [k for k in _case_lists(content) if k != list_key]
    another = f" (it has {', '.join(f'{k!r}' for k in others)})" if others else ""
    return (
        f"the datalist's {list_key!r} list is empty: there is no case to run inference on. Run it on another list "
        f"of this datalist{another} with --inference_list <name>, or on files of your own with "
        f'--datalist "[{_example_item(content)}]" (absolute paths, one dictionary per case)'
    )


def inference_items(data_list_file_path: str, list_key: str = "testing", dataset_dir: str = "") -> list[dict]:
    """The cases of ``list_key`` for inference, in datalist order: paths joined onto ``dataset_dir``, labels dropped
    (inference never reads them), and each case that fails the integrity check marked as skipped.

    A bad case gets one WARNING line ``"skipping case <case>: <file>: <problem>"`` (logger
    ``"common.data.integrity"``) and is returned with :data:`SKIPPED_KEY` holding ``"<file>: <problem>"``, so that
    :class:`SkippedCases` leaves it out and lists it at the end.

    Raises:
        DataError: the datalist is unreadable or has no ``list_key`` list; the list is empty (the message says how to
            run on another list, ``--inference_list``, or on files of one's own, ``--datalist``); no case passes the
            check.
    """
    items = without_labels(load_datalist(data_list_file_path, list_key, dataset_dir))
    if not items:
        raise DataError(data_list_file_path, _empty_list_problem(data_list_file_path, list_key))
    skipped: list[tuple[dict, str]] = []
    screen_items(items, datalist_info(data_list_file_path)["layout"], skipped=skipped)
    reasons = {id(item): reason for item, reason in skipped}
    return [{**item, SKIPPED_KEY: reasons[id(item)]} if id(item) in reasons else item for item in items]


class SkipOnDataError(Transform):
    """Apply ``transform`` (a case's preprocessing); a data error raised inside it skips the case instead of stopping
    the run.

    A :class:`~common.errors.DataError` found anywhere in the exception's chain (MONAI wraps a transform's error in
    ``RuntimeError("applying transform ...")``) gives one WARNING line ``"skipping case <case>: <file>: <problem>"``
    and returns the input item with :data:`SKIPPED_KEY` holding ``"<file>: <problem>"``; any other exception is a bug
    and propagates. An item already marked (by :func:`inference_items`) is returned as it is, no file read.

    Args:
        transform: the preprocessing, e.g. the inference config's ``preprocessing`` ``Compose``.
        case_key: key of the case id, for the message. Default ``"case"``.
    """

    def __init__(self, transform: Callable[[Any], Any], case_key: str = "case") -> None:
        self.transform = transform
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        if SKIPPED_KEY in data:
            return dict(data)
        try:
            return self.transform(data)
        except Exception as err:
            reason = data_error_message(err)
            if reason is None:
                raise
            logger.warning("skipping case %s: %s", data.get(self.case_key), reason)
            return {**data, SKIPPED_KEY: reason}


class SkippedCases:
    """The batches of ``loader`` without the skipped cases, and the list of those skipped.

    Iterating it iterates ``loader`` and leaves out every case marked with :data:`SKIPPED_KEY` (by
    :func:`inference_items` or :class:`SkipOnDataError`), recording its id and reason; it has no length, so the
    engine takes the number of iterations from the cases that remain. Attached to the evaluator (list it in its
    handlers), it logs one WARNING summary at the end of the run (``COMPLETED``); :meth:`raise_if_skipped`, the
    config's last ``run`` step, then ends the process with ``DataError("<output_dir>: 2 of 7 cases skipped, the
    other 5 written:\\n<case>: <file>: <problem>\\n...")``, which the bundles' data-error hook turns into exit
    status 2.

    Args:
        loader: a ``DataLoader`` with ``batch_size`` 1 (a skipped case cannot share a batch with a good one).
        case_key: key of the case id. Default ``"case"``.
        output_dir: the run's output folder, named by the final error. Default None (``"inference"``).

    Raises:
        ValueError: ``loader`` batches more than one case.
    """

    def __init__(self, loader: Iterable, case_key: str = "case", output_dir: str | None = None) -> None:
        batch_size = getattr(loader, "batch_size", 1)
        if batch_size != 1:
            raise ValueError(f"SkippedCases needs a loader with batch_size 1 (one case per batch), got {batch_size}")
        self.loader = loader
        self.case_key = case_key
        self.output_dir = output_dir
        self.skipped: list[tuple[str, str]] = []
        self.seen = 0

    def __iter__(self) -> Iterator[Any]:
        self.skipped, self.seen = [], 0
        for batch in self.loader:
            self.seen += 1
            if isinstance(batch, Mapping) and SKIPPED_KEY in batch:
                self.skipped.append((_first(batch.get(self.case_key)), _first(batch[SKIPPED_KEY])))
                continue
            yield batch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.report)

    def summary(self) -> str | None:
        """``"2 of 7 cases skipped, the other 5 written:\n<case>: <reason>\n..."``, or None when none was skipped."""
        if not self.skipped:
            return None
        lines = "\n".join(f"{case}: {reason}" for case, reason in self.skipped)
        return f"{len(self.skipped)} of {self.seen} cases skipped, the other {self.seen - len(self.skipped)} written:\n{lines}"

    def report(self, engine: Engine) -> None:
        """At the end of the run: one WARNING with the summary, if any case was skipped."""
        summary = self.summary()
        if summary is not None:
            logger.warning("inference: %s", summary)

    def raise_if_skipped(self) -> None:
        """Raise the summary as a DataError, if any case was skipped (after the run: the config's last ``run`` step).

        Raised outside the engine, so that it is printed once, by the data-error hook, not also by ignite and
        MONAI's ``StatsHandler`` as an engine failure.
        """
        summary = self.summary()
        if summary is not None:
            raise DataError(self.output_dir or "inference", summary)


def _first(value: Any) -> str:
    """The single entry of a collated batch of one (``["case_1"]`` -> ``"case_1"``)."""
    return str(value[0]) if isinstance(value, (list, tuple)) and len(value) == 1 else str(value)
