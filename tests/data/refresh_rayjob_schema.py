"""Rebuilds kuberay_rayjob_v1_schema.json from a KubeRay RayJob CRD file:

    python tests/data/refresh_rayjob_schema.py ray.io_rayjobs.yaml

It keeps the `v1` version's openAPIV3Schema, every property and constraint, and drops only the
`description` strings (most of the CRD's size). Update KUBERAY_RAYJOB_SCHEMA.md with the tag and
commit the CRD came from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).with_name("kuberay_rayjob_v1_schema.json")


def without_descriptions(node):
    if isinstance(node, dict):
        # a property called "description" (a key inside `properties`) is a field, not a doc string
        return {key: without_descriptions(value) for key, value in node.items()
                if key != "description" or isinstance(value, dict)}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


def v1_schema(crd: dict) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return without_descriptions(version["schema"]["openAPIV3Schema"])


if __name__ == "__main__":
    crd = yaml.safe_load(Path(sys.argv[1]).read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob", sys.argv[1]
    # one line per top-level key would not help a diff of a generated file; compact keeps it small
    OUT.write_text(json.dumps(v1_schema(crd), sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
