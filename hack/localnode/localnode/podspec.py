"""Pure: what a kubelet derives from a pod spec before it starts a container.

The environment (``value``, ``valueFrom`` and ``envFrom`` resolved, ``$(VAR)`` expanded),
the command line (no images here: the image's entrypoint is the project's ``flowfleet``),
and the container-port -> local-port mapping that lets many pods that all say
``containerPort: 8080`` run side by side on one machine.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.utils.quantity import parse_quantity

# The worker's default HTTP port (flowfleet.defaults.HTTP_PORT): a worker whose args and
# env say nothing listens there, so that is the container port to map.
WORKER_DEFAULT_HTTP_PORT = 8080
WORKER_PORT_ENV_SUFFIX = "_WORKER_HTTP_PORT"
HTTP_PORT_OPTION = "--http-port"

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class ConfigError(Exception):
    """The container cannot be configured yet (a kubelet's CreateContainerConfigError):
    a missing Secret, ConfigMap or key. The message names the object, never a value."""


class Lookups(Protocol):
    def secret(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...


@dataclass(frozen=True)
class NodeResources:
    cpu: int
    memory_bytes: int


def unsupported(pod: Mapping[str, Any]) -> str | None:
    """What this node cannot run as the pod asks, said once instead of run wrongly."""
    for init in (pod.get("spec") or {}).get("initContainers") or []:
        if init.get("restartPolicy") == "Always":
            return f"sidecar init container {init['name']!r} is not supported by localnode"
    return None


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, unknown ones stay as
    written, and ``$$`` is a literal ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


def field_value(pod: Mapping[str, Any], path: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple: dict[str, Callable[[], Any]] = {
        "metadata.name": lambda: meta.get("name"),
        "metadata.namespace": lambda: meta.get("namespace"),
        "metadata.uid": lambda: meta.get("uid"),
        "spec.nodeName": lambda: spec.get("nodeName"),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName"),
        "status.hostIP": lambda: status.get("hostIP"),
        "status.podIP": lambda: status.get("podIP"),
        "status.hostIPs": lambda: ",".join(i["ip"] for i in status.get("hostIPs") or []),
        "status.podIPs": lambda: ",".join(i["ip"] for i in status.get("podIPs") or []),
    }
    if path in simple:
        return str(simple[path]() or "")
    subscript = _SUBSCRIPT.match(path)
    if subscript:
        return str((meta.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def resource_value(
    container: Mapping[str, Any], ref: Mapping[str, Any], node: NodeResources
) -> str:
    """``resourceFieldRef``: a limit falls back to the node's allocatable, as a kubelet does."""
    kind, _, resource = ref["resource"].partition(".")
    amounts = (container.get("resources") or {}).get(kind) or {}
    if resource in amounts:
        value = parse_quantity(amounts[resource])
    elif resource == "cpu":
        value = parse_quantity(str(node.cpu)) if kind == "limits" else parse_quantity("0")
    elif resource == "memory":
        value = parse_quantity(str(node.memory_bytes)) if kind == "limits" else parse_quantity("0")
    else:
        raise ConfigError(f"unsupported resourceFieldRef {ref['resource']!r}")
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(value / divisor))


def _keyed(
    kind: str, namespace: str, ref: Mapping[str, Any], lookup: Callable[[str, str], Any]
) -> str | None:
    data = lookup(namespace, ref["name"])
    optional = bool(ref.get("optional"))
    if data is None:
        if optional:
            return None
        raise ConfigError(f'{kind} "{ref["name"]}" not found')
    if ref["key"] not in data:
        if optional:
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
    return str(data[ref["key"]])


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    lookups: Lookups,
    node: NodeResources,
) -> dict[str, str]:
    """The container's environment as a kubelet builds it: ``envFrom`` first, then ``env``
    in order (later entries win, values may refer to earlier ones as ``$(NAME)``)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        if "configMapRef" in source:
            kind, ref, data = "configmap", source["configMapRef"], None
            data = lookups.config_map(namespace, ref["name"])
        else:
            kind, ref = "secret", source["secretRef"]
            data = lookups.secret(namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{kind} "{ref["name"]}" not found')
        env.update({prefix + key: value for key, value in data.items()})
    for item in container.get("env") or []:
        name = item["name"]
        source = item.get("valueFrom")
        if not source:
            env[name] = expand(item.get("value") or "", env)
            continue
        value: str | None
        if "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source:
            value = _keyed("secret", namespace, source["secretKeyRef"], lookups.secret)
        elif "configMapKeyRef" in source:
            value = _keyed("configmap", namespace, source["configMapKeyRef"], lookups.config_map)
        elif "resourceFieldRef" in source:
            value = resource_value(container, source["resourceFieldRef"], node)
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def command_line(
    container: Mapping[str, Any], env: Mapping[str, str], flowfleet: str, python: str
) -> list[str]:
    """The argv to run. With no ``command`` the image's entrypoint applies, and the only
    image there is here is flowfleet's (its Dockerfile says ``ENTRYPOINT ["flowfleet"]``).
    A ``command`` naming ``flowfleet`` or ``python`` gets this checkout's; anything else
    runs from the machine's PATH as written."""
    command = [expand(part, env) for part in container.get("command") or []]
    args = [expand(part, env) for part in container.get("args") or []]
    if not command:
        return [flowfleet, *args]
    head = os.path.basename(command[0])
    if head == "flowfleet":
        command[0] = flowfleet
    elif head in ("python", "python3"):
        command[0] = python
    return [*command, *args]


def declared_ports(container: Mapping[str, Any]) -> dict[str, int]:
    """Port name (or its number as text) -> containerPort."""
    ports: dict[str, int] = {}
    for port in container.get("ports") or []:
        number = int(port["containerPort"])
        ports[str(number)] = number
        if port.get("name"):
            ports[port["name"]] = number
    return ports


def container_port(container: Mapping[str, Any], port: int | str) -> int:
    """A probe's ``port`` (a number or a declared port's name) as a container port."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    ports = declared_ports(container)
    if str(port) not in ports:
        raise ConfigError(f"port {port!r} is not declared by container {container['name']!r}")
    return ports[str(port)]


def _is_worker(argv: list[str]) -> bool:
    return len(argv) > 1 and os.path.basename(argv[0]) == "flowfleet" and argv[1] == "worker"


def map_http_port(
    argv: list[str], env: Mapping[str, str], host_port: Callable[[int], int]
) -> list[str]:
    """Make the process listen on the local port mapped to its container port.

    There is one network namespace here, so two pods cannot both bind 8080: each
    container port gets a free local port (``host_port``), and the process is told so
    through the worker's own ``--http-port`` option, which wins over its environment. An
    explicit ``--http-port N`` is rewritten; a ``flowfleet worker`` without one gets it
    appended, for the port its env (``*_WORKER_HTTP_PORT``) or the default names.
    """
    out = list(argv)
    for index, part in enumerate(out):
        if part == HTTP_PORT_OPTION and index + 1 < len(out) and out[index + 1].isdigit():
            port = int(out[index + 1])
            if port:
                out[index + 1] = str(host_port(port))
            return out
        if part.startswith(HTTP_PORT_OPTION + "="):
            value = part.split("=", 1)[1]
            if value.isdigit() and int(value):
                out[index] = f"{HTTP_PORT_OPTION}={host_port(int(value))}"
            return out
    if _is_worker(out):
        configured = [v for k, v in env.items() if k.endswith(WORKER_PORT_ENV_SUFFIX)]
        given = configured[0] if configured and configured[0].isdigit() else ""
        port = int(given) if given else WORKER_DEFAULT_HTTP_PORT
        if port:
            out += [HTTP_PORT_OPTION, str(host_port(port))]
    return out
