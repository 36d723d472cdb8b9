"""A small evaluator of Kubernetes NetworkPolicy semantics, enough to ask "may this peer reach
this pod on this port?" of rendered manifests (label selectors, namespace selectors, ipBlocks,
ports, policyTypes; additive allow rules; a pod selected by no policy of a type is open)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Peer:
    """The other end of a connection: a pod (namespace + labels) or an address outside."""

    namespace: str | None = None
    namespace_labels: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    ip: str | None = None

    @classmethod
    def pod(cls, namespace: str, labels: dict[str, str] | None = None) -> Peer:
        return cls(
            namespace=namespace,
            namespace_labels={"kubernetes.io/metadata.name": namespace},
            labels=labels or {},
        )

    @classmethod
    def outside(cls, ip: str) -> Peer:
        return cls(ip=ip)


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Label selector semantics; an empty selector selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def policy_types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _port_ok(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        lo = p["port"]
        assert isinstance(lo, int), "named ports in policies are not evaluated here"
        hi = p.get("endPort", lo)
        if lo <= port <= hi:
            return True
    return False


def _peer_ok(peers: list[dict[str, Any]] | None, peer: Peer, policy_namespace: str) -> bool:
    if not peers:
        return True
    for entry in peers:
        if "ipBlock" in entry:
            if peer.ip is None:
                continue
            addr = ipaddress.ip_address(peer.ip)
            block = entry["ipBlock"]
            net = ipaddress.ip_network(block["cidr"])
            if addr.version != net.version or addr not in net:
                continue
            if any(
                addr.version == ipaddress.ip_network(e).version and addr in ipaddress.ip_network(e)
                for e in block.get("except") or []
            ):
                continue
            return True
        # Pods are not given IPs here, so an ipBlock never matches a pod peer.
        if peer.ip is not None:
            continue
        if "namespaceSelector" in entry:
            if not selects(entry["namespaceSelector"], peer.namespace_labels):
                continue
        elif peer.namespace != policy_namespace:
            continue
        if "podSelector" in entry and not selects(entry["podSelector"], peer.labels):
            continue
        return True
    return False


def allowed(
    policies: list[dict[str, Any]],
    *,
    pod_namespace: str,
    pod_labels: dict[str, str],
    direction: str,
    peer: Peer,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether traffic ``direction`` ("Ingress" into the pod, "Egress" out of it) is allowed."""
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    applicable = [
        p
        for p in policies
        if p["metadata"].get("namespace", pod_namespace) == pod_namespace
        and selects(p["spec"].get("podSelector"), pod_labels)
        and direction in policy_types(p)
    ]
    if not applicable:
        return True
    for p in applicable:
        for rule in p["spec"].get(rules_key) or []:
            if _port_ok(rule.get("ports"), port, protocol) and _peer_ok(
                rule.get(peers_key), peer, pod_namespace
            ):
                return True
    return False
