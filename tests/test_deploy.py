"""deploy/: what can be checked without a Docker daemon or a cluster.

Every YAML file parses; the Dockerfiles, compose files, Kubernetes manifest and systemd unit
agree with streamvi's own configuration (ports, out_dir, config path, command line); the
image's install recipe and entry point work in a plain venv; promtool, systemd-analyze and
``docker compose config`` check their files where those tools are installed; and
docs/configuration.md names every option with its current default.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from streamvi.cli.main import COMMANDS, build_parser
from streamvi.config import SERVICE_OPTIONS, ServiceConfig, load_config
from streamvi.config.render import toml_value
from streamvi.service.lifecycle import CHECKPOINT_NAME

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
EXAMPLE_TOML = DEPLOY / "streamvi.toml"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
K8S = DEPLOY / "kubernetes" / "streamvi.yaml"
UNIT = DEPLOY / "systemd" / "streamvi.service"
PROM = DEPLOY / "prometheus" / "prometheus.yml"
PROM_COMPOSE = DEPLOY / "prometheus" / "prometheus-compose.yml"
STOP_GRACE_S = 60       # SIGTERM -> publish + checkpoint, in every deployment


# ------------------------------------------------------------------------------ helpers

def example_config() -> ServiceConfig:
    return load_config(EXAMPLE_TOML, env={})


def port_of(endpoint: str) -> int:
    return int(urlsplit(endpoint).port)


def host_of(endpoint: str) -> str:
    return urlsplit(endpoint).netloc.rsplit(":", 1)[0].strip("[]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def service_ports(cfg: ServiceConfig) -> dict[str, int]:
    """Container ports the configuration binds: ingest, publish, metrics."""
    (listen,) = cfg.listen
    return {"ingest": port_of(listen), "publish": port_of(cfg.publish_endpoint),
            "metrics": cfg.metrics_port}


def parse_streamvi(argv: list[str]):
    """argv after ``streamvi``, parsed by the real CLI parser (exits on a bad flag)."""
    return build_parser().parse_args(argv)


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (DEPLOY / name).read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{name}: dangling line continuation"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[-1]:]


def one(instructions: list[tuple[str, str]], name: str) -> str:
    found = [a for i, a in instructions if i == name]
    assert len(found) == 1, f"expected one {name}, found {found}"
    return found[0]


def image_argv(name: str) -> list[str]:
    stage = final_stage(dockerfile(name))
    return json.loads(one(stage, "ENTRYPOINT")) + json.loads(one(stage, "CMD"))


def copies(instructions: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not ``--from``)."""
    out = []
    for ins, args in instructions:
        if ins != "COPY":
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def volume_mounts(svc: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of a compose service's short-syntax volumes."""
    out = {}
    for v in svc["volumes"]:
        m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(\w+))?", v)
        assert m, f"not a short-syntax volume: {v!r}"
        out[m.group(2)] = (m.group(1), m.group(3) or "rw")
    return out


def k8s_objects() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"one object per kind expected: {kinds}"
    return {d["kind"]: d for d in docs}


def k8s_container() -> dict:
    (container,) = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def unit() -> dict[str, dict[str, list[str]]]:
    """The systemd unit as section -> key -> values (keys may repeat, like Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), "keep unit lines unbroken (simpler to read and parse)"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a key=value line in a section: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_environment() -> dict[str, str]:
    env = {}
    for value in unit()["Service"].get("Environment", []):
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = v
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ YAML

@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in
                                        [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]))
def test_every_yaml_file_parses(path):
    docs = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ------------------------------------------------------------------------------ example config

def test_example_config_loads_and_binds_every_interface_only_with_curve():
    cfg = example_config()
    assert cfg.space_group and cfg.out_dir == Path("/data")
    for endpoint in cfg.listen:
        if not is_loopback(host_of(endpoint)):
            assert cfg.curve_secret_key and cfg.curve_allowed_clients, \
                f"{endpoint} is reachable from the network: CURVE keys must be configured"
    # keys live where every deployment mounts them
    assert PurePosixPath(cfg.curve_secret_key).parent == PurePosixPath("/etc/streamvi/keys/server")
    assert PurePosixPath(cfg.curve_allowed_clients) == PurePosixPath("/etc/streamvi/keys/producers")
    assert cfg.metrics_host == "0.0.0.0"       # inside a container: reachable by probes/Prometheus
    assert set(service_ports(cfg).values()) == {5555, 5556, 9108}


def test_prometheus_compose_override_only_changes_the_target():
    base, override = yaml.safe_load(PROM.read_text()), yaml.safe_load(PROM_COMPOSE.read_text())
    (job,) = [j for j in override["scrape_configs"] if j["job_name"] == "streamvi"]
    (static,) = job["static_configs"]
    assert static["targets"] == [f"streamvi:{example_config().metrics_port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # everything else as in prometheus.yml (owned beside it): keep them in step
    static["targets"] = ["localhost:9108"]
    assert override == base, "prometheus-compose.yml drifted from prometheus.yml beyond the target"


def test_promtool_accepts_the_compose_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does)")
    res = subprocess.run([promtool, "check", "config", str(PROM_COMPOSE)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------------------ Dockerfiles

@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_entry_point_is_the_service_with_the_example_config(name):
    argv = image_argv(name)
    assert argv[0] == "streamvi"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "streamvi" in scripts
    args = parse_streamvi(argv[1:])
    assert args.command == "serve" and args.config == Path("/etc/streamvi/streamvi.toml")
    # the config the CMD names is the example, copied into the image
    stage = final_stage(dockerfile(name))
    assert (["deploy/streamvi.toml"], str(args.config)) in copies(stage)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_volume_ports_user_and_stop_signal_match_the_config(name):
    cfg = example_config()
    stage = final_stage(dockerfile(name))
    volume = one(stage, "VOLUME")
    assert (json.loads(volume) if volume.startswith("[") else volume.split()) == [str(cfg.out_dir)]
    assert {int(p.split("/")[0]) for p in one(stage, "EXPOSE").split()} == \
        set(service_ports(cfg).values())
    uid, _, gid = one(stage, "USER").partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), \
        "USER must be numeric and non-root (Kubernetes runAsNonRoot checks it)"
    assert one(stage, "STOPSIGNAL") == "SIGTERM"
    # the Kubernetes pod runs as the same user
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)


def test_gpu_image_builds_on_cuda_pytorch_and_cpu_image_on_cpu_torch():
    gpu = dockerfile("Dockerfile")
    base = dict(a.split("=", 1) for i, a in gpu if i == "ARG" and "=" in a)["BASE_IMAGE"]
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and "runtime" in base
    assert final_stage(gpu)[0] == ("FROM", "${BASE_IMAGE}")
    assert any("--system-site-packages" in a for i, a in final_stage(gpu) if i == "RUN")
    cpu = dockerfile("Dockerfile.cpu")
    args = dict(a.split("=", 1) for i, a in cpu if i == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert any('--index-url "$TORCH_INDEX_URL"' in a for i, a in final_stage(cpu) if i == "RUN")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_exist_and_pass_its_dockerignore(name):
    patterns = [ln.strip() for ln in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "the ignore file is an allow-list"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    for sources, _dest in copies(dockerfile(name)):
        for src in sources:
            assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository"
            parts = PurePosixPath(src).parts
            assert any("/".join(parts[:i]) in allowed for i in range(1, len(parts) + 1)), \
                f"{name}: COPY {src} is excluded by {name}.dockerignore"


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        code = 200 if self.path == "/metrics" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_probes_metrics_with_plain_python(name):
    stage = final_stage(dockerfile(name))
    health = one(stage, "HEALTHCHECK")
    options, _, cmd = health.partition(" CMD ")
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"] and "curl" not in health
    assert "/metrics" in argv[2] and f"'{example_config().metrics_port}'" in argv[2]
    assert "--start-period" in options
    server = HTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "STREAMVI_METRICS_PORT": str(server.server_port)}
        ok = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True,
                            timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
        server.server_close()
    env = {**os.environ, "STREAMVI_METRICS_PORT": str(free_port())}
    down = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True,
                          timeout=30)
    assert down.returncode != 0


@pytest.mark.slow
def test_image_install_recipe_and_entry_point_work_in_a_plain_venv(tmp_path):
    """Copy what deploy/Dockerfile's build stage COPYs, build and install it into a fresh venv
    as the image does, and run the entry point.  Offline: torch, pip and the build backend come
    from this interpreter's site-packages, made visible to the venv by a .pth file."""
    src = tmp_path / "image"
    for sources, dest in copies(dockerfile("Dockerfile")):
        if not dest.startswith("/src"):
            continue
        for s in sources:
            target = src / dest.lstrip("/")
            if (REPO / s).is_dir():
                shutil.copytree(REPO / s, target, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.egg-info", "build"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / s, target / Path(s).name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True, timeout=30).strip())
    # in this interpreter's order: a CI venv's own packages before the base Python's
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                          *(p for p in sys.path if p.endswith(("site-packages",
                                                                "dist-packages")))])
    (purelib / "_outer_site.pth").write_text("\n".join(ours) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--no-build-isolation", str(src / "src")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr

    exe = venv / "bin" / "streamvi"
    # the console script runs the venv's interpreter (line 2 when pip wraps a long path)
    assert str(py) in "\n".join(exe.read_text().splitlines()[:3])
    top = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("usage: streamvi") and all(c in top.stdout for c in COMMANDS)
    serve = subprocess.run([str(exe), "serve", "--help"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert serve.returncode == 0, serve.stderr
    assert serve.stdout.startswith("usage: streamvi serve")
    assert all("--" + o.name.replace("_", "-") in serve.stdout for o in SERVICE_OPTIONS)
    # the package, its plugins and its data files come from the venv, not from this checkout
    probe = ("import json, importlib.resources as r\n"
             "import streamvi, streamvi_sim, streamvi_crystfel, streamvi_dials\n"
             "mods = (streamvi, streamvi_sim, streamvi_crystfel, streamvi_dials)\n"
             "static = r.files('streamvi.publish') / 'static'\n"
             "print(json.dumps({'files': [m.__file__ for m in mods], 'static':"
             " sorted(e.name for e in static.iterdir()) if static.is_dir() else []}))")
    res = subprocess.run([str(py), "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout.splitlines()[-1])
    assert all(Path(f).is_relative_to(venv) for f in found["files"]), found["files"]
    shipped = sorted(p.name for p in (REPO / "streamvi" / "publish" / "static").iterdir()
                     if p.is_file())
    assert found["static"] == shipped, (
        "the status page's files (streamvi/publish/static) are missing from the installed "
        "package: pyproject.toml needs [tool.setuptools.package-data] "
        "\"streamvi.publish\" = [\"static/*\"]")


# ------------------------------------------------------------------------------ compose

def test_compose_streamvi_service_matches_the_image_and_config():
    c = compose()
    assert set(c["services"]) == {"streamvi", "prometheus", "grafana"}
    cfg = example_config()
    svc = c["services"]["streamvi"]
    build = svc["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert build["dockerfile"] == "deploy/Dockerfile.cpu"
    argv = ["streamvi", *svc["command"]]
    assert argv == image_argv("Dockerfile.cpu")
    config_path = str(parse_streamvi(argv[1:]).config)
    mounts = volume_mounts(svc)
    assert mounts[config_path] == ("./streamvi.toml", "ro")
    data_source, _ = mounts[str(cfg.out_dir)]
    assert data_source in c["volumes"], "out_dir must be a declared named volume"
    keys_source, keys_mode = mounts["/etc/streamvi/keys"]
    assert keys_mode == "ro" and keys_source == "${STREAMVI_KEYS_DIR:-./keys}"
    for key_path in (cfg.curve_secret_key, cfg.curve_allowed_clients):
        assert PurePosixPath(key_path).is_relative_to("/etc/streamvi/keys")
    published = {}
    for p in svc["ports"]:
        *host, container = str(p).split(":")
        published[int(container)] = host
    ports = service_ports(cfg)
    assert set(published) == set(ports.values())
    for name in ("publish", "metrics"):      # unauthenticated: host loopback only
        assert published[ports[name]][0] == "127.0.0.1", name
    assert svc["stop_signal"] == "SIGTERM" and svc["stop_grace_period"] == f"{STOP_GRACE_S}s"
    for env_name in svc.get("environment", {}):
        assert env_name.removeprefix("STREAMVI_").lower() in {o.name for o in SERVICE_OPTIONS}


def test_compose_prometheus_scrapes_streamvi_by_service_name():
    c = compose()
    prom = c["services"]["prometheus"]
    assert prom["image"].startswith("prom/prometheus:")
    mounts = {target: source for target, (source, _) in volume_mounts(prom).items()}
    (flag,) = [a for a in prom["command"] if a.startswith("--config.file=")]
    config_path = PurePosixPath(flag.split("=", 1)[1])
    source = mounts[str(config_path.parent)]
    assert (DEPLOY / source / config_path.name).resolve() == PROM_COMPOSE
    job = yaml.safe_load(PROM_COMPOSE.read_text())["scrape_configs"][0]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in c["services"] and int(port) == example_config().metrics_port
    for source in mounts.values():
        assert (DEPLOY / source).exists() if source.startswith("./") else source in c["volumes"]


def test_compose_grafana_provisions_the_repo_dashboards_for_anonymous_viewers():
    c = compose()
    graf = c["services"]["grafana"]
    assert graf["image"].startswith("grafana/grafana")
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {target: source for target, (source, _) in volume_mounts(graf).items()}
    for source in mounts.values():
        if source.startswith("./"):
            assert (DEPLOY / source).is_dir(), f"{source} does not exist in deploy/"
        else:
            assert source in c["volumes"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    for sub in ("datasources", "dashboards"):
        assert (DEPLOY / mounts[f"/etc/grafana/provisioning/{sub}"]).resolve() == \
            provisioning / sub
    # the dashboard provider reads the folder the dashboards are mounted in
    for f in (provisioning / "dashboards").glob("*.y*ml"):
        for provider in yaml.safe_load(f.read_text())["providers"]:
            path = provider["options"]["path"]
            assert (DEPLOY / mounts[path]).resolve() == DEPLOY / "grafana" / "dashboards"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, name = str(PurePosixPath(home).parent), PurePosixPath(home).name
    assert (DEPLOY / mounts[folder] / name).is_file()
    # the datasource points at the compose Prometheus
    for f in (provisioning / "datasources").glob("*.y*ml"):
        for ds in yaml.safe_load(f.read_text())["datasources"]:
            url = urlsplit(ds["url"])
            assert url.hostname in c["services"] and url.port == 9090


def test_compose_gpu_override_swaps_in_the_cuda_image_and_reserves_a_gpu():
    base, gpu = compose(), compose(COMPOSE_GPU)
    assert set(gpu["services"]) <= set(base["services"])
    svc = gpu["services"]["streamvi"]
    assert (DEPLOY / svc["build"]["context"]).resolve() == REPO
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count", 1) == 1
    assert load_config(EXAMPLE_TOML, env=svc["environment"]).device == "cuda"


def test_docker_compose_config_accepts_the_files():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True,
                      timeout=30).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test"}
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)]):
        res = subprocess.run([docker, "compose", *files, "config", "--quiet"], env=env,
                             capture_output=True, text=True, timeout=60, cwd=DEPLOY)
        assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------ Kubernetes

def test_kubernetes_objects_and_deployment_shape():
    objs = k8s_objects()
    assert set(objs) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    dep = objs["Deployment"]["spec"]
    assert dep["replicas"] == 1
    assert dep["strategy"]["type"] == "Recreate"      # the spool directory has one writer
    pod = dep["template"]["spec"]
    assert dep["selector"]["matchLabels"].items() <= dep["template"]["metadata"]["labels"].items()
    assert pod["terminationGracePeriodSeconds"] == STOP_GRACE_S
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = k8s_container()
    res = c["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 1
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), kind
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_kubernetes_config_map_is_the_example_config_on_cuda(tmp_path):
    cm = k8s_objects()["ConfigMap"]
    f = tmp_path / "streamvi.toml"
    f.write_text(cm["data"]["streamvi.toml"])
    cfg = load_config(f, env={})      # raises on any unknown key
    example = example_config()
    assert cfg.device == "cuda"
    differ = {k for k in cfg.values if cfg.values[k] != example.values[k]}
    assert differ == {"device"}, f"ConfigMap and deploy/streamvi.toml drifted apart: {differ}"
    # both spell out the same keys (neither leans on a default the other overrides)
    assert _toml_keys(f) == _toml_keys(EXAMPLE_TOML)


def _toml_keys(path: Path) -> set[str]:
    keys = set()
    for k, v in tomllib.loads(path.read_text()).items():
        keys |= set(v) if isinstance(v, dict) else {k}
    return keys


def _k8s_config(tmp_path) -> ServiceConfig:
    f = tmp_path / "cm.toml"
    f.write_text(k8s_objects()["ConfigMap"]["data"]["streamvi.toml"])
    return load_config(f, env={})


def test_kubernetes_ports_and_probes_follow_the_config(tmp_path):
    cfg = _k8s_config(tmp_path)
    c = k8s_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == service_ports(cfg)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/metrics", probe
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == cfg.metrics_port, probe
        # a scrape may wait 5 s for the service lock (streamvi.publish.metrics)
        assert c[probe]["timeoutSeconds"] > 5, probe
    ann = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == cfg.metrics_port
    assert ann["prometheus.io/path"] == "/metrics"
    svc = k8s_objects()["Service"]["spec"]
    pod_labels = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= pod_labels.items()
    assert {p["name"]: (p["port"], ports[p["targetPort"]]) for p in svc["ports"]} == \
        {name: (port, port) for name, port in ports.items()}


def test_kubernetes_volumes_hold_out_dir_config_and_keys(tmp_path):
    cfg = _k8s_config(tmp_path)
    objs = k8s_objects()
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in k8s_container()["volumeMounts"]}
    data = volumes[mounts[str(cfg.out_dir)]["name"]]
    assert data["persistentVolumeClaim"]["claimName"] == \
        objs["PersistentVolumeClaim"]["metadata"]["name"]
    args = parse_streamvi(k8s_container()["args"])
    assert args.command == "serve"
    config_mount = mounts[str(args.config)]
    assert volumes[config_mount["name"]]["configMap"]["name"] == \
        objs["ConfigMap"]["metadata"]["name"]
    assert config_mount["subPath"] in objs["ConfigMap"]["data"]
    server = mounts[str(PurePosixPath(cfg.curve_secret_key).parent)]
    producers = mounts[cfg.curve_allowed_clients]
    for m in (server, producers, config_mount):
        assert m["readOnly"] is True
        assert "secret" in volumes[m["name"]] or "configMap" in volumes[m["name"]]
    # the image's entry point runs these args
    assert image_argv("Dockerfile")[1:] == k8s_container()["args"]


def test_kubernetes_manifest_matches_the_api_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not "
                             "installed (pip install kubernetes-validate: offline API schemas)")
    for doc in yaml.safe_load_all(K8S.read_text()):
        if doc:     # strict: an unknown field (a typo) is an error
            kv.validate(doc, kv.latest_version(), strict=True)


# ------------------------------------------------------------------------------ systemd

def test_systemd_unit_runs_the_service_from_the_venv():
    u = unit()
    svc = {k: v[-1] for k, v in u["Service"].items()}
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "/opt/streamvi/venv/bin/streamvi"
    args = parse_streamvi(argv[1:])
    assert args.command == "serve" and args.config == Path("/etc/streamvi/streamvi.toml")
    assert svc["Type"] == "simple" and svc["User"] == "streamvi"
    assert svc["KillSignal"] == "SIGTERM" and int(svc["TimeoutStopSec"]) == STOP_GRACE_S
    assert svc["Restart"] == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes"}.items():
        assert svc[key] == value, key
    assert "PrivateDevices" not in svc, "PrivateDevices hides the GPU"
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_environment_moves_out_dir_to_the_writable_state_dir():
    env = unit_environment()
    known = {"STREAMVI_" + o.name.upper() for o in SERVICE_OPTIONS}
    assert {k for k in env if k.startswith("STREAMVI_")} <= known
    cfg = load_config(EXAMPLE_TOML, env=env)
    writable = [Path(p) for v in unit()["Service"]["ReadWritePaths"] for p in v.split()]
    assert any(cfg.out_dir == p or cfg.out_dir.is_relative_to(p) for p in writable)
    assert Path("/var/lib") / unit()["Service"]["StateDirectory"][-1] == cfg.out_dir
    assert is_loopback(cfg.metrics_host)


def test_systemd_analyze_verify_finds_nothing(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists: point it at one that does
    copy = tmp_path / "streamvi.service"
    copy.write_text(UNIT.read_text().replace("/opt/streamvi/venv/bin/streamvi",
                                             shutil.which("true") or "/bin/true"))
    res = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True,
                         timeout=60)
    about_unit = [ln for ln in (res.stdout + res.stderr).splitlines() if copy.name in ln]
    assert res.returncode == 0 and not about_unit, res.stdout + res.stderr


def test_every_deployment_gives_the_checkpoint_the_same_time_to_finish():
    assert int(unit()["Service"]["TimeoutStopSec"][-1]) == STOP_GRACE_S
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == STOP_GRACE_S
    assert compose()["services"]["streamvi"]["stop_grace_period"] == f"{STOP_GRACE_S}s"
    for name in DOCKERFILES:
        assert f"--stop-timeout {STOP_GRACE_S}" in (DEPLOY / name).read_text()


# ------------------------------------------------------------------------------ docs

def _option_rows() -> dict[str, str]:
    rows = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        m = re.match(r"\|\s*`([a-z_]+)`\s*\|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_configuration_doc_names_every_option_with_env_flag_and_default():
    rows = _option_rows()
    names = {o.name for o in SERVICE_OPTIONS}
    assert set(rows) == names, (f"docs/configuration.md is out of date: no row for "
                                f"{sorted(names - set(rows))}, rows for unknown options "
                                f"{sorted(set(rows) - names)}")
    for o in SERVICE_OPTIONS:
        row = rows[o.name]
        assert f"`STREAMVI_{o.name.upper()}`" in row, o.name
        assert f"`--{o.name.replace('_', '-')}`" in row, o.name
        assert f"`{toml_value(o.default)}`" in row, \
            f"{o.name}: default {toml_value(o.default)} not in its row of docs/configuration.md"


def test_deploy_doc_names_the_files_and_ports_the_service_uses():
    text = (REPO / "docs" / "deploy.md").read_text()
    for word in ("latest.mtz", "snapshot-", "spool/", CHECKPOINT_NAME, "dead-letter.jsonl",
                 "streamvi keys", "5555", "5556", "9108", "compose.gpu.yaml",
                 "prometheus-compose.yml", "Recreate"):
        assert word in text, word
