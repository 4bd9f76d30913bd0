"""The operator's only door to the API server beyond kopf: Secrets, Deployments and their
/scale, DistributedFlow status, worker pods. It decides nothing.

The ``kubernetes`` client is synchronous; every call here runs in a worker thread so the
operator's event loop never blocks on the network.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from flowfleet_operator.metrics import API_WRITES
from flowfleet_operator.model import GROUP, PLURAL, VERSION

# The API server's refusals, under our name: the rest of the operator catches this and
# never imports the Kubernetes client itself (kube.py is its only door to the API server).
KubeError = ApiException

FIELD_MANAGER = "flowfleet-operator"
_MERGE = "application/merge-patch+json"
_APPLY = "application/apply-patch+yaml"


class SecretMissing(LookupError):
    """The Secret, or its key, does not exist (or is not readable): one line, no value."""


def load_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster configuration inside a pod, else the kubeconfig (KUBECONFIG or ~/.kube)."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(config_file=kubeconfig)


def _json(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.data)
    return data


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def read_secret_value(self, namespace: str, name: str, key: str) -> str:
        try:
            secret = _json(
                await self._call(
                    self.core.read_namespaced_secret, name, namespace, _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status in (403, 404):
                raise SecretMissing(f"Secret {namespace}/{name} (key {key!r}) not found") from None
            raise
        encoded = (secret.get("data") or {}).get(key)
        if encoded is None:
            raise SecretMissing(f"Secret {namespace}/{name} has no key {key!r}")
        try:
            return base64.b64decode(encoded).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError):
            raise SecretMissing(f"Secret {namespace}/{name} key {key!r} is not UTF-8") from None

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(
                await self._call(
                    self.apps.read_namespaced_deployment, name, namespace, _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def apply_deployment(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: one field manager owns every field we set, so a field dropped
        from the spec is dropped from the Deployment, and an unchanged manifest changes
        nothing (no rollout)."""
        meta = manifest["metadata"]
        API_WRITES.inc()
        return _json(
            await self._call(
                self.apps.patch_namespaced_deployment,
                meta["name"],
                meta["namespace"],
                manifest,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=_APPLY,
                _preload_content=False,
            )
        )

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        API_WRITES.inc()
        await self._call(
            self.apps.patch_namespaced_deployment_scale,
            name,
            namespace,
            {"spec": {"replicas": replicas}},
            field_manager=FIELD_MANAGER,
            _content_type=_MERGE,
            _preload_content=False,
        )

    async def patch_flow_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        API_WRITES.inc()
        await self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            field_manager=FIELD_MANAGER,
            _content_type=_MERGE,
            _preload_content=False,
        )

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        pods = _json(
            await self._call(
                self.core.list_namespaced_pod,
                namespace,
                label_selector=selector,
                _preload_content=False,
            )
        )
        items: list[dict[str, Any]] = pods.get("items") or []
        return items

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        API_WRITES.inc()
        await self._call(
            self.core.patch_namespaced_pod,
            name,
            namespace,
            {"metadata": {"annotations": annotations}},
            field_manager=FIELD_MANAGER,
            _content_type=_MERGE,
            _preload_content=False,
        )

    def close(self) -> None:
        self.api.close()


def api_error_line(exc: ApiException) -> str:
    """An API error as one line: its status and the server's message."""
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    return f"{exc.status} {message}"
