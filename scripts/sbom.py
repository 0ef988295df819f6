"""An image's SBOM, CycloneDX JSON: its Python packages and its Debian packages, named after the image.

`scripts/images.sh` runs cyclonedx-py inside each image it builds (so it reads the image's own
Python environment, not this machine's) and `dpkg-query` there, then this script merges both
into one BOM whose main component is the image (its tag, digest and base) and checks the
result against the CycloneDX schema with cyclonedx-python-lib's validator:

    python -m scripts.sbom --python python.cdx.json --dpkg dpkg.tsv --image TAG --digest sha256:... \
        --base NAME --base-digest sha256:... -o IMAGE.cdx.json

cyclonedx-py has no Debian reader, hence the dpkg part here (purls `pkg:deb/debian/NAME@VERSION`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

SPEC = SchemaVersion.V1_6


def debian_components(dpkg_lines: str, distro: str) -> list[dict]:
    """`dpkg-query -W -f '${Package}\\t${Version}\\t${Architecture}\\n'` output as CycloneDX components."""
    components = []
    for line in dpkg_lines.splitlines():
        if not line.strip():
            continue
        name, version, arch = line.split("\t")
        purl = PackageURL(type="deb", namespace="debian", name=name, version=version,
                          qualifiers={"arch": arch, "distro": distro}).to_string()
        components.append({"type": "library", "name": name, "version": version, "purl": purl, "bom-ref": purl})
    return components


def image_bom(python_bom: dict, dpkg_lines: str, image: str, digest: str, base: str, base_digest: str,
              distro: str = "debian-12") -> dict:
    """The Python BOM with the Debian packages added and the image as its main component."""
    bom = dict(python_bom)
    bom["components"] = [*python_bom.get("components", []), *debian_components(dpkg_lines, distro)]
    metadata = dict(bom.get("metadata", {}))
    image_ref = f"{image.rsplit(':', 1)[0]}@{digest}"
    metadata["component"] = {
        "type": "container", "name": image, "version": digest, "bom-ref": image_ref,
        "properties": [{"name": "org.opencontainers.image.base.name", "value": base},
                       {"name": "org.opencontainers.image.base.digest", "value": base_digest}],
    }
    bom["metadata"] = metadata
    # the image holds every package: the Python ones cyclonedx-py listed and the Debian ones
    dependencies = [d for d in bom.get("dependencies", []) if d.get("ref") != image_ref]
    dependencies.append({"ref": image_ref, "dependsOn": [c["bom-ref"] for c in bom["components"] if "bom-ref" in c]})
    bom["dependencies"] = dependencies
    return bom


def check(bom: dict) -> None:
    """Raise ValueError unless `bom` is valid CycloneDX (the strict JSON schema)."""
    error = JsonStrictValidator(SPEC).validate_str(json.dumps(bom))
    if error is not None:
        raise ValueError(f"not a valid CycloneDX {SPEC.to_version()} BOM: {error}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", type=Path, required=True, help="cyclonedx-py's BOM of the image's Python")
    parser.add_argument("--dpkg", type=Path, required=True, help="dpkg-query output of the image")
    parser.add_argument("--image", required=True)
    parser.add_argument("--digest", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--base-digest", required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    bom = image_bom(json.loads(args.python.read_text()), args.dpkg.read_text(), args.image, args.digest,
                    args.base, args.base_digest)
    check(bom)
    args.output.write_text(json.dumps(bom, indent=2) + "\n")
    print(f"{args.output}: {len(bom['components'])} components")


if __name__ == "__main__":
    main()
