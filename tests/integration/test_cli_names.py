"""The CLI and the DistributedFlow CRD accept the same flow names: a flow enqueued or
worked on from the command line can always be handed to the operator, and back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
import yaml

from flowfleet.cli import FLOW_NAME, flow_name

CRD = Path(__file__).resolve().parents[2] / "crds" / "distributedflow.yaml"


def crd_pattern() -> str:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return str(schema["properties"]["spec"]["properties"]["flowName"]["pattern"])


def test_the_cli_rule_is_the_crd_pattern() -> None:
    assert FLOW_NAME.pattern == crd_pattern()


ACCEPTED = ["survey_processor", "a", "A.b-c_9", "9lives", "x" * 100]
REFUSED = ["x" * 101, "", "-x", ".x", "_x", "a b", "ñandú", "a/b", "a:b", "a\n"]


@pytest.mark.parametrize("name", ACCEPTED + REFUSED)
def test_same_verdict_on_each_name(name: str) -> None:
    # The API server anchors the pattern; "a\n" must not slip through a "$".
    by_crd = re.fullmatch(crd_pattern(), name) is not None
    try:
        by_cli = flow_name(name) == name
    except typer.BadParameter:
        by_cli = False
    assert by_crd == by_cli == (name in ACCEPTED)
