"""A local node: registers a Node with the API server and runs the pods bound to it as
local processes of the project's own ``flowfleet`` executable (there are no images).

Run it with ``hack/localnode/node.sh start`` or ``python -m localnode`` (with
``hack/localnode`` on ``PYTHONPATH``); see hack/localnode/README.md.
"""

VERSION = "0.1.0"
