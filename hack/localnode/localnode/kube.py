"""The agent's only door to the API server: Secrets and ConfigMaps for env, pod status,
the final delete, port annotations, Events. Every call is one request; callers decide."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from localnode import timefmt

log = logging.getLogger("localnode.kube")
# Every request ends: a hung connection must not stall the loop or the heartbeat.
REQUEST_TIMEOUT = 15
TIMEOUT: dict[str, Any] = {"_request_timeout": REQUEST_TIMEOUT}

MERGE_PATCH = "application/merge-patch+json"
PORTS_ANNOTATION = "localnode.flowfleet.io/ports"


def missing(exc: ApiException) -> bool:
    return exc.status == 404


class Kube:
    def __init__(self, api: client.ApiClient, node_name: str) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.node_name = node_name

    def raw(self, response: Any) -> Any:
        return json.loads(response.data or b"null")

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST a plain dict. The typed client methods validate bodies into its models
        (pydantic), which rewrites timestamps; raw JSON goes out exactly as written."""
        method, url, headers, data, _ = self.api.param_serialize(
            method="POST",
            resource_path=path,
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=data, _request_timeout=REQUEST_TIMEOUT
        )
        response.read()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(response.data or b"null")

    # ----------------------------------------------------- env lookups ----

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            found = self.raw(
                self.core.read_namespaced_secret(name, namespace, _preload_content=False, **TIMEOUT)
            )
        except ApiException as exc:
            if missing(exc):
                return None
            raise
        return {
            key: base64.b64decode(value).decode("utf-8", errors="replace")
            for key, value in (found.get("data") or {}).items()
        }

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            found = self.raw(
                self.core.read_namespaced_config_map(
                    name, namespace, _preload_content=False, **TIMEOUT
                )
            )
        except ApiException as exc:
            if missing(exc):
                return None
            raise
        return dict(found.get("data") or {})

    # ------------------------------------------------------------- pods ----

    def pods_on_node(self) -> tuple[list[dict[str, Any]], str]:
        listing = self.raw(
            self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node_name}",
                _preload_content=False,
                **TIMEOUT,
            )
        )
        return listing["items"], listing["metadata"]["resourceVersion"]

    def patch_pod_status(self, pod: dict[str, Any], status: dict[str, Any]) -> bool:
        """Merge-patch the status; the uid in the patch makes the API server refuse it
        for a newer pod of the same name (as a kubelet's status manager does). False when
        the pod is gone."""
        meta = pod["metadata"]
        body = {"metadata": {"uid": meta["uid"]}, "status": status}
        try:
            self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], body, _content_type=MERGE_PATCH, **TIMEOUT
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def annotate_pod(self, pod: dict[str, Any], annotations: dict[str, str]) -> None:
        meta = pod["metadata"]
        body = {"metadata": {"uid": meta["uid"], "annotations": annotations}}
        try:
            self.core.patch_namespaced_pod(
                meta["name"], meta["namespace"], body, _content_type=MERGE_PATCH, **TIMEOUT
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def delete_pod_now(self, pod: dict[str, Any]) -> None:
        """The kubelet's final delete: grace 0, only this pod (uid precondition)."""
        meta = pod["metadata"]
        options = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
        )
        try:
            self.core.delete_namespaced_pod(
                meta["name"], meta["namespace"], body=options, **TIMEOUT
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def event(self, pod: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        """Best effort, like a kubelet's recorder: an event that cannot be written is
        not worth failing a pod for."""
        meta = pod["metadata"]
        stamp = timefmt.rfc3339()
        body = {
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "kind": "Pod",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
                "apiVersion": "v1",
            },
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": "localnode", "host": self.node_name},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": "localnode",
            "reportingInstance": self.node_name,
        }
        try:
            self.post(f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except Exception as exc:  # a terminating namespace, an API server restart
            log.debug("event %s for %s not written: %s", reason, meta["name"], exc)

    def service_account_token(
        self, namespace: str, account: str, pod: dict[str, Any]
    ) -> str | None:
        """A bound token for the pod's service account (what a kubelet projects into
        /var/run/secrets/kubernetes.io/serviceaccount), bound to the pod's life."""
        meta = pod["metadata"]
        body = {
            "spec": {
                "audiences": [],
                "expirationSeconds": 3600 * 24,
                "boundObjectRef": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            }
        }
        try:
            answer = self.post(
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", body
            )
        except ApiException as exc:
            if missing(exc):
                return None
            raise
        return str(answer["status"]["token"])
