"""Deployment artefacts: Dockerfile, k8s manifests, Grafana dashboard, operations guide.

No Docker engine and no cluster run here, so each artefact is checked offline:
- Dockerfile: hadolint, the image contract (slim Python >= 3.11, multi-stage, non-root, ports,
  health check, `macp-router serve` entrypoint), and a fresh venv that replays the build stage
  parsed from the Dockerfile itself (its COPY steps through .dockerignore, then its
  `pip install`) and runs the installed `macp-router`.
- k8s/: yamllint, then every object of base/ and of the example overlay (rendered here with a
  minimal kustomize: resources, namespace, images and the strategic-merge patches used) against
  the Kubernetes JSON schemas of `kubernetes-validate` (strict, oldest and newest version).
  ServiceMonitor and PrometheusRule are CRDs that kubernetes-validate has no schema for: their
  structure, selectors and alert expressions are checked explicitly below.
- Cross-file contracts: ports, probes, names and selectors agree between objects; every
  MACP_ROUTER_* variable is a `serve` flag; dashboard and alerts use only the router's metric
  names; docs/operations.md covers every metric, alert runbook and variable.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
DASHBOARD = K8S / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"
TOOLS = Path(sys.executable).parent  # the venv holding the test extra (hadolint, yamllint)

GRPC_PORT = 50051
METRICS_PORT = 9090

ROUTER_METRICS = frozenset(
    {
        "macp_router_requests_total",
        "macp_router_request_duration_seconds",
        "macp_router_locate_total",
        "macp_router_probe_fanouts_total",
        "macp_router_probe_duration_seconds",
        "macp_router_coalesced_misses_total",
        "macp_router_placements_total",
        "macp_router_broadcasts_total",
        "macp_router_broadcast_record_failures_total",
        "macp_router_list_snapshots",
        "macp_router_list_snapshot_bytes",
        "macp_router_watch_up",
        "macp_router_watch_reconnects_total",
        "macp_router_watch_events_total",
        "macp_router_cached_sessions",
        "macp_router_active_streams",
        "macp_router_pod_healthy",
        "macp_router_pod_credentials_rejected",
        "macp_router_pods",
        "macp_router_healthy_pods",
        "macp_router_store_degraded",
        "macp_router_redis_command_duration_seconds",
        "macp_router_service_crashes_total",
        "macp_router_service_up",
        "macp_router_asyncio_tasks",
        "macp_router_cache_evictions_total",
        "macp_router_negative_cache_entries",
        "macp_router_inflight_lookups",
        "macp_router_store_entries",
        "macp_router_acp_connections",
        "macp_router_acp_session_streams",
        "macp_router_acp_idle_closed_total",
        "macp_router_admission_refused_total",
        "macp_router_admission_inflight",
        "macp_router_admission_limit",
    }
)
REQUIRED_ALERTS = {
    "MacpRouterDown": 'absent(up{job="macp-router"})',
    "MacpRouterNoHealthyPods": 'macp_router_healthy_pods{protocol="macp"} == 0',
    "MacpRouterFeedDown": "macp_router_watch_up == 0",
    "MacpRouterStoreDegraded": "macp_router_store_degraded == 1",
    "MacpRouterUnknownLocates": 'rate(macp_router_locate_total{result="unknown"}[5m])) > 0.1',
    "MacpRouterHighLatencyP99": "histogram_quantile(0.99,",
    "MacpRouterServiceCrashed": "increase(macp_router_service_crashes_total[10m]) > 0",
}
TEST_ONLY_PACKAGES = {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "ruff"}


def tool(name: str) -> str:
    found = shutil.which(name, path=str(TOOLS)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


def run(cmd: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[dict]]:
    """Global ARG defaults and the stages: {name, image, steps: [(INSTRUCTION, args)]}."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not (pending or line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            steps.append((keyword.upper(), args.strip()))
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for keyword, args in steps:
        if keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], args)
            parts = image.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append({"name": name, "image": parts[0], "steps": []})
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1]["steps"].append((keyword, args))
    return global_args, stages


def env_pairs(args: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(args))


def exec_form(args: str) -> list[str]:
    return json.loads(args)


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(DOCKERFILE.read_text())[1]


def final_stage_steps(stages: list[dict], keyword: str) -> list[str]:
    return [args for kw, args in stages[-1]["steps"] if kw == keyword]


def test_dockerfile_passes_hadolint():
    result = run([tool("hadolint"), "--no-color", str(DOCKERFILE)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_on_slim_python_311_or_newer(stages):
    assert len(stages) >= 2
    for stage in stages:
        match = re.fullmatch(r"python:3\.(\d+)(\.\d+)?-slim(-\w+)?", stage["image"])
        assert match and int(match[1]) >= 11, stage["image"]
    build_names = {stage["name"] for stage in stages[:-1]}
    assert any(
        kw == "COPY" and re.match(rf"--from=({'|'.join(build_names)})\s", args)
        for kw, args in stages[-1]["steps"]
    ), "the final stage copies the built venv from a build stage"
    assert not any(kw == "RUN" and "pip" in args for kw, args in stages[-1]["steps"])


def test_image_runs_as_numeric_non_root_user(stages):
    (user,) = final_stage_steps(stages, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric uid, so Kubernetes can verify runAsNonRoot"


def test_image_exposes_grpc_and_metrics_and_checks_healthz(stages):
    exposed = {
        int(p.split("/")[0]) for args in final_stage_steps(stages, "EXPOSE") for p in args.split()
    }
    assert exposed == {GRPC_PORT, METRICS_PORT}
    (healthcheck,) = final_stage_steps(stages, "HEALTHCHECK")
    assert "/healthz" in healthcheck and "9090" in healthcheck


def test_image_entrypoint_is_serve_configured_by_env(stages):
    (entrypoint,) = final_stage_steps(stages, "ENTRYPOINT")
    assert exec_form(entrypoint) == ["macp-router", "serve"]
    assert not final_stage_steps(stages, "CMD"), "settings come from MACP_ROUTER_* variables"
    env: dict[str, str] = {}
    for args in final_stage_steps(stages, "ENV"):
        env.update(env_pairs(args))
    assert env["MACP_ROUTER_LISTEN"] == f"0.0.0.0:{GRPC_PORT}"
    assert env["MACP_ROUTER_METRICS_LISTEN"] == f"0.0.0.0:{METRICS_PORT}"


# The build stage replayed on this machine: map container paths under a scratch root.


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if token in ("**", "**/"):
            out += "(.*/)?" if token == "**/" else ".*"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        else:
            out += re.escape(token)
    return re.compile(out)


def in_build_context(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!"))
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            included = negated
    return included


def replay_copy(args: str, workdir: Path, patterns: list[str]) -> None:
    *sources, dest = shlex.split(args)
    target = workdir / dest
    for source in sources:
        src = ROOT / source
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        files = [f for f in files if in_build_context(f.relative_to(ROOT).as_posix(), patterns)]
        assert files, f"COPY {source}: not in the build context (missing or in .dockerignore)"
        for f in files:
            out = target / f.name if src.is_file() else target / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory, stages: list[dict]) -> Path:
    """The Dockerfile's build stage, replayed: its venv, COPY steps and `pip install`."""
    scratch = tmp_path_factory.mktemp("image")

    def host(path: str) -> str:
        return str(scratch / path.lstrip("/")) if path.startswith("/") else path

    (build,) = [stage for stage in stages if stage["name"] == "build"]
    patterns = dockerignore_patterns()
    env = dict(os.environ)
    workdir = scratch
    venv: Path | None = None
    installed = False
    build_args: dict[str, str] = {}
    for keyword, args in build["steps"]:
        args = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m[1]], args)
        if keyword == "ARG":
            name, _, default = args.partition("=")
            build_args[name] = default
        elif keyword == "ENV":
            env.update(env_pairs(args))
        elif keyword == "WORKDIR":
            workdir = Path(host(args))
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            replay_copy(args, workdir, patterns)
        elif keyword == "RUN" and re.fullmatch(r"python -m venv (\S+)", args):
            venv = Path(host(args.split()[-1]))
            made = run([sys.executable, "-m", "venv", str(venv)], timeout=120)
            assert made.returncode == 0, made.stderr
        elif keyword == "RUN" and " install " in args and "pip" in args:
            cmd = [host(token) for token in shlex.split(args)]
            done = run(cmd, timeout=600, cwd=workdir, env=env)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            installed = True
        else:
            pytest.fail(f"build stage step this test cannot replay: {keyword} {args}")
    assert venv is not None and installed, "the build stage creates a venv and pip-installs"
    return venv


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_install_step_yields_working_cli(image_venv):
    result = run([str(image_venv / "bin" / "macp-router"), "--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_serves_both_protocols_acp_front_door_importable(image_venv):
    """`serve --acp-listen` needs the acp extra's packages: the image installs them."""
    result = run([str(image_venv / "bin" / "macp-router"), "serve", "--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--acp-listen" in result.stdout and "--acp-pods" in result.stdout
    check = run([str(image_venv / "bin" / "python"), "-c",
                 "from router.acp.config import require_acp_extra; require_acp_extra(); "
                 "import router.acp.frontdoor, hypercorn"], timeout=60)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_has_no_load_test_package(image_venv):
    check = run([str(image_venv / "bin" / "python"), "-c", "import loadtest"], timeout=60,
                cwd=image_venv)  # not the repository root, where loadtest/ is importable
    assert check.returncode != 0 and "No module named 'loadtest'" in check.stderr
    assert not (ROOT / ".dockerignore").read_text().count("!loadtest")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_can_export_traces(image_venv):
    check = run([str(image_venv / "bin" / "python"), "-c",
                 "import opentelemetry.sdk.trace, "
                 "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"], timeout=60,
                cwd=image_venv)
    assert check.returncode == 0, check.stderr


def test_healthcheck_is_documented_as_docker_only(stages):
    text = DOCKERFILE.read_text()
    note = text[:text.index("HEALTHCHECK --")]
    assert "OCI" in note and "probes" in note


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_install_step_has_no_test_dependencies(image_venv):
    listed = run([str(image_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], 60)
    assert listed.returncode == 0, listed.stderr
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "macp-router" in names
    assert not names & TEST_ONLY_PACKAGES


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_configured_variable_is_a_serve_flag(image_venv):
    result = run([str(image_venv / "bin" / "macp-router"), "serve", "--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    for var in sorted(configured_router_variables()):
        flag = "--" + var.removeprefix("MACP_ROUTER_").lower().replace("_", "-")
        assert re.search(rf"{flag}\b", result.stdout), f"{var}: `serve` has no {flag}"


def configured_router_variables() -> set[str]:
    texts = [DOCKERFILE.read_text()] + [p.read_text() for p in K8S.rglob("*.yaml")]
    return {var for text in texts for var in re.findall(r"\bMACP_ROUTER_[A-Z_]+\b", text)}


# -- k8s manifests ---------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(kdir: Path) -> dict:
    return yaml.safe_load((kdir / "kustomization.yaml").read_text())


def strategic_merge(base: object, patch: object) -> object:
    """The subset of strategic merge the overlay uses: maps merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(i, dict) and "name" in i for i in [*base, *patch]):
        merged = {item["name"]: item for item in base}
        for item in patch:
            name = item["name"]
            merged[name] = strategic_merge(merged[name], item) if name in merged else item
        return list(merged.values())
    return patch


def key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("containers", []), *spec.get("initContainers", [])]


def render(kdir: Path) -> list[dict]:
    """What `kubectl kustomize kdir` emits, for the features these kustomizations use."""
    k = kustomization(kdir)
    unsupported = set(k) - {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "images",
        "patches",
        "labels",
        "replacements",
    }
    assert not unsupported, f"{kdir}: teach render() {sorted(unsupported)}"
    docs: list[dict] = []
    for entry in k.get("resources", []):
        path = (kdir / entry).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    by_key = {key(doc): i for i, doc in enumerate(docs)}
    assert len(by_key) == len(docs), f"{kdir}: duplicate objects"
    for patch_entry in k.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{kdir}: teach render() {patch_entry}"
        (patch,) = load_docs(kdir / patch_entry["path"])
        assert key(patch) in by_key, f"{patch_entry['path']} patches a missing {key(patch)}"
        i = by_key[key(patch)]
        docs[i] = strategic_merge(docs[i], patch)
    for replacement in k.get("replacements", []):
        replace(docs, replacement)
    for label_set in k.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for doc in docs:
            for container in containers(doc):
                name, _, tag = container["image"].rpartition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def replace(docs: list[dict], replacement: dict) -> None:
    """A kustomize replacement: source field -> target fields (`*` = every list item), with
    `options.delimiter`/`index` replacing one delimited part of the target value."""
    source = replacement["source"]
    value: object = find(docs, source["kind"], source["name"])
    for part in re.split(r"\.(?![^\[]*\])", source["fieldPath"]):
        value = value[part]  # type: ignore[index]
    for target in replacement["targets"]:
        doc = find(docs, target["select"]["kind"], target["select"]["name"])
        options = target.get("options", {})
        for field_path in target["fieldPaths"]:
            *parents, leaf = field_path.split(".")
            nodes: list = [doc]
            for part in parents:
                nodes = [n for node in nodes
                         for n in (node if part == "*" else [node[part]])]
            for node in nodes:
                if "delimiter" in options:
                    parts = node[leaf].split(options["delimiter"])
                    parts[options.get("index", 0)] = value
                    node[leaf] = options["delimiter"].join(parts)
                else:
                    node[leaf] = value


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if key(d) == (kind, name)]
    return doc


def is_crd_object(doc: dict) -> bool:
    return doc["apiVersion"].startswith("monitoring.coreos.com/")


@pytest.fixture(scope="module")
def base_docs() -> list[dict]:
    return render(BASE)


@pytest.fixture(scope="module")
def example_docs() -> list[dict]:
    return render(OVERLAY)


def test_manifests_pass_yamllint():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(K8S / ".yamllint.yaml"))
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}:{p.column} {p.level} {p.message} ({p.rule})"
        for path in sorted(K8S.rglob("*.yaml"))
        for p in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


def test_every_manifest_file_is_part_of_a_kustomization():
    referenced = set()
    for kdir in (BASE, OVERLAY):
        k = kustomization(kdir)
        entries = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []))]
        for entry in entries:
            path = (kdir / entry).resolve()
            assert path.exists(), f"{kdir / entry} does not exist"
            referenced.add(path)
    files = {p.resolve() for d in (BASE, OVERLAY) for p in d.glob("*.yaml")}
    orphans = files - referenced - {BASE / "kustomization.yaml", OVERLAY / "kustomization.yaml"}
    assert not orphans, f"manifests no kustomization applies: {sorted(map(str, orphans))}"


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
@pytest.mark.parametrize("kdir", [BASE, OVERLAY], ids=["base", "example-overlay"])
def test_objects_match_kubernetes_schemas(kdir, version):
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    failures = []
    for doc in render(kdir):
        if is_crd_object(doc):
            continue  # no schema in kubernetes-validate: see the CRD tests below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{key(doc)}: {exc.message} at {list(exc.path)}")
    assert not failures, "\n".join(failures)


def test_schema_validation_rejects_unknown_fields():
    import kubernetes_validate

    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 1, "targetprot": 1}]}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


def router_container(docs: list[dict]) -> dict:
    (container,) = find(docs, "Deployment", "macp-router")["spec"]["template"]["spec"]["containers"]
    return container


def test_router_deployment_is_highly_available(base_docs):
    deployment = find(base_docs, "Deployment", "macp-router")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
        t["podAffinityTerm"]
        for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    ]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert any(t["labelSelector"]["matchLabels"].items() <= pod_labels.items() for t in terms), (
        "anti-affinity selects the router's own pods"
    )
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_router_probes_hit_healthz_and_readyz_on_metrics_port(base_docs):
    container = router_container(base_docs)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert named_port(container, get["port"]) == METRICS_PORT
    assert {p["containerPort"] for p in container["ports"]} == {GRPC_PORT, METRICS_PORT}


def test_router_drains_endpoints_before_sigterm(base_docs):
    pod = find(base_docs, "Deployment", "macp-router")["spec"]["template"]["spec"]
    command = router_container(base_docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = float(router_env(base_docs)["MACP_ROUTER_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + grace


def test_router_runs_non_root_with_read_only_root(base_docs, stages):
    pod = find(base_docs, "Deployment", "macp-router")["spec"]["template"]["spec"]
    container = router_container(base_docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    (user,) = final_stage_steps(stages, "USER")
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def router_env(docs: list[dict]) -> dict[str, str]:
    """The router container's environment: envFrom ConfigMaps/Secrets, then env values."""
    container = router_container(docs)
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(find(docs, "Secret", source["secretRef"]["name"])["stringData"])
    env.update({e["name"]: e.get("value", "") for e in container["env"]})
    return env


@pytest.mark.parametrize("docs", ["base_docs", "example_docs"])
def test_the_router_environment_is_a_valid_config_with_no_unknown_variable(
    request, docs, tmp_path
):
    from router.cli import build_parser
    from router.config import config_from_options
    from router.settings import unknown_variables

    env = router_env(request.getfixturevalue(docs))
    assert unknown_variables(env) == []
    ca = tmp_path / "ca.crt"  # mounted from a Secret in the pod; a stand-in file here
    ca.write_text("stand-in")
    env["MACP_ROUTER_POD_CA"] = str(ca)
    config = config_from_options(vars(build_parser(env).parse_args(["serve"])), env)
    assert config.pods_dns and config.token and config.redis_url and config.pod_ca == str(ca)


def test_router_listens_where_the_service_and_probes_point(base_docs):
    env = router_env(base_docs)
    assert env["MACP_ROUTER_LISTEN"].endswith(f":{GRPC_PORT}")
    assert env["MACP_ROUTER_METRICS_LISTEN"].endswith(f":{METRICS_PORT}")
    container = router_container(base_docs)
    service = find(base_docs, "Service", "macp-router")
    ports = {p["name"]: (p["port"], named_port(container, p["targetPort"]))
             for p in service["spec"]["ports"]}  # fmt: skip
    assert ports == {"grpc": (GRPC_PORT, GRPC_PORT), "metrics": (METRICS_PORT, METRICS_PORT)}
    pod_labels = find(base_docs, "Deployment", "macp-router")["spec"]["template"]["metadata"]
    assert service["spec"]["selector"].items() <= pod_labels["labels"].items()


def test_router_finds_runtime_pods_through_the_headless_service(base_docs):
    headless = find(base_docs, "Service", "macp-runtime-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    statefulset = find(base_docs, "StatefulSet", "macp-runtime")
    assert statefulset["spec"]["serviceName"] == "macp-runtime-headless"
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    (runtime,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in runtime["ports"]} == {GRPC_PORT}
    container = router_container(base_docs)
    namespace_var = next(e for e in container["env"] if e["name"] == "POD_NAMESPACE")
    assert namespace_var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert router_env(base_docs)["MACP_ROUTER_PODS_DNS"] == (
        f"macp-runtime-headless.$(POD_NAMESPACE).svc.cluster.local:{GRPC_PORT}"
    )


def test_router_observer_token_is_an_observer_on_the_runtime(base_docs):
    token = router_env(base_docs)["MACP_ROUTER_TOKEN"]
    runtime_auth = find(base_docs, "Secret", "macp-runtime-auth")["stringData"]
    identities = json.loads(runtime_auth["MACP_AUTH_TOKENS_JSON"])
    (router_identity,) = [i for i in identities if i["token"] == token]
    assert router_identity["is_observer"] is True


def test_secrets_hold_only_marked_placeholders(base_docs):
    secrets = [d for d in base_docs if d["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret, "placeholders are readable stringData"
        for name, value in secret["stringData"].items():
            assert "CHANGE-ME" in value, f"{secret['metadata']['name']}/{name}"


def test_autoscaler_and_disruption_budgets_cover_router_and_runtime(base_docs):
    hpa = find(base_docs, "HorizontalPodAutoscaler", "macp-router")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "macp-router"
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    for name in ("macp-router", "macp-runtime"):
        pdb = find(base_docs, "PodDisruptionBudget", name)
        owner = "Deployment" if name == "macp-router" else "StatefulSet"
        labels = find(base_docs, owner, name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_example_overlay_wires_namespace_redis_and_images(example_docs):
    namespaced = [d for d in example_docs if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"macp"}
    find(example_docs, "Namespace", "macp")
    # The store fails over by itself: the URL names the sentinels of a 3-pod StatefulSet (one
    # per pod, through its headless Service), and their master group, as the router parses it.
    from router.redis_topology import SENTINEL, parse_url

    target = parse_url(router_env(example_docs)["MACP_ROUTER_REDIS_URL"])
    assert target.kind == SENTINEL and target.master and len(target.nodes) == 3
    redis = find(example_docs, "StatefulSet", "macp-router-redis")
    assert redis["spec"]["replicas"] == 3
    headless = find(example_docs, "Service", redis["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = {p["containerPort"] for c in containers(redis) for p in c["ports"]}
    assert {port for _host, port in target.nodes} <= ports and 6379 in ports
    pods = {f"macp-router-redis-{i}.{headless['metadata']['name']}" for i in range(3)}
    assert {host for host, _port in target.nodes} == pods
    scripts = find(example_docs, "ConfigMap", "macp-router-redis-scripts")["data"]
    assert f"sentinel monitor {target.master} " in scripts["sentinel.sh"]
    assert find(example_docs, "StatefulSet", "macp-runtime")["spec"]["replicas"] == 3
    images = {c["image"] for d in example_docs for c in containers(d)}
    assert "macp-router:0.1.0" in images
    assert all(":" in image for image in images)


# The two CRDs, checked by structure since kubernetes-validate has no schema for them.

METRIC_NAME = re.compile(r"\bmacp_router_[a-z0-9_]+")


def metric_base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in ROUTER_METRICS:
            return name.removesuffix(suffix)
    return name


def assert_promql_sane(expr: str) -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack.pop() == pairs[char], f"unbalanced: {expr}"
    assert not stack, f"unbalanced: {expr}"
    unknown = {metric_base(m) for m in METRIC_NAME.findall(expr)} - ROUTER_METRICS
    assert not unknown, f"not router metrics: {unknown} in {expr}"


def test_servicemonitor_scrapes_the_router_metrics_port(base_docs):
    monitor = find(base_docs, "ServiceMonitor", "macp-router")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = find(base_docs, "Service", "macp-router")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    relabel = endpoint["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "router_pod"} in relabel
    assert {"action": "labeldrop", "regex": "pod"} in relabel, "`pod` means the runtime pod"


def alert_rules(docs: list[dict]) -> dict[str, dict]:
    rule = find(docs, "PrometheusRule", "macp-router")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert all(set(r) <= {"alert", "expr", "for", "labels", "annotations"} for r in rules)
    return {r["alert"]: r for r in rules}


def test_prometheus_rules_define_the_required_alerts(base_docs):
    alerts = alert_rules(base_docs)
    for name, fragment in REQUIRED_ALERTS.items():
        assert fragment in " ".join(alerts[name]["expr"].split()), name
    assert alerts["MacpRouterFeedDown"]["for"] == "2m"
    for name, rule in alerts.items():
        assert_promql_sane(rule["expr"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys(), name


def test_overlay_labels_monitoring_objects_for_prometheus_operator(example_docs):
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert "release" in find(example_docs, kind, "macp-router")["metadata"]["labels"]


def test_overlay_sets_the_runbook_base_url_of_every_alert(example_docs):
    rule = copy.deepcopy(find(example_docs, "PrometheusRule", "macp-router"))
    rule["metadata"]["annotations"]["macp-router/runbook-base-url"] = "https://wiki.example/ops"
    overlay = kustomization(OVERLAY)
    replace([rule], overlay["replacements"][0])
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert urls and all(re.fullmatch(r"https://wiki\.example/ops#runbook-[a-z-]+", u)
                        for u in urls), urls


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: "
                    "the overlay is rendered by this file's minimal kustomize only")
def test_minimal_kustomize_renders_what_kubectl_kustomize_renders(example_docs):
    result = run(["kubectl", "kustomize", str(OVERLAY)], timeout=60)
    if result.returncode != 0 and "kustomize" not in result.stderr.lower():
        pytest.skip(f"kubectl cannot run kustomize here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    rendered = {key(d): d for d in yaml.safe_load_all(result.stdout) if d}
    ours = find(example_docs, "PrometheusRule", "macp-router")
    assert rendered[("PrometheusRule", "macp-router")]["spec"] == ours["spec"]


# -- Grafana dashboard -------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_dashboard_shows_every_router_metric():
    exprs = dashboard_exprs()
    for expr in exprs:
        assert_promql_sane(expr)
        assert 'namespace=~"$namespace"' in expr, expr
    used = {metric_base(m) for expr in exprs for m in METRIC_NAME.findall(expr)}
    assert used == ROUTER_METRICS


def test_router_code_defines_the_metrics_the_manifests_use():
    source = ROOT / "router" / "metrics.py"
    if not source.exists():
        pytest.skip("router/metrics.py not written yet")
    text = source.read_text()
    for metric in sorted(ROUTER_METRICS):
        stem = metric.removeprefix("macp_router_").removesuffix("_total")
        assert re.search(rf"[\"']macp_router_{stem}(_total)?[\"']", text), metric


# -- docs/operations.md ------------------------------------------------------------------------


def heading_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_operations_guide_covers_deploy_metrics_alerts_and_variables(base_docs):
    text = OPERATIONS.read_text()
    assert "kubectl apply -k k8s/overlays/example" in text
    for needle in sorted(
        ROUTER_METRICS | configured_router_variables() | set(alert_rules(base_docs))
    ):
        assert needle in text, f"docs/operations.md does not mention {needle}"
    anchors = heading_anchors(text)
    for name, rule in alert_rules(base_docs).items():
        url, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert url.endswith("/docs/operations.md") and anchor in anchors, f"{name}: {anchor}"
    for runbook in ("session-not-found", "unavailable", "store-degraded", "feed-down"):
        assert f"runbook-{runbook}" in anchors
