"""Every tunable's default, in one place.

The worker's settings, the Python API (``DistributedProcessor``) and the operator read
these; the CRD repeats them in its schema (the API server applies defaults there) and
``tests/unit/test_defaults.py`` proves the two agree.
"""

from __future__ import annotations

from typing import Final

BATCH_SIZE: Final = 50
CONCURRENCY: Final = 1
# Leases are renewed every third of their length, so 30 s tolerates two lost renewals
# and brings a dead worker's records back within half a minute.
LEASE_SECONDS: Final = 30
# Kubernetes kills a pod 30 s after SIGTERM by default; finish before that.
GRACE_SECONDS: Final = 25
POLL_SECONDS: Final = 5
HTTP_PORT: Final = 8080
FLOW_RUN_SECONDS: Final = 60
RECORD_TIMEOUT_SECONDS: Final = 0  # 0: no limit
MAX_RETRIES: Final = 3
MAX_ABANDONS: Final = 3
RETRY_BACKOFF_SECONDS: Final = 1.0
RETRY_BACKOFF_MAX_SECONDS: Final = 300.0
RUNNER: Final = "prefect"
# Claims made through the Python API are not renewed, so they last this long.
CLEANUP_TIMEOUT_HOURS: Final = 2

# Operator-side defaults of a DistributedFlow (the CRD schema holds the same values).
MIN_REPLICAS: Final = 0
MAX_REPLICAS: Final = 10
RECORDS_PER_REPLICA: Final = 100
SCALE_DOWN_DELAY_SECONDS: Final = 60
POLL_INTERVAL_SECONDS: Final = 10
ENVIRONMENT: Final = "production"
