"""Supply chain: every lock pins and hashes every package, the images install only hashed locks,
the GPU and MLServer locks agree with the main lock, and the SBOM merge (scripts/sbom.py) gives
valid CycloneDX. The SBOM of each built image is checked in tests/images/test_sbom.py."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from brainscan import pyfunc
from scripts import sbom

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra" / "docker"
LOCKS = [ROOT / "requirements.lock", ROOT / "requirements-serving.lock", DOCKER / "pipeline-gpu.lock",
         DOCKER / "serving-gpu.lock", DOCKER / "mlserver.lock"]
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?)==([^\s;\\]+)", re.M)


def pins(path: Path) -> dict[str, str]:
    return {re.sub(r"\[.*\]", "", name).lower(): version for name, version in REQUIREMENT.findall(path.read_text())}


def requirement_blocks(path: Path) -> list[str]:
    """Each requirement with its continuation lines (the hashes)."""
    return re.split(r"\n(?=[A-Za-z0-9])", path.read_text().split("\n", 2)[-1])


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_locked_package_is_pinned_and_hashed(lock):
    blocks = [b for b in requirement_blocks(lock) if REQUIREMENT.match(b)]
    assert len(blocks) > 20
    unhashed = [b.split()[0] for b in blocks if "--hash=sha256:" not in b]
    assert not unhashed, f"no hash for {unhashed}: bash scripts/dev.sh lock"
    loose = [line for line in lock.read_text().splitlines()
             if re.match(r"^[A-Za-z0-9]", line) and not REQUIREMENT.match(line)]
    assert not loose, f"not pinned with ==: {loose}"


def test_gpu_locks_swap_only_tensorflow_and_keep_the_main_pins():
    main = pins(ROOT / "requirements.lock")
    for lock in (DOCKER / "pipeline-gpu.lock", DOCKER / "serving-gpu.lock"):
        gpu = pins(lock)
        assert gpu["tensorflow"] == main["tensorflow-cpu"] and "tensorflow-cpu" not in gpu
        assert any(name.startswith("nvidia-cudnn") for name in gpu)
        shared = {name for name in gpu if name in main}
        assert {name: gpu[name] for name in shared} == {name: main[name] for name in shared}, lock.name


def test_mlserver_lock_has_the_models_requirements_at_the_main_locks_versions():
    main, mlserver = pins(ROOT / "requirements.lock"), pins(DOCKER / "mlserver.lock")
    for name in pyfunc.REQUIREMENTS:
        if name in main:
            assert mlserver.get(name) == main[name], f"{name}: recompile with bash scripts/dev.sh lock"
    wanted = (ROOT / "brainscan" / "local" / "mlserver-requirements.txt").read_text()
    for name, version in REQUIREMENT.findall(wanted):
        assert mlserver[name] == version


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_images_install_only_hashed_locks(dockerfile):
    text = "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#"))
    installs = re.findall(r"pip install ([^\n\\]*)", text)
    assert installs
    for args in installs:
        # a hashed lock (the whole tree, so --no-deps, then `pip check`), or the project on top of it
        assert "--require-hashes --no-deps -r" in args or args.split() == ["--no-deps", "/tmp/src"], args
    assert text.count("--require-hashes") == text.count("pip check")
    copied = set(re.findall(r"^COPY (.*) \S+$", text, re.M))
    locks = {word for line in copied for word in line.split() if word.endswith(".lock")}
    assert locks and all((ROOT / lock).is_file() for lock in locks)


def test_images_script_pins_the_base_by_digest_and_writes_sboms():
    text = (ROOT / "scripts" / "images.sh").read_text()
    assert "org.opencontainers.image.base.digest=$BASE_DIGEST" in text
    assert re.search(r'^pin_base$', text, re.M) and re.search(r'^sbom "\$SERVING_TAG"$', text, re.M)
    assert "BRAINSCAN_REQUIRE_BASE_DIGEST" in text


PYTHON_BOM = {
    "bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1,
    "metadata": {"tools": {"components": [{"type": "application", "name": "cyclonedx-py", "version": "7.5.0"}]}},
    "components": [{"type": "library", "name": "numpy", "version": "2.4.6", "bom-ref": "numpy==2.4.6",
                    "purl": "pkg:pypi/numpy@2.4.6"}],
    "dependencies": [{"ref": "numpy==2.4.6"}],
}
DPKG = "libc6\t2.36-9+deb12u10\tamd64\npython3.11\t3.11.2-6+deb12u6\tamd64\n"


def test_sbom_merges_debian_packages_and_names_the_image():
    bom = sbom.image_bom(copy.deepcopy(PYTHON_BOM), DPKG, "localhost/brainscan-serving:dev", "sha256:" + "a" * 64,
                         "localhost/brainscan-base", "sha256:" + "b" * 64)
    sbom.check(bom)
    purls = {c["purl"] for c in bom["components"]}
    assert "pkg:pypi/numpy@2.4.6" in purls
    assert "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=amd64&distro=debian-12" in purls
    image = bom["metadata"]["component"]
    assert image["type"] == "container" and image["version"] == "sha256:" + "a" * 64
    top = next(d for d in bom["dependencies"] if d["ref"] == image["bom-ref"])
    assert len(top["dependsOn"]) == 3


def test_sbom_check_refuses_an_invalid_bom():
    bom = sbom.image_bom(copy.deepcopy(PYTHON_BOM), DPKG, "img:dev", "sha256:" + "a" * 64, "base", "sha256:" + "b" * 64)
    bom["components"][0]["type"] = "not-a-type"
    with pytest.raises(ValueError, match="not a valid CycloneDX"):
        sbom.check(bom)
