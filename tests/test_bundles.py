"""The harness on every bundle: each folder under ``bundles/`` (and the example bundle) passes every check, and its
training learns: the loss falls, and the trained model beats an untrained one on the bundle's metric."""

import glob
import math
import os

import pytest

from common.bundle.checks import check_bundle
from common.bundle.pipeline import load_pipeline

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = sorted(p for p in glob.glob(os.path.join(REPO_ROOT, "bundles", "*")) if os.path.isdir(p))
BUNDLES.append(os.path.join(REPO_ROOT, "tests", "example_bundle"))


@pytest.mark.slow
@pytest.mark.parametrize("bundle_dir", BUNDLES, ids=os.path.basename)
def test_bundle_passes_harness(bundle_dir, tmp_path):
    result = check_bundle(bundle_dir, str(tmp_path))
    assert [s.name for s in result.pipeline.stages] == [s["name"] for s in load_pipeline(bundle_dir)["stages"]]
    assert result.pipeline.metric_value is not None and math.isfinite(result.pipeline.metric_value)
    losses = result.learning.epoch_losses
    assert len(losses) >= 2 and losses[-1] < losses[0]
    if load_pipeline(bundle_dir).get("learning", {}).get("compare_untrained", True):
        assert result.learning.trained > result.learning.untrained
