"""The release workflow users copy (examples/ci/edgekit-release.yml) installs edgekit from the checkout,
never the unrelated `edgekit` of the public index, and has the permissions its steps need."""
from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import ROOT

WORKFLOW = ROOT / "examples" / "ci" / "edgekit-release.yml"


def _steps():
    doc = yaml.safe_load(WORKFLOW.read_text())
    return doc, [s for job in doc["jobs"].values() for s in job["steps"]]


def test_the_workflow_installs_edgekit_from_the_checkout_with_constraints_and_pinned_cpu_torch():
    _, steps = _steps()
    runs = "\n".join(s.get("run", "") for s in steps)
    installs = [line.strip() for line in runs.splitlines() if "pip install" in line]
    assert installs, "no install step"
    for line in installs:
        # a package spec named edgekit (not a path) would resolve the public index's unrelated project
        assert not re.search(r"""pip install\b.*(?<![\w/.$-])["']?edgekit(-deploy)?(\[|["']|\s|$)""", line), line
    edgekit_line = next(line for line in installs if "[all" in line)
    assert "-e " in edgekit_line and "constraints.txt" in edgekit_line
    assert any("torch==2.13.0" in line for line in installs)


def test_the_workflow_has_the_permissions_its_steps_need():
    doc, steps = _steps()
    perms = doc.get("permissions") or {}
    assert perms.get("contents") == "write"  # gh release download/upload
    uses = [s.get("uses", "") for s in steps]
    if any(u.startswith("mikepenz/action-junit-report") for u in uses):
        assert perms.get("checks") == "write"


def test_the_distribution_is_not_named_like_the_unrelated_project():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] != "edgekit"
    assert all(meta["name"] + "[" in dep for dep in meta["optional-dependencies"]["all"])
