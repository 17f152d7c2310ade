"""Packaged bundles: Model Zoo layout, vendored code without `common`, lazy config imports, metadata that names every
package the packaged code imports, large files, reproducible zips, safe unpacking and the command line."""

import ast
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version as installed_version

import pytest
import torch
import yaml

from common.bundle import package
from common.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "bundles", "*")) if os.path.isdir(p))
EXAMPLE = os.path.join(REPO, "tests", "example_bundle")


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """Every bundle packaged and unpacked once: ``{name: (zip_path, bundle_folder)}``."""
    out = tmp_path_factory.mktemp("zips")
    unpacked = tmp_path_factory.mktemp("unpacked")
    result = {}
    for name in BUNDLES:
        zip_path = package.package_bundle(name, str(out))
        result[name] = (zip_path, package.unpack_bundle(zip_path, str(unpacked)))
    return result


def _configs(bundle_dir):
    out = {}
    for path in sorted(glob.glob(os.path.join(bundle_dir, "configs", "*.json"))):
        with open(path) as f:
            out[os.path.basename(path)] = json.load(f)
    return out


def _strings(content):
    if isinstance(content, str):
        yield content
    elif isinstance(content, dict):
        for value in content.values():
            yield from _strings(value)
    elif isinstance(content, list):
        for value in content:
            yield from _strings(value)


def _python_files(bundle_dir):
    return sorted(glob.glob(os.path.join(bundle_dir, "scripts", "**", "*.py"), recursive=True))


@pytest.mark.parametrize("name", BUNDLES)
def test_zip_has_the_model_zoo_layout(packaged, name):
    zip_path, bundle_dir = packaged[name]
    with open(os.path.join(REPO, "bundles", name, "configs", "metadata.json")) as f:
        version = json.load(f)["version"]
    assert os.path.basename(zip_path) == f"{name}_v{version}.zip"
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    assert {n.split("/")[0] for n in names} == {name}
    for rel in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE", "large_files.yml"):
        assert f"{name}/{rel}" in names, rel
    assert f"{name}/scripts/__init__.py" in names
    # no weights in the repository: models/ holds a note, so the folder survives unzipping (MONAI skips empty ones)
    assert os.path.isfile(os.path.join(bundle_dir, "models", "README.md"))
    with open(os.path.join(bundle_dir, "large_files.yml")) as f:
        assert yaml.safe_load(f) == {"large_files": []}
    # the bundle's own files are shipped unchanged (configs aside, they are rewritten)
    for rel in ("LICENSE", "docs/README.md"):
        with open(os.path.join(REPO, "bundles", name, rel), "rb") as a, open(os.path.join(bundle_dir, rel), "rb") as b:
            assert a.read() == b.read(), rel


@pytest.mark.parametrize("name", BUNDLES)
def test_packaged_bundle_does_not_reference_common(packaged, name):
    _, bundle_dir = packaged[name]
    dotted = re.compile(r"(?<![\w.])common\.[A-Za-z_]")
    for cfg, content in _configs(bundle_dir).items():
        leftovers = [s for s in _strings(content) if dotted.search(s)]
        assert not leftovers, f"{cfg} still names common: {leftovers[:3]}"
    files = _python_files(bundle_dir)
    assert len(files) > 3
    for path in files:
        with open(path) as f:
            source = f.read()
        tree = ast.parse(source)  # also: every vendored file still compiles
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "common" for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "common", path
        assert not dotted.search(source), f"{path} still names common"


@pytest.mark.parametrize("name", BUNDLES)
def test_configs_import_nothing_vendored_at_parse_time(packaged, name):
    """MONAI evaluates `imports` before the bundle root is on sys.path: vendored code must be reached lazily."""
    _, bundle_dir = packaged[name]
    vendored = set()
    for cfg, content in _configs(bundle_dir).items():
        for statement in content.get("imports", []):
            assert "scripts" not in statement, f"{cfg}: {statement}"
        init = content.get("initialize")
        if init is not None:
            assert init[0] == package.SYS_PATH_EXPRESSION, cfg
            assert {"$import os", "$import sys"} <= set(content["imports"]), cfg
        for text in _strings(content):
            vendored.update(re.findall(r"(?<![\w.])scripts(?:\.\w+)+", text))
    assert vendored, "the configs name no vendored code"
    for dotted in vendored:  # every name resolves to a vendored module (the closure is complete)
        parts = dotted.split(".")
        assert any(
            os.path.isfile(os.path.join(bundle_dir, *parts[:end]) + ".py")
            or os.path.isfile(os.path.join(bundle_dir, *parts[:end], "__init__.py"))
            for end in range(len(parts), 1, -1)
        ), dotted


def test_only_the_import_closure_is_vendored(packaged):
    """Each bundle carries the code of its own network, not the others', and never the packaging code itself."""
    networks = {
        "adni_mri_pet_dc2fusion": "dc2fusion.py",
        "brats_mri_hlwa_segmentation": "hlwa_unet.py",
        "brats_mri_medsegdiff_segmentation": "medsegdiff.py",
        "covid_ct_gan_transunet_segmentation": "transunet.py",
    }
    for name, (_, bundle_dir) in packaged.items():
        present = {os.path.basename(p) for p in glob.glob(os.path.join(bundle_dir, "scripts", "networks", "*.py"))}
        mine = networks.get(name)
        assert mine is None or mine in present, name
        assert not (set(networks.values()) - {mine}) & present, f"{name} vendors another bundle's network"
        assert not os.path.exists(os.path.join(bundle_dir, "scripts", "bundle", "package.py")), name
        assert not os.path.exists(os.path.join(bundle_dir, "scripts", "benchmarks")), name
        # the closure is complete: every `scripts.` import of the vendored code resolves inside the bundle
        for path in _python_files(bundle_dir):
            with open(path) as f:
                for node in ast.walk(ast.parse(f.read())):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scripts"):
                        base = os.path.join(bundle_dir, *node.module.split("."))
                        assert os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py")), (
                            f"{path} imports {node.module}, which is not vendored"
                        )


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_names_every_package_the_packaged_code_imports(packaged, name):
    """Derived from the vendored code's imports (and the configs' `$import`s), so the metadata cannot drift."""
    _, bundle_dir = packaged[name]
    found = package.code_requirements(os.path.join(bundle_dir, "scripts"))
    for content in _configs(bundle_dir).values():
        for statement in content.get("imports", []):
            module = re.match(r"\$\s*(?:from|import)\s+(\w+)", statement).group(1)
            if module not in sys.stdlib_module_names:
                found["required"].setdefault(module, []).append("configs")
    imported = set(package.distribution_names([*found["required"], *found["optional"]]).values())
    assert {"monai", "torch", "numpy", "nibabel"} <= imported  # the scanner sees the obvious ones
    with open(os.path.join(REPO, "bundles", name, "configs", "metadata.json")) as f:
        meta = json.load(f)
    # MONAI 1.6 reads `optional_packages_version` as a deprecated name and renames it over the required ones
    assert "optional_packages_version" not in meta
    pins = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    pins.update({package.normalise_distribution(k): v for k, v in meta["required_packages_version"].items()})
    missing = sorted(imported - set(pins))
    assert not missing, f"{name}: metadata.json required_packages_version lacks {missing} (imported by {found})"
    # the pins are the versions this repository is tested with (the clean-environment test installs them)
    for dist, pinned in pins.items():
        assert installed_version(dist).split("+")[0] == pinned, f"{name}: {dist} pinned {pinned}"


def test_rewrite_references():
    text = (
        "from common.data.labels import x\nfrom common import errors\nimport common.io\nimport common\n"
        "y = uncommon.data + obj.common.data  # common.networks.z\n'common.metrics.fusion'\n"
    )
    assert package.rewrite_references(text) == (
        "from scripts.data.labels import x\nfrom scripts import errors\nimport scripts.io\nimport scripts\n"
        "y = uncommon.data + obj.common.data  # scripts.networks.z\n'scripts.metrics.fusion'\n"
    )


def test_package_config_makes_vendored_imports_lazy():
    config = {
        "imports": ["$import os", "$from common.data.decathlon import load_datalist", "$from common.x import f as g"],
        "datalist": "$load_datalist(@data_list_file_path, @train#key)",
        "other": "$g(1, g=obj.g, h=load_datalist)",
        "net": {"_target_": "common.networks.hlwa_unet.HLWAUNet", "features": "@features"},
        "initialize": "$g()",
    }
    out = package.package_config(config, names={"load_datalist"})
    assert out["imports"] == ["$import os", "$import sys"]
    assert out["load_datalist"] == {"_target_": "scripts.data.decathlon.load_datalist", "_mode_": "callable"}
    assert out["g"] == {"_target_": "scripts.x.f", "_mode_": "callable"}
    assert list(out)[:3] == ["imports", "g", "load_datalist"]  # the items follow the imports they replace
    assert out["datalist"] == "$@load_datalist(@data_list_file_path, @train#key)"
    # attributes and keyword names of the same name are not references; a name passed as an argument is
    assert out["other"] == "$@g(1, g=obj.g, h=@load_datalist)"
    assert out["net"] == {"_target_": "scripts.networks.hlwa_unet.HLWAUNet", "features": "@features"}
    assert out["initialize"] == [package.SYS_PATH_EXPRESSION, "$@g()"]
    assert config["imports"][1] == "$from common.data.decathlon import load_datalist"  # input untouched
    # a name the config imports from elsewhere stays that import, even if another config imports it from common
    other = {"imports": ["$from monai.data import load_decathlon_datalist as load_datalist"], "d": "$load_datalist(1)"}
    assert package.package_config(other, names={"load_datalist"}) == other
    # an expression that rebinds an imported name is refused, not rewritten by Python's scoping rules
    for logic in ("$(lambda g: g)(2)", "$[load_datalist for load_datalist in [1]]"):
        with pytest.raises(DataError, match=r"x.json: expression .* binds \['(g|load_datalist)'\], which the configs"):
            package.package_config({**config, "other": logic}, "x.json", names={"load_datalist"})
    with pytest.raises(DataError, match="also ids of the config"):
        package.package_config({"imports": ["$from common.a import f"], "f": 1}, "x.json")
    with pytest.raises(DataError, match="x.json: '\\$import common.a': write 'from common.<module>"):
        package.package_config({"imports": ["$import common.a"]}, "x.json")


def test_zip_is_reproducible(tmp_path):
    first = package.package_bundle("brats_mri_hlwa_segmentation", str(tmp_path / "a"))
    second = package.package_bundle("brats_mri_hlwa_segmentation", str(tmp_path / "b"))
    with open(first, "rb") as a, open(second, "rb") as b:
        assert hashlib.sha256(a.read()).hexdigest() == hashlib.sha256(b.read()).hexdigest()


def test_large_model_files_go_to_large_files_yml(tmp_path):
    root = tmp_path / "bundles"
    shutil.copytree(EXAMPLE, root / "example_bundle")
    weights = root / "example_bundle" / "models" / "model.pt"
    torch.save({"w": torch.zeros(64 * 1024)}, weights)  # about 0.25 MB
    small = root / "example_bundle" / "models" / "labels.json"
    small.write_text("{}")
    (root / "example_bundle" / "configs" / "datalist.json").write_text("{}")  # the packager's own data: not shipped
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"model.pt: is 0.\d MB, above the 0.1 MB .* list it .*/large_files.yml"):
        package.package_bundle("example_bundle", str(out), bundles_root=str(root), max_file_mb=0.1)
    assert not os.path.exists(out) or not os.listdir(out)  # nothing half-written

    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    entry = {"path": "models/model.pt", "url": "https://example.org/model.pt", "hash_val": sha, "hash_type": "sha256"}
    (root / "example_bundle" / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    zip_path = package.package_bundle("example_bundle", str(out), bundles_root=str(root), max_file_mb=0.1)
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        listed = yaml.safe_load(archive.read("example_bundle/large_files.yml"))
    assert "example_bundle/models/model.pt" not in names
    assert "example_bundle/models/labels.json" in names and "example_bundle/models/README.md" not in names
    assert "example_bundle/configs/datalist.json" not in names
    assert listed == {"large_files": [entry]}

    (root / "example_bundle" / "large_files.yml").write_text(
        yaml.safe_dump({"large_files": [{**entry, "hash_val": "0"}]})
    )
    with pytest.raises(DataError, match="model.pt: its sha256 differs from hash_val in large_files.yml"):
        package.package_bundle("example_bundle", str(out), bundles_root=str(root))
    (root / "example_bundle" / "large_files.yml").write_text(yaml.safe_dump({"large_files": [{"path": "m.pt"}]}))
    with pytest.raises(DataError, match=r"entry 0 lacks \['url', 'hash_val', 'hash_type'\]"):
        package.package_bundle("example_bundle", str(out), bundles_root=str(root))


def test_version_must_be_in_the_changelog(tmp_path):
    root = tmp_path / "bundles"
    shutil.copytree(EXAMPLE, root / "example_bundle")
    meta_path = root / "example_bundle" / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = "9.9.9"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="metadata.json: version '9.9.9' is not listed in 'changelog'"):
        package.package_bundle("example_bundle", str(tmp_path / "out"), bundles_root=str(root))


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name in members:
            archive.writestr(name, "{}")
    return str(path)


def test_unpack_rejects_what_is_not_one_safe_bundle(tmp_path):
    good = _zip(tmp_path / "good.zip", ["b/configs/metadata.json", "b/LICENSE"])
    assert package.unpack_bundle(good, str(tmp_path / "dest")) == str(tmp_path / "dest" / "b")
    assert os.path.isfile(tmp_path / "dest" / "b" / "LICENSE")
    with pytest.raises(DataError, match="already exists and is not empty"):
        package.unpack_bundle(good, str(tmp_path / "dest"))
    cases = {
        "slip.zip": (["b/configs/metadata.json", "b/../../evil.txt"], "would be written outside the bundle folder"),
        "two.zip": (["a/configs/metadata.json", "b/configs/metadata.json"], "exactly one top folder"),
        "nometa.zip": (["b/configs/inference.json"], "has no b/configs/metadata.json"),
    }
    for filename, (members, message) in cases.items():
        with pytest.raises(DataError, match=message):
            package.unpack_bundle(_zip(tmp_path / filename, members), str(tmp_path / "other"))
    (tmp_path / "not.zip").write_text("plain text")
    with pytest.raises(DataError, match="not.zip: is not a zip file"):
        package.unpack_bundle(str(tmp_path / "not.zip"), str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other" / "evil.txt") and not os.path.exists(tmp_path / "evil.txt")


def test_command_line(tmp_path):
    tool = os.path.join(REPO, "tools", "package_bundle.py")
    name = "covid_ct_gan_transunet_segmentation"
    done = subprocess.run(
        [sys.executable, tool, "--name", name, "--output_dir", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    version = package.bundle_version(os.path.join(REPO, "bundles", name))
    assert done.stdout.strip() == str(tmp_path / f"{name}_v{version}.zip") and zipfile.is_zipfile(done.stdout.strip())
    bad = subprocess.run(
        [sys.executable, tool, "--name", "no_such_bundle", "--output_dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {os.path.join(REPO, 'bundles', 'no_such_bundle')}: is not a bundle (no configs/ folder)"
    ]
    assert not os.path.exists(tmp_path / "x")
