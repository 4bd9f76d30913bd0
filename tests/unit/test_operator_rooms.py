"""The operator's pure modules stay pure: importing them pulls in neither kopf, nor the
Kubernetes client, nor the modules that do I/O."""

from __future__ import annotations

import subprocess
import sys

PURE = ("scaling", "manifests", "conditions", "model", "settings")


def test_pure_modules_import_no_framework_or_client() -> None:
    code = (
        "import sys\n"
        + "".join(f"import flowfleet_operator.{m}\n" for m in PURE)
        + "print(sorted(m for m in ('kopf', 'kubernetes', 'flowfleet_operator.queuedb',"
        " 'flowfleet_operator.kube', 'flowfleet_operator.fleet') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
