"""Inference cases: an empty list says so, a bad case is skipped with one line and listed at the end, the others run."""

from __future__ import annotations

import logging

import pytest
from ignite.engine import Engine
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Lambdad

from common.data.datalist import build_datalist, save_datalist
from common.data.inference import SKIPPED_KEY, SkipOnDataError, SkippedCases, inference_items
from common.data.synthetic.defects import plant_defect
from common.data.synthetic.write import write_synthetic_dataset
from common.errors import DataError


def _fail_on(bad: dict[str, Exception]):
    """A preprocessing that raises ``bad[case]`` for those cases (MONAI's ``Compose`` wraps it in a RuntimeError)."""

    def step(case):
        if case in bad:
            raise bad[case]
        return case

    return Compose([Lambdad("case", step)])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_data_error_in_a_transform_skips_the_case_and_the_others_run(num_workers, caplog):
    items = [{"case": c} for c in ("a", "b", "c", "d")]
    transform = SkipOnDataError(_fail_on({"b": DataError("/data/b.nii.gz", "no lung found")}))
    cases = SkippedCases(DataLoader(Dataset(items, transform), batch_size=1, num_workers=num_workers))
    with caplog.at_level(logging.WARNING, logger="common.data.inference"):
        ran = [batch["case"][0] for batch in cases]
    assert ran == ["a", "c", "d"]
    assert cases.skipped == [("b", "/data/b.nii.gz: no lung found")] and cases.seen == 4
    if num_workers == 0:  # a worker process logs to its own handlers
        assert [r.getMessage() for r in caplog.records] == ["skipping case b: /data/b.nii.gz: no lung found"]


def test_an_error_that_is_not_about_the_data_still_stops_the_run():
    transform = SkipOnDataError(_fail_on({"a": ZeroDivisionError("a bug")}))
    with pytest.raises(RuntimeError) as err:
        transform({"case": "a"})
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_the_skipped_cases_are_summarised_at_the_end_and_raised_after_the_run(caplog):
    items = [{"case": "a"}, {"case": "b", SKIPPED_KEY: "/data/b.nii.gz: truncated"}, {"case": "c"}]
    bad = {"c": DataError("/data/c.nii.gz", "CT volume too small")}
    cases = SkippedCases(DataLoader(Dataset(items, SkipOnDataError(_fail_on(bad))), batch_size=1), output_dir="/out")
    processed = []
    engine = Engine(lambda e, batch: processed.append(batch["case"][0]))
    cases.attach(engine)
    with caplog.at_level(logging.WARNING, logger="common.data.inference"):
        engine.run(cases, max_epochs=1)
    summary = "2 of 3 cases skipped, the other 1 written:\nb: /data/b.nii.gz: truncated\nc: /data/c.nii.gz: CT volume too small"
    assert processed == ["a"] and caplog.records[-1].getMessage() == f"inference: {summary}"
    with pytest.raises(DataError) as err:
        cases.raise_if_skipped()
    assert str(err.value) == f"/out: {summary}"
    SkippedCases(DataLoader(Dataset([{"case": "a"}]), batch_size=1)).raise_if_skipped()  # none skipped: no error


def test_skipped_cases_needs_one_case_per_batch():
    with pytest.raises(ValueError, match="batch_size 1"):
        SkippedCases(DataLoader(Dataset([{"case": "a"}]), batch_size=2))


@pytest.fixture
def brats(tmp_path):
    data = str(tmp_path / "brats")
    write_synthetic_dataset("brats2021", data, num_cases=5, shape=(16, 16, 16), seed=0, progress=False)
    datalist = build_datalist("brats2021", data, seed=0, val_fraction=0.2, test_fraction=0.4, progress=False)
    return data, datalist, str(tmp_path / "datalist.json")


def test_inference_items_mark_the_cases_failing_the_integrity_check_in_datalist_order(brats, caplog):
    data, datalist, path = brats
    testing = datalist["testing"] + datalist["validation"]
    save_datalist({**datalist, "testing": testing}, path)
    bad = testing[1]["case"]
    (damaged,) = plant_defect("brats2021", data, bad, "nan", seed=1)
    with caplog.at_level(logging.WARNING):
        items = inference_items(path, "testing", data)
    assert [it["case"] for it in items] == [it["case"] for it in testing]
    assert all("label" not in it and it["image"][0].startswith(data) for it in items)
    assert [SKIPPED_KEY in it for it in items] == [it["case"] == bad for it in testing]
    assert items[1][SKIPPED_KEY].startswith(f"{damaged}: contains ") and "NaN" in items[1][SKIPPED_KEY]
    assert [r.getMessage() for r in caplog.records] == [f"skipping case {bad}: {items[1][SKIPPED_KEY]}"]


def test_an_empty_list_says_so_and_how_to_run_on_another_list_or_on_files(brats):
    data, datalist, path = brats
    save_datalist({**datalist, "testing": []}, path)
    with pytest.raises(DataError) as err:
        inference_items(path, "testing", data)
    message = str(err.value)
    assert message.startswith(f"{path}: the datalist's 'testing' list is empty: there is no case to run inference on")
    assert "(it has 'training', 'validation') with --inference_list <name>" in message
    example = "{'case': 'my_case', 'image': ['/path/image_0.nii.gz', '/path/image_1.nii.gz', '/path/image_2.nii.gz'"
    assert f'--datalist "[{example}' in message and "failed" not in message and "\n" not in message
