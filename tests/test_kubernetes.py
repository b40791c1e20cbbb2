# -*- test-case-name: tests.test_kubernetes -*-
"""
The Kubernetes manifests in C{deploy/kubernetes/}: the base and the two
overlays render with C{kubectl kustomize}, every object passes the Kubernetes
schemas offline (C{kubernetes-validate}, strict: no unknown field), and
what the manifests say about the relay matches the relay itself: each
C{POSTSTACK_RELAY_*} variable names a real option and parses, the ports are
the ones those settings open, the probes' paths answer as liveness and
readiness on the relay's own monitoring resource, the grace period covers
the drain, and the objects refer to each other by the right names.

Without C{kubectl} the tests skip with a reason, except under CI, where
C{.ci/run} installs it (Debian's C{kubernetes-client}) and they fail.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import yaml
from kubernetes_validate import SchemaNotFoundError, ValidationError

from poststack_relay import tap
from poststack_relay.config import RelayConfig
from poststack_relay.places import parse_metrics_listen
from poststack_relay.metrics import RelayMetrics
from poststack_relay.monitoring import MetricsResource
from tests.common.processes import required_tool
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "Containerfile"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
MANAGED_REDIS = KUBERNETES / "overlays" / "managed-redis"
KUSTOMIZATIONS = (BASE, OVERLAY, MANAGED_REDIS)

#: Seconds C{kubectl kustomize} may take.
RENDER_TIMEOUT = 60.0

#: The oldest Kubernetes the manifests are for (the preStop sleep action
#: is 1.30's) and the newest the validator knows.
SCHEMA_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

#: Kinds from CRDs, which kubernetes-validate has no schema for: checked
#: here by their references instead (test_crd_references).
CRD_KINDS = {"Certificate", "PodMonitor"}

#: Margin the grace period keeps beyond the preStop pause and the drain.
GRACE_MARGIN = 10

#: Options whose value must come from a Secret, never the manifest.
SECRET_OPTIONS = frozenset(tap.SECRET_OPTIONS)

#: Every variable the relay reads: one per option, and the config file's.
RELAY_VARIABLES = {tap.env_name(name): name for name, _, _, _ in tap._OPTIONS}
RELAY_VARIABLES[tap.ENV_PREFIX + "CONFIG"] = "config"

#: The annotation that turns on the PROXY protocol v2 on an AWS NLB.
AWS_PROXY_ANNOTATION = "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"


def kubectl_or_skip() -> str:
    """
    The path of C{kubectl}.

    @raise SkipTest: if it is not installed (with how to install it).
    @raise FailTest: instead, under CI, where C{.ci/run} installs it.
    """
    return required_tool("kubectl", "apt-get install kubernetes-client; .ci/run installs it")


@functools.lru_cache(maxsize=None)
def _render(kustomization: Path, kubectl: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [kubectl, "kustomize", str(kustomization)],
        capture_output=True, text=True, timeout=RENDER_TIMEOUT, check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {kustomization} failed: {done.stderr}")
    return tuple(o for o in yaml.safe_load_all(done.stdout) if o)


def render(kustomization: Path) -> tuple[dict[str, Any], ...]:
    """
    The objects C{kubectl kustomize} makes of C{kustomization}.
    """
    return _render(kustomization, kubectl_or_skip())


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """
    The one object of C{kind} named C{name}.
    """
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} {kind} objects named {name!r}")
    return found[0]


def relay_container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """
    The relay's container in the relay's Deployment.
    """
    pod = find(objects, "Deployment", "poststack-relay")["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = [c for c in pod["containers"] if c["name"] == "relay"]
    (container,) = containers
    return container


def relay_variables(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """
    The container's C{POSTSTACK_RELAY_*} env entries by name.
    """
    return {e["name"]: e for e in container.get("env", []) if e["name"].startswith(tap.ENV_PREFIX)}


def relay_config(container: dict[str, Any]) -> RelayConfig:
    """
    The relay's settings from the container's variables, parsed by the
    relay's own options (Secrets' values replaced by placeholders).
    """
    environ = {
        name: entry["value"] if "value" in entry else f"placeholder-for-{name.lower()}"
        for name, entry in relay_variables(container).items()
    }
    options = tap.Options(environ=environ)
    options.parseOptions([])
    return options.config


def port_number(container: dict[str, Any], port: "int | str") -> int:
    """
    A probe's or Service's port, by number or by the container port's name.
    """
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def pod_templates(objects: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """
    (Deployment name, pod template) of every Deployment.
    """
    for o in objects:
        if o["kind"] == "Deployment":
            yield o["metadata"]["name"], o["spec"]["template"]


def image_user_and_ports(containerfile: Path) -> tuple[int, set[int]]:
    """
    The numeric user of the image's last stage (its last C{USER}) and the
    ports it C{EXPOSE}s.
    """
    text = containerfile.read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", text, re.MULTILINE)
    if not users:
        raise AssertionError(f"{containerfile}: no numeric USER")
    exposed = {
        int(port)
        for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.MULTILINE)
        for port in re.findall(r"(\d+)(?:/tcp)?", line)
    }
    return int(users[-1]), exposed


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class RenderTests(SynchronousTestCase):
    """
    Both kustomizations render, and every object passes the schemas.
    """

    def test_schemas(self) -> None:
        """
        Every object the base and the overlay make validates strictly
        against the Kubernetes schemas of the oldest and newest supported
        versions; only the CRDs' kinds, which the validator has no schema
        for, are left to test_crd_references.
        """
        for kustomization in KUSTOMIZATIONS:
            skipped = set()
            for o in render(kustomization):
                for version in SCHEMA_VERSIONS:
                    try:
                        kubernetes_validate.validate(o, version, strict=True)
                    except SchemaNotFoundError:
                        skipped.add(o["kind"])
                    except ValidationError as e:
                        self.fail(f"{kustomization.name}: {o['kind']} {o['metadata']['name']} "
                                  f"(Kubernetes {version}): {e.message} at {list(e.path)}")
            self.assertTrue(skipped <= CRD_KINDS, skipped)
        self.assertEqual(
            {o["kind"] for o in render(OVERLAY)} & CRD_KINDS, CRD_KINDS,
            "the overlay's examples are rendered (and so checked below)")

    def test_base_has_no_crds(self) -> None:
        """
        The base applies to any cluster: no object from a CRD.
        """
        self.assertEqual({o["kind"] for o in render(BASE)} & CRD_KINDS, set())

    def test_no_secret_in_manifests(self) -> None:
        """
        No Secret object and no secret option's value in the manifests:
        the service key and the Redis password come from Secrets made
        outside them.
        """
        for kustomization in KUSTOMIZATIONS:
            objects = render(kustomization)
            self.assertNotIn("Secret", {o["kind"] for o in objects})
            variables = relay_variables(relay_container(objects))
            for option in SECRET_OPTIONS:
                entry = variables[tap.env_name(option)]
                self.assertNotIn("value", entry)
                self.assertIn("secretKeyRef", entry["valueFrom"])


class RelayOptionsTests(SynchronousTestCase):
    """
    What the manifests tell the relay exists in the relay.
    """

    def test_variables_are_options(self) -> None:
        """
        Every C{POSTSTACK_RELAY_*} variable the manifests set names one of
        the relay's options (a renamed option fails here), and the values
        parse with the relay's own options.
        """
        for kustomization in KUSTOMIZATIONS:
            container = relay_container(render(kustomization))
            variables = relay_variables(container)
            self.assertTrue(variables)
            unknown = sorted(set(variables) - set(RELAY_VARIABLES))
            self.assertEqual(unknown, [], f"{kustomization.name}: not options of the relay")
            relay_config(container)

    def test_ports(self) -> None:
        """
        The container port C{smtps} is the relay's C{--port}, C{metrics} its
        metrics listener's port on all addresses (the default, loopback,
        would be unreachable for probes and Prometheus), and the Service
        sends port 587 to C{smtps}.
        """
        for kustomization in KUSTOMIZATIONS:
            objects = render(kustomization)
            container = relay_container(objects)
            config = relay_config(container)
            self.assertEqual(port_number(container, "smtps"), config.port)
            host, port = parse_metrics_listen(config.metrics_listen)
            self.assertEqual(port_number(container, "metrics"), port)
            self.assertEqual(host, "0.0.0.0")
            (service_port,) = find(objects, "Service", "poststack-relay")["spec"]["ports"]
            self.assertEqual(service_port["port"], 587)
            self.assertEqual(port_number(container, service_port["targetPort"]), config.port)

    def test_image_exposes_container_ports(self) -> None:
        """
        The relay's container ports are the ones the image exposes.
        """
        _, exposed = image_user_and_ports(CONTAINERFILE)
        for kustomization in KUSTOMIZATIONS:
            container = relay_container(render(kustomization))
            self.assertEqual({p["containerPort"] for p in container["ports"]}, exposed)

    def test_probes(self) -> None:
        """
        The probes use the metrics port, liveness a path the relay answers
        200 even when not ready, readiness one it answers 503 when not ready
        and 200 when ready: asked of the relay's own monitoring resource.
        """
        reasons: list[str] = []
        resource = MetricsResource(RelayMetrics(), lambda: list(reasons))

        def status(path: str) -> int:
            request = DummyRequest([path.lstrip("/").encode("ascii")])
            request.path = path.encode("ascii")
            request.method = b"GET"
            resource.render(request)
            return int(request.responseCode or 200)

        for kustomization in KUSTOMIZATIONS:
            container = relay_container(render(kustomization))
            _, metrics_port = parse_metrics_listen(relay_config(container).metrics_listen)
            live, ready = container["livenessProbe"], container["readinessProbe"]
            for probe in (live, ready, container["startupProbe"]):
                self.assertEqual(port_number(container, probe["httpGet"]["port"]), metrics_port)
            reasons[:] = ["relay is stopping"]
            self.assertEqual(status(live["httpGet"]["path"]), 200)
            self.assertEqual(status(ready["httpGet"]["path"]), 503)
            reasons[:] = []
            self.assertEqual(status(ready["httpGet"]["path"]), 200)

    def test_grace_period_covers_drain(self) -> None:
        """
        A stopping pod gets its preStop pause, the relay's whole drain and
        a margin before SIGKILL.
        """
        for kustomization in KUSTOMIZATIONS:
            objects = render(kustomization)
            pod = find(objects, "Deployment", "poststack-relay")["spec"]["template"]["spec"]
            container = relay_container(objects)
            pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            drain = relay_config(container).drain_timeout
            self.assertGreaterEqual(
                pod["terminationGracePeriodSeconds"], pause + drain + GRACE_MARGIN)

    def test_proxy_protocol_matches_balancer(self) -> None:
        """
        The relay expects a PROXY header exactly when the Service asks the
        balancer for one.
        """
        expected = {BASE: False, OVERLAY: True, MANAGED_REDIS: False}
        for kustomization in KUSTOMIZATIONS:
            objects = render(kustomization)
            service = find(objects, "Service", "poststack-relay")
            annotations = service["metadata"].get("annotations", {})
            sends = AWS_PROXY_ANNOTATION in annotations
            self.assertEqual(sends, expected[kustomization])
            self.assertEqual(relay_config(relay_container(objects)).proxy_protocol, sends)
            self.assertEqual(service["spec"]["externalTrafficPolicy"], "Local")

    def test_redis(self) -> None:
        """
        The relays' C{--redis-url} names the in-cluster Redis Service and
        its port, which selects the Redis pod, only the relays' pods may
        reach it, and both sides read the password from the same Secret
        key.
        """
        for kustomization in (BASE, OVERLAY):
            self.check_in_cluster_redis(render(kustomization))

    def test_managed_redis(self) -> None:
        """
        The managed-redis overlay leaves no Redis object, and the relays
        use TLS to the URL it gives, the password still from the Secret.
        """
        objects = render(MANAGED_REDIS)
        names = {o["metadata"]["name"] for o in objects}
        self.assertNotIn("poststack-relay-redis", names)
        container = relay_container(objects)
        redis = relay_config(container).redis()
        assert redis is not None
        self.assertTrue(redis.tls)
        self.assertNotIn(redis.host, names)
        self.assertIn("secretKeyRef", relay_variables(container)[tap.env_name("redis-password")]["valueFrom"])

    def check_in_cluster_redis(self, objects: tuple[dict[str, Any], ...]) -> None:
        container = relay_container(objects)
        redis = relay_config(container).redis()
        assert redis is not None
        service = find(objects, "Service", redis.host)
        self.assertEqual([p["port"] for p in service["spec"]["ports"]], [redis.port])
        template = find(objects, "Deployment", redis.host)["spec"]["template"]
        self.assertTrue(selects(service["spec"]["selector"], template["metadata"]["labels"]))
        (server,) = template["spec"]["containers"]
        self.assertEqual(port_number(server, service["spec"]["ports"][0]["targetPort"]), redis.port)
        policy = find(objects, "NetworkPolicy", redis.host)["spec"]
        self.assertTrue(selects(policy["podSelector"]["matchLabels"], template["metadata"]["labels"]))
        relay_labels = find(objects, "Deployment", "poststack-relay")["spec"]["template"]["metadata"]["labels"]
        (rule,) = policy["ingress"]
        self.assertEqual([selects(f["podSelector"]["matchLabels"], relay_labels) for f in rule["from"]], [True])
        self.assertEqual([port_number(server, p["port"]) for p in rule["ports"]], [redis.port])
        password = {e["name"]: e for e in server["env"]}["REDIS_PASSWORD"]["valueFrom"]
        relay_password = relay_variables(container)[tap.env_name("redis-password")]["valueFrom"]
        self.assertEqual(password, relay_password)
        self.assertIn("$(REDIS_PASSWORD)", server["args"])


class PodSecurityTests(SynchronousTestCase):
    """
    Every pod runs as the restricted Pod Security Standard asks.
    """

    def test_restricted(self) -> None:
        """
        Non-root (the relay as the Containerfile's USER), no privilege escalation,
        no capability, a read-only root, seccomp's runtime default, no
        service account token.
        """
        for kustomization in KUSTOMIZATIONS:
            for name, template in pod_templates(render(kustomization)):
                pod = template["spec"]
                self.assertIs(pod["securityContext"]["runAsNonRoot"], True, name)
                self.assertEqual(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
                self.assertIs(pod["automountServiceAccountToken"], False, name)
                for container in pod["containers"]:
                    context = container["securityContext"]
                    self.assertIs(context["runAsNonRoot"], True, name)
                    self.assertIs(context["allowPrivilegeEscalation"], False, name)
                    self.assertIs(context["readOnlyRootFilesystem"], True, name)
                    self.assertEqual(context["capabilities"], {"drop": ["ALL"]}, name)
                    self.assertIn("requests", container["resources"])
                    self.assertIn("limits", container["resources"])
            objects = render(kustomization)
            pod = find(objects, "Deployment", "poststack-relay")["spec"]["template"]["spec"]
            image_uid, _ = image_user_and_ports(CONTAINERFILE)
            self.assertEqual(pod["securityContext"]["runAsUser"], image_uid)
            # Without a capability, a port below 1024 needs the sysctl.
            port = relay_config(relay_container(objects)).port
            sysctls = {s["name"]: int(s["value"]) for s in pod["securityContext"].get("sysctls", [])}
            self.assertLessEqual(sysctls.get("net.ipv4.ip_unprivileged_port_start", 1024), port)

    def test_writable_tmp_and_read_only_certificate(self) -> None:
        """
        /tmp is an emptyDir; the certificate and key the relay is told to
        read are in the kubernetes.io/tls Secret's volume, mounted
        read-only.
        """
        for kustomization in KUSTOMIZATIONS:
            objects = render(kustomization)
            pod = find(objects, "Deployment", "poststack-relay")["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            container = relay_container(objects)
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            self.assertIn("emptyDir", volumes[mounts["/tmp"]["name"]])
            config = relay_config(container)
            for path, key in ((config.tls_cert, "tls.crt"), (config.tls_key, "tls.key")):
                assert path is not None
                directory, _, file = path.rpartition("/")
                self.assertEqual(file, key)
                self.assertIs(mounts[directory]["readOnly"], True)
                self.assertEqual(volumes[mounts[directory]["name"]]["secret"]["secretName"],
                                 "poststack-relay-tls")


class ReferenceTests(SynchronousTestCase):
    """
    The objects name and select each other correctly.
    """

    def test_selectors(self) -> None:
        """
        The relay's Service and PodDisruptionBudget select the relay's pods
        and not Redis's; the autoscaler scales the relay's Deployment from
        3 pods, with a CPU target; the pods spread over zones and nodes.
        """
        for kustomization in KUSTOMIZATIONS:
            objects = render(kustomization)
            templates = dict(pod_templates(objects))
            relay = templates["poststack-relay"]["metadata"]["labels"]
            redis = templates.get("poststack-relay-redis", {"metadata": {"labels": {
                "app.kubernetes.io/name": "poststack-relay",
                "app.kubernetes.io/component": "redis"}}})["metadata"]["labels"]
            for selector in (
                find(objects, "Service", "poststack-relay")["spec"]["selector"],
                find(objects, "PodDisruptionBudget", "poststack-relay")["spec"]["selector"]["matchLabels"],
            ):
                self.assertTrue(selects(selector, relay))
                self.assertFalse(selects(selector, redis))
            deployment = find(objects, "Deployment", "poststack-relay")
            self.assertEqual(deployment["spec"]["replicas"], 3)
            hpa = find(objects, "HorizontalPodAutoscaler", "poststack-relay")
            self.assertEqual(hpa["apiVersion"], "autoscaling/v2")
            self.assertEqual(
                (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]),
                ("Deployment", "poststack-relay"))
            self.assertEqual(hpa["spec"]["minReplicas"], 3)
            self.assertEqual([m["resource"]["name"] for m in hpa["spec"]["metrics"]], ["cpu"])
            spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
            self.assertEqual({c["topologyKey"] for c in spread},
                             {"topology.kubernetes.io/zone", "kubernetes.io/hostname"})
            for constraint in spread:
                self.assertTrue(selects(constraint["labelSelector"]["matchLabels"], relay))

    def test_crd_references(self) -> None:
        """
        What the validator cannot check of the CRDs' objects: the
        Certificate fills the Secret the relay mounts, for the name the
        relay greets with; the PodMonitor scrapes the relay's pods on the
        metrics port's /metrics, which the relay serves.
        """
        objects = render(OVERLAY)
        container = relay_container(objects)
        pod = find(objects, "Deployment", "poststack-relay")["spec"]["template"]
        certificate = find(objects, "Certificate", "poststack-relay")
        self.assertEqual(certificate["apiVersion"], "cert-manager.io/v1")
        secrets = {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
        self.assertIn(certificate["spec"]["secretName"], secrets)
        self.assertIn(relay_config(container).hostname, certificate["spec"]["dnsNames"])
        self.assertEqual(set(certificate["spec"]["issuerRef"]), {"kind", "name"})
        monitor = find(objects, "PodMonitor", "poststack-relay")
        self.assertEqual(monitor["apiVersion"], "monitoring.coreos.com/v1")
        self.assertTrue(selects(monitor["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]))
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        _, metrics_port = parse_metrics_listen(relay_config(container).metrics_listen)
        self.assertEqual(port_number(container, endpoint["port"]), metrics_port)
        request = DummyRequest([b"metrics"])
        request.path = endpoint["path"].encode("ascii")
        request.method = b"GET"
        MetricsResource(RelayMetrics(), list).render(request)
        self.assertEqual(request.responseCode, 200)
        namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
        self.assertEqual(namespaces, {find(objects, "Namespace", "poststack-relay")["metadata"]["name"]})
