"""Deployment artefacts: settings reference, check --deploy, manifests, nginx, metrics, logs."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
# every deployment serves the portal the same way (portal/web.py), behind nginx
WEB_COMMAND = [
    "python",
    "-m",
    "portal.web",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
    "--proxy-headers",
]
ENV_HELPERS = {"env_str", "env_bool", "env_int", "env_list"}


# ---- settings reference ---------------------------------------------------------------------


def _literal_env_names(tree: ast.AST) -> set[str]:
    """Names in env_*("X"), os.environ.get/setdefault("X"), os.getenv("X"), os.environ["X"]."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            func = node.func
            is_helper = isinstance(func, ast.Name) and func.id in ENV_HELPERS
            is_os = isinstance(func, ast.Attribute) and (
                func.attr == "getenv"
                or (
                    func.attr in ("get", "setdefault")
                    and isinstance(func.value, ast.Attribute)
                    and func.value.attr == "environ"
                )
            )
            if (is_helper or is_os) and isinstance(first, ast.Constant):
                names.add(str(first.value))
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "environ"
            and isinstance(node.slice, ast.Constant)
        ):
            names.add(str(node.slice.value))
    return names


def portal_env_names() -> set[str]:
    names: set[str] = set()
    for path in sorted((REPO / "portal").rglob("*.py")):
        names |= _literal_env_names(ast.parse(path.read_text(), filename=str(path)))
    return names


def documented_names() -> set[str]:
    """First-column names of the tables in deploy/SETTINGS.md."""
    text = (DEPLOY / "SETTINGS.md").read_text()
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", text, flags=re.MULTILINE))


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_settings_scan_finds_the_core_settings():
    names = portal_env_names()
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "LOG_FORMAT", "METRICS_TOKEN"} <= names


def test_every_environment_variable_the_portal_reads_is_documented():
    missing = sorted(portal_env_names() - documented_names())
    assert not missing, f"add these to deploy/SETTINGS.md: {missing}"


def test_production_env_only_sets_documented_settings_the_portal_reads():
    production = read_env_file(DEPLOY / "production.env")
    unknown = sorted(set(production) - portal_env_names())
    assert not unknown, f"production.env sets variables the portal never reads: {unknown}"
    assert set(production) <= documented_names()


def test_configmap_matches_production_env():
    production = read_env_file(DEPLOY / "production.env")
    configmap = yaml.safe_load((K8S / "configmap.yaml").read_text())
    assert configmap["data"] == production


def test_deployment_variables_of_compose_and_scripts_are_documented():
    used: set[str] = set()
    for name in ("compose.yaml", "run-local-prod.sh", "nginx.conf"):
        text = (DEPLOY / name).read_text()
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::?[-?][^}]*)?\}", text))
    script_only = {"BASH_SOURCE", "SERVICES", "STOP_TIMEOUT"}
    missing = sorted(used - script_only - documented_names())
    assert not missing, f"add these to deploy/SETTINGS.md: {missing}"


# ---- manage.py check --deploy -------------------------------------------------------------


def _check_env(extra: dict[str, str]) -> dict[str, str]:
    keep = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT"}
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"OMP_WAIT_POLICY": "PASSIVE", "DJANGO_SETTINGS_MODULE": "portal.settings"})
    env.update(extra)
    return env


def _production_check_env(tmp_path: Path) -> dict[str, str]:
    production = read_env_file(DEPLOY / "production.env")
    production["LOWMAG_DATA_DIR"] = str(tmp_path / "data")
    secret_file = tmp_path / "secret_key"
    secret_file.write_text(secrets.token_urlsafe(50))
    production["SECRET_KEY_FILE"] = str(secret_file)
    production["METRICS_TOKEN"] = secrets.token_urlsafe(32)
    return _check_env(production)


def _manage(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_security_is_clean_with_documented_production_env(tmp_path):
    result = _manage(["check", "--deploy", "--tag", "security"], _production_check_env(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues" in output, output


def test_check_deploy_is_clean_with_documented_production_env(tmp_path):
    result = _manage(
        ["check", "--deploy", "--fail-level", "WARNING"], _production_check_env(tmp_path)
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues" in output, output


def test_check_deploy_flags_the_embedded_defaults(tmp_path):
    env = _check_env({"LOWMAG_DATA_DIR": str(tmp_path / "data")})
    result = _manage(["check", "--deploy", "--tag", "security"], env)
    output = result.stdout + result.stderr
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in output, output


def test_production_refuses_to_start_without_secret_key(tmp_path):
    env = _check_env({"LOWMAG_PRODUCTION": "true", "LOWMAG_DATA_DIR": str(tmp_path / "data")})
    result = _manage(["check"], env)
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


# ---- Kubernetes ---------------------------------------------------------------------------


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_kubernetes_manifest_validates_against_the_kubernetes_schema(name):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)"
    )
    if name == "kustomization.yaml":
        kustomization = yaml.safe_load((K8S / name).read_text())
        listed = set(kustomization["resources"])
        assert listed <= {p.name for p in K8S.glob("*.yaml")}
        assert "secret.example.yaml" not in listed
        return
    version = kubernetes_validate.latest_version()
    for doc in yaml.safe_load_all((K8S / name).read_text()):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_schema_validation_rejects_a_broken_deployment():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    web = next(d for _, d in k8s_documents() if d["metadata"]["name"] == "lowmag-web")
    broken = json.loads(json.dumps(web))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def _by_kind_name() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}


def test_kubernetes_set_has_every_piece_of_the_topology():
    objects = _by_kind_name()
    for key in [
        ("Namespace", "lowmag"),
        ("ConfigMap", "lowmag-settings"),
        ("Secret", "lowmag-secrets"),
        ("PersistentVolumeClaim", "lowmag-slides"),
        ("Deployment", "lowmag-web"),
        ("Service", "lowmag-web"),
        ("Deployment", "lowmag-worker-gpu"),
        ("Deployment", "lowmag-worker-cpu"),
        ("Deployment", "lowmag-nginx"),
        ("Service", "lowmag-nginx"),
        ("Ingress", "lowmag"),
        ("Job", "lowmag-migrate"),
    ]:
        assert key in objects, f"missing {key}"
    assert objects[("PersistentVolumeClaim", "lowmag-slides")]["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def _container(objects, name: str) -> dict:
    return objects[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]


def test_only_nginx_reaches_the_web_pods_whose_forwarded_headers_are_believed():
    objects = _by_kind_name()
    web = _container(objects, "lowmag-web")
    env = {e["name"]: e.get("value") for e in web.get("env", [])}
    assert env["LOWMAG_FORWARDED_ALLOW_IPS"] == "*" and "--proxy-headers" in web["command"]
    policy = objects[("NetworkPolicy", "lowmag-web-from-nginx")]["spec"]
    web_labels = objects[("Deployment", "lowmag-web")]["spec"]["template"]["metadata"]["labels"]
    nginx_labels = objects[("Deployment", "lowmag-nginx")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= web_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= nginx_labels.items()
    assert [p["port"] for p in rule["ports"]] == [8000]


def test_web_probes_healthz_and_workers_consume_their_queues():
    objects = _by_kind_name()
    web = _container(objects, "lowmag-web")
    assert web["command"] == WEB_COMMAND
    for probe in ("readinessProbe", "livenessProbe"):
        assert web[probe]["httpGet"]["path"] == "/healthz"
    gpu = _container(objects, "lowmag-worker-gpu")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["command"][gpu["command"].index("-Q") + 1] == "gpu"
    assert gpu["command"][gpu["command"].index("-c") + 1] == "1"
    cpu = _container(objects, "lowmag-worker-cpu")
    assert cpu["command"][cpu["command"].index("-Q") + 1] == "cpu"
    for name in ("lowmag-web", "lowmag-worker-gpu", "lowmag-worker-cpu"):
        spec = objects[("Deployment", name)]["spec"]["template"]["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["lowmag-slides"]
        assert spec["securityContext"]["runAsNonRoot"] is True


# ---- compose ------------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)"
        )
    result = subprocess.run(
        [*command, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOWMAG_HOSTNAME": "lowmag.example.org"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_topology_has_gpu_and_cpu_workers_on_a_shared_slides_volume():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "web", "worker-gpu", "worker-cpu", "nginx"} <= set(
        services
    )
    gpu = services["worker-gpu"]
    assert gpu["command"][gpu["command"].index("-Q") + 1] == "gpu"
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert (
        services["worker-cpu"]["command"][services["worker-cpu"]["command"].index("-Q") + 1]
        == "cpu"
    )
    assert services["web"]["command"] == WEB_COMMAND
    assert services["web"]["environment"]["LOWMAG_FORWARDED_ALLOW_IPS"] == "*"
    assert "ports" not in services["web"]  # only nginx reaches it: forwarded headers believed
    for name in ("web", "worker-gpu", "worker-cpu", "migrate"):
        assert "slides:/data" in services[name]["volumes"]
    assert "slides" in compose["volumes"]


def test_dockerfile_builds_frontend_then_a_non_root_web_server_image():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE)
    assert stages[:3] == ["frontend", "app", "nginx"] and stages[-1] == "portal"
    assert "npm ci" in text and "npm run build" in text
    assert "ARG TORCH_VARIANT=cpu" in text and "cuda)" in text
    assert "pip install ." in text and "collectstatic" in text
    assert re.search(r"^USER 10001", text, flags=re.MULTILINE)
    cmd = re.findall(r"^CMD (\[.*\])$", text, flags=re.MULTILINE)
    assert json.loads(cmd[0]) == WEB_COMMAND  # the portal stage's default: the web server


# ---- nginx --------------------------------------------------------------------------------


def render_nginx_template(values: dict[str, str]) -> str:
    text = (DEPLOY / "nginx.conf").read_text()
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    assert "${" not in text, "unfilled placeholder in deploy/nginx.conf"
    return text


def _location(conf: str, prefix: str) -> str:
    match = re.search(r"location\s+" + re.escape(prefix) + r"\s*\{(.*?)\n    \}", conf, re.DOTALL)
    assert match, f"no location {prefix}"
    return match.group(1)


def test_nginx_streams_uploads_and_upgrades_websockets():
    conf = render_nginx_template(
        {
            "NGINX_LISTEN": "8080",
            "LOWMAG_UPSTREAM": "web:8000",
            "LOWMAG_STATIC_ROOT": "/static",
            "NGINX_INCLUDE_DIR": "/etc/nginx/lowmag.d",
        }
    )
    uploads = _location(conf, "/api/v1/uploads/")
    assert "client_max_body_size 0;" in uploads and "proxy_request_buffering off;" in uploads
    websockets = _location(conf, "/ws/")
    assert "Upgrade $http_upgrade" in websockets
    assert "deny all;" in _location(conf, "= /metrics")


def test_nginx_accepts_the_rendered_configuration(tmp_path):
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    (tmp_path / "static").mkdir()
    (tmp_path / "lowmag.d").mkdir()
    server = render_nginx_template(
        {
            "NGINX_LISTEN": "127.0.0.1:1",
            "LOWMAG_UPSTREAM": "127.0.0.1:2",
            "LOWMAG_STATIC_ROOT": str(tmp_path / "static"),
            "NGINX_INCLUDE_DIR": str(tmp_path / "lowmag.d"),
        }
    )
    (tmp_path / "lowmag.conf").write_text(server)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;\n"
        f"include {tmp_path}/lowmag.conf; }}\n"
    )
    result = subprocess.run(
        [
            nginx,
            "-t",
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-c",
            str(tmp_path / "nginx.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# ---- metrics ------------------------------------------------------------------------------


def _job(state: str, seconds: float | None, n: int):
    from django.utils import timezone

    from portal.analyses.models import AnalysisJob, ModelVersion
    from portal.cases.models import Case, Cohort, Slide

    cohort, _ = Cohort.objects.get_or_create(name="metrics")
    case = Case.objects.create(cohort=cohort, patient_id="p", accession_number=f"A{n}")
    slide = Slide.objects.create(case=case, original_name=f"s{n}.svs")
    model, _ = ModelVersion.objects.get_or_create(
        name="m",
        version="1",
        defaults=dict(task="t", magnification=5.0, bundle_path="/b", sha256="0" * 64),
    )
    started = timezone.now() - timedelta(hours=1)
    finished = started + timedelta(seconds=seconds) if seconds is not None else None
    return AnalysisJob.objects.create(
        slide=slide,
        model_version=model,
        idempotency_key=f"k{n}",
        state=state,
        started_at=started if seconds is not None or state == "running" else None,
        finished_at=finished,
    )


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in:\n{text}")


@pytest.mark.django_db
def test_metrics_count_jobs_by_state_and_histogram_their_durations(client, settings):
    settings.METRICS_TOKEN = "t0ken"
    _job("queued", None, 1)
    _job("running", None, 2)
    _job("succeeded", 3.0, 3)
    _job("succeeded", 45.0, 4)
    _job("failed", 700.0, 5)
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer t0ken")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.content.decode()
    assert _sample(text, 'lowmag_analysis_jobs{state="queued"}') == 1
    assert _sample(text, 'lowmag_analysis_jobs{state="running"}') == 1
    assert _sample(text, 'lowmag_analysis_jobs{state="succeeded"}') == 2
    assert _sample(text, 'lowmag_analysis_jobs{state="cancelled"}') == 0
    name = "lowmag_analysis_job_duration_seconds"
    assert _sample(text, f'{name}_bucket{{state="succeeded",le="2.5"}}') == 0
    assert _sample(text, f'{name}_bucket{{state="succeeded",le="5"}}') == 1
    assert _sample(text, f'{name}_bucket{{state="succeeded",le="60"}}') == 2
    assert _sample(text, f'{name}_bucket{{state="succeeded",le="+Inf"}}') == 2
    assert _sample(text, f'{name}_sum{{state="succeeded"}}') == pytest.approx(48.0)
    assert _sample(text, f'{name}_bucket{{state="failed",le="600"}}') == 0
    assert _sample(text, f'{name}_count{{state="failed"}}') == 1


@pytest.mark.django_db
def test_metrics_need_the_bearer_token_when_one_is_set(client, settings):
    settings.METRICS_TOKEN = "t0ken"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer t0ken").status_code == 200


@pytest.mark.django_db
def test_metrics_without_token_answer_loopback_clients_only(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 401


@pytest.mark.django_db
def test_observed_tile_latencies_appear_as_a_histogram(client, settings):
    from portal.core import metrics

    settings.METRICS_TOKEN = ""
    metrics._tile_latency.reset()
    for seconds in (0.002, 0.004, 0.03, 0.2):
        metrics.observe_tile(seconds, "slide")
    metrics.observe_tile(0.007, "heatmap")
    metrics.observe_tile(float("nan"), "slide")  # ignored
    text = client.get("/metrics").content.decode()
    assert _sample(text, 'lowmag_tile_seconds_bucket{kind="slide",le="0.005"}') == 2
    assert _sample(text, 'lowmag_tile_seconds_bucket{kind="slide",le="0.05"}') == 3
    assert _sample(text, 'lowmag_tile_seconds_count{kind="slide"}') == 4
    assert _sample(text, 'lowmag_tile_seconds_bucket{kind="heatmap",le="0.01"}') == 1
    metrics._tile_latency.reset()


# ---- logs ---------------------------------------------------------------------------------


def test_json_formatter_writes_one_object_with_extras_and_the_exception():
    from portal.core.logging import JsonFormatter

    logger = logging.getLogger("lowmag.test")
    try:
        raise ValueError("bad slide")
    except ValueError:
        record = logger.makeRecord(
            "lowmag.test",
            logging.ERROR,
            __file__,
            1,
            "job %s failed",
            (7,),
            sys.exc_info(),
            extra={"job_id": 7, "slide": Path("/x.svs")},
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line.strip() or line.count("\n") == line.strip().count("\\n")
    entry = json.loads(line)
    assert entry["message"] == "job 7 failed" and entry["level"] == "ERROR"
    assert entry["job_id"] == 7 and entry["slide"] == "/x.svs"
    assert "ValueError: bad slide" in entry["exception"]
    assert entry["time"].endswith("+00:00")


def test_log_format_json_makes_the_portal_log_json(tmp_path):
    code = "import django, logging; django.setup(); logging.getLogger('portal.x').warning('hello %s', 'json')"
    env = _check_env({"LOG_FORMAT": "json", "LOWMAG_DATA_DIR": str(tmp_path)})
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stderr.strip().splitlines()[-1])
    assert entry["message"] == "hello json" and entry["logger"] == "portal.x"


def test_unknown_log_format_is_refused(tmp_path):
    env = _check_env({"LOG_FORMAT": "xml", "LOWMAG_DATA_DIR": str(tmp_path)})
    result = _manage(["check"], env)
    assert result.returncode != 0 and "LOG_FORMAT" in result.stderr
