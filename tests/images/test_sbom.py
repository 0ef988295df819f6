"""Each built image has its SBOM (scripts/images.sh): CycloneDX that validates, names the image by
digest and its base by digest, and lists what the image really holds: every package of the lock it
installed, at the locked version, brainscan itself, and its Debian packages."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from scripts import sbom
from tests.fixtures.images import PIPELINE_IMAGE, SERVING_IMAGE, images_enabled

pytestmark = pytest.mark.skipif(images_enabled() is not None, reason=images_enabled() or "")

ROOT = Path(__file__).resolve().parents[2]
LOCKS = {PIPELINE_IMAGE: ROOT / "requirements.lock", SERVING_IMAGE: ROOT / "requirements-serving.lock"}


def _inspect(image: str) -> dict:
    return json.loads(subprocess.run(["buildah", "inspect", "--type", "image", image],
                                     check=True, capture_output=True, text=True, timeout=60).stdout)


def _normal(name: str) -> str:  # PEP 503: the lock and the installed metadata spell names differently
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("image", [PIPELINE_IMAGE, SERVING_IMAGE])
def test_image_sbom_lists_what_the_image_holds(image):
    path = Path(os.environ.get("BRAINSCAN_SBOM_DIR", ROOT / "build" / "sbom")) / f"{Path(image.rsplit(':', 1)[0]).name}.cdx.json"
    bom = json.loads(path.read_text())
    sbom.check(bom)
    main = bom["metadata"]["component"]
    inspected = _inspect(image)
    assert main["type"] == "container" and main["version"] == inspected["FromImageDigest"]
    labels = inspected["OCIv1"]["config"]["Labels"]
    base_digest = labels["org.opencontainers.image.base.digest"]
    assert base_digest.startswith("sha256:")
    assert {p["name"]: p["value"] for p in main["properties"]}["org.opencontainers.image.base.digest"] == base_digest

    listed = {(_normal(c["name"]), c.get("version")) for c in bom["components"] if not c.get("purl", "").startswith("pkg:deb/")}
    locked = {(_normal(name), version.split()[0]) for name, version in
              re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", LOCKS[image].read_text(), re.M)}
    assert locked - listed == set(), "packages of the lock missing from the image's SBOM"
    assert "brainscan" in {name for name, _ in listed}
    debian = {c["name"] for c in bom["components"] if c.get("purl", "").startswith("pkg:deb/debian/")}
    assert {"libc6", "base-files"} <= debian
