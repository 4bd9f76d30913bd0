"""The Helm chart installs the DistributedFlow CRD from its own crds/ folder (Helm reads
CRDs only from inside the chart); that copy must be the repository's one CRD, byte for byte."""

from __future__ import annotations

import difflib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "crds" / "distributedflow.yaml"
CHART_COPY = REPO / "charts" / "flowfleet" / "crds" / "distributedflow.yaml"


def test_chart_crd_is_a_byte_identical_copy_of_the_crd() -> None:
    source, copy = SOURCE.read_bytes(), CHART_COPY.read_bytes()
    diff = "".join(
        difflib.unified_diff(
            source.decode().splitlines(keepends=True),
            copy.decode().splitlines(keepends=True),
            fromfile=str(SOURCE.relative_to(REPO)),
            tofile=str(CHART_COPY.relative_to(REPO)),
            n=1,
        )
    )
    assert source == copy, f"copy crds/distributedflow.yaml into the chart:\n{diff[:4000]}"


def test_the_chart_holds_no_other_crd() -> None:
    # A second CRD in the chart would be installed by Helm but checked by nothing.
    assert sorted(p.name for p in CHART_COPY.parent.iterdir()) == [CHART_COPY.name]
