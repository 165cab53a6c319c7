"""The cluster extra stays optional: ``import conduit`` loads neither boto3 nor redis."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = """
import sys
import conduit
import conduit.cluster, conduit.cluster.store, conduit.cluster.location
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "redis"))
assert not heavy, heavy
assert conduit.cluster.location.is_s3_url("s3://bucket/prefix")
assert not conduit.cluster.location.is_s3_url("./transfers")
print("ok")
"""


def test_core_import_needs_no_cluster_libraries() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
