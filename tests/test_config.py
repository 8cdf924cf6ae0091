"""Configuration: TOML files on disk, BUCKETSYNC_* env overrides, and errors that name the field."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bucketsync.config import (
    AwsIntegration,
    AzureIntegration,
    GcpIntegration,
    load_settings,
    parse_duration,
)
from bucketsync.core.errors import ConfigError

SECRETS = ("AKIA-SECRET-ID-123", "aws-secret-key-456", "azure-conn-str-789", "api-token-abc")

FULL = f"""
[agent]
ledger = "{{tmp}}/var/ledger.db"
listen = "0.0.0.0:9900"
api_token = "{SECRETS[3]}"
log_level = "debug"
log_format = "json"
grace = "15s"

[integrations.aws-main]
kind = "aws"
access_key_id = "{SECRETS[0]}"
secret_access_key = "{SECRETS[1]}"
profile = "prod"

[integrations.gcp]
kind = "gcp"
service_account_file = "/etc/gcp.json"
project = "my-project"

[integrations.az]
kind = "azure"
connection_string = "{SECRETS[2]}"

[drivers.photos]
url = "s3://my-bucket/photos"
integration = "aws-main"
endpoint_url = "https://minio.example:9000"
region = "eu-west-1"
storage_class = "STANDARD_IA"
allow_delete = true

[drivers.docs]
url = "gcs://docs-bucket"
integration = "gcp"

[drivers.blobs]
url = "azure://myaccount/container/some/prefix/"
integration = "az"

[drivers.disk]
url = "file:///srv/data"

[drivers.scratch]
url = "mem://scratch"

[datasets.photos]
driver = "photos"
sync = "poll"
interval = "5m"
include = ["**/*.jpg", "*.png"]
exclude = ["private/**"]
read_only = true
quota = 1000
max_delete_ratio = 0.25
max_delete_count = 100

[datasets.local_docs]
driver = "disk"
sync = "manual"
interval = 30
"""


def write(tmp_path: Path, text: str, name: str = "bucketsync.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).replace("{tmp}", str(tmp_path)))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text))
    return str(exc.value)


MINIMAL = """
[drivers.disk]
url = "file:///srv/data"

[datasets.photos]
driver = "disk"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No BUCKETSYNC_* variables leak in from the environment; no ./bucketsync.toml is found by accident."""
    for name in list(os.environ):
        if name.upper().startswith("BUCKETSYNC_"):
            monkeypatch.delenv(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


# ------------------------------------------------------------------ valid


def test_full_example(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL))
    assert s.agent.ledger == tmp_path / "var" / "ledger.db"
    assert (s.agent.host, s.agent.port) == ("0.0.0.0", 9900)
    assert not s.agent.is_loopback()
    assert s.agent.token() == SECRETS[3]
    assert (s.agent.log_level, s.agent.log_format, s.agent.grace) == ("debug", "json", 15.0)

    aws = s.integrations["aws-main"]
    assert isinstance(aws, AwsIntegration)
    assert aws.secret("access_key_id") == SECRETS[0]
    assert aws.secret("secret_access_key") == SECRETS[1]
    assert aws.secret("session_token") is None
    assert aws.profile == "prod"
    assert isinstance(s.integrations["gcp"], GcpIntegration)
    az = s.integrations["az"]
    assert isinstance(az, AzureIntegration) and az.secret("connection_string") == SECRETS[2]

    photos = s.drivers["photos"]
    assert photos.allow_delete is True
    assert (photos.location.scheme, photos.location.bucket, photos.location.prefix) == ("s3", "my-bucket", "photos/")
    assert s.drivers["docs"].location.scheme == "gs"
    blobs = s.drivers["blobs"].location
    assert (blobs.scheme, blobs.account, blobs.bucket, blobs.prefix) == ("az", "myaccount", "container", "some/prefix/")
    assert s.drivers["disk"].location.path == "/srv/data"
    assert s.drivers["disk"].allow_delete is False, "allow_delete defaults to false"
    assert s.drivers["scratch"].location.bucket == "scratch"

    ds = s.dataset("photos")
    assert ds.interval == 300.0
    assert ds.include == ["**/*.jpg", "*.png"] and ds.exclude == ["private/**"]
    assert ds.read_only and ds.quota == 1000
    assert (ds.max_delete_ratio, ds.max_delete_count) == (0.25, 100)
    assert s.driver_of("photos") is photos
    local = s.dataset("local_docs")
    assert (local.sync, local.interval, local.max_delete_ratio, local.max_delete_count) == ("manual", 30.0, 0.5, 0)


def test_defaults_for_an_empty_file(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""))
    assert s.agent.listen == "127.0.0.1:9810" and s.agent.is_loopback()
    assert s.datasets == {} and s.drivers == {} and s.integrations == {}


def test_unknown_dataset_lookup_names_known_ones(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError, match=r"no dataset named 'nope' \(datasets: photos\)"):
        s.dataset("nope")


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("60s", 60.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25), ("2d", 172800.0), ("1.5m", 90.0), (30, 30.0)],
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


# ------------------------------------------------------------------ errors name the field


def test_unknown_key_names_the_dotted_field(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "intervall = 30\n")
    assert "datasets.photos.intervall: unknown field" in msg


def test_unknown_top_level_and_agent_keys(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "\n[agent]\nlistn = '127.0.0.1:1'\n\n[extra]\nx = 1\n")
    assert "agent.listn: unknown field" in msg
    assert "extra: unknown field" in msg


def test_names_that_equal_an_integration_kind_stay_in_the_field(tmp_path: Path) -> None:
    """An integration, driver or dataset may be called "aws", "gcp" or "azure": the name is part of the field."""
    msg = error_of(
        tmp_path,
        """
        [integrations.aws]
        kind = "aws"
        secret_key = "x"
        [integrations.gcp]
        kind = "azure"
        account_key = "k"
        account_key_file = "/run/k"
        [drivers.azure]
        url = "ftp://x"
        [datasets.gcp]
        driver = "azure"
        intervall = 1
        """,
    )
    assert "integrations.aws.secret_key: unknown field" in msg
    assert "integrations.gcp: set account_key or account_key_file, not both" in msg
    assert "drivers.azure.url: unsupported URL" in msg
    assert "datasets.gcp.intervall: unknown field" in msg


def test_unknown_integration_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[integrations.a]\nkind = 'aws'\nsecret_key = 'x'\n")
    assert "integrations.a.secret_key: unknown field" in msg


def test_bad_url(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[drivers.d]\nurl = 'ftp://host/path'\n")
    assert "drivers.d.url: unsupported URL 'ftp://host/path'" in msg


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("s3://-bad-/x", "not a valid bucket name"),
        ("az://UPPER/container", "must be 3-24 lowercase letters or digits"),
        ("az://account", "needs a container"),
        ("s3://bucket/a/../b", "'..'"),
        ("mem://", "needs a name"),
        ("file://host/path", "names a host"),
        ("s3://bucket/x?versionId=1", "query or fragment"),
    ],
)
def test_bad_urls(tmp_path: Path, url: str, fragment: str) -> None:
    msg = error_of(tmp_path, f"[drivers.d]\nurl = '{url}'\n")
    assert "drivers.d.url:" in msg and fragment in msg


def test_bad_endpoint_url(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[drivers.d]\nurl = 's3://bucket'\nendpoint_url = 'minio:9000'\n")
    assert "drivers.d.endpoint_url:" in msg and "http://" in msg


def test_verify(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[drivers.d]\nurl = 'file:///srv/photos'\nverify = 'hash'\n")
    assert load_settings(path).drivers["d"].verify == "hash"
    path.write_text("[drivers.d]\nurl = 'file:///srv/photos'\n")
    assert load_settings(path).drivers["d"].verify == "stat"
    msg = error_of(tmp_path, "[drivers.d]\nurl = 'file:///srv/photos'\nverify = 'md5'\n")
    assert "drivers.d.verify:" in msg and "'stat' or 'hash'" in msg
    msg = error_of(tmp_path, "[drivers.d]\nurl = 's3://bucket'\nverify = 'hash'\n")
    assert "drivers.d:" in msg and "file://" in msg


def test_dataset_naming_a_missing_driver(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "\n[datasets.docs]\ndriver = 'nowhere'\n")
    assert "datasets.docs.driver: no driver named 'nowhere' (drivers: disk)" in msg


def test_driver_naming_a_missing_integration(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[drivers.d]\nurl = 's3://bucket'\nintegration = 'ghost'\n")
    assert "drivers.d.integration: no integration named 'ghost'" in msg


@pytest.mark.parametrize("raw", ["'fast'", "'5 minutes'", "'0s'", "-1", "'-5m'", "true"])
def test_bad_duration(tmp_path: Path, raw: str) -> None:
    msg = error_of(tmp_path, MINIMAL + f"interval = {raw}\n")
    assert "datasets.photos.interval:" in msg
    assert "duration" in msg


def test_bad_numbers_and_choices(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        MINIMAL + "max_delete_ratio = 1.5\nmax_delete_count = -1\nquota = 0\nsync = 'sometimes'\n",
    )
    for field in ("max_delete_ratio", "max_delete_count", "quota", "sync"):
        assert f"datasets.photos.{field}:" in msg


def test_bad_glob(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "include = ['']\n")
    assert "datasets.photos.include: empty glob pattern" in msg


def test_bad_names(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[drivers.d]\nurl = 'mem://x'\n[datasets.Bad-Name]\ndriver = 'd'\n")
    assert "datasets.Bad-Name" in msg


def test_bad_listen(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[agent]\nlisten = '9810'\n")
    assert "agent.listen: listen '9810' must be HOST:PORT" in msg


@pytest.mark.parametrize(
    ("kind", "url", "want"),
    [
        ("gcp", "s3://bucket", "s3:// needs aws"),
        ("aws", "gs://bucket", "gs:// needs gcp"),
        ("aws", "az://account/container", "az:// needs azure"),
        ("azure", "file:///srv", "file:// needs no integration"),
        ("aws", "mem://x", "mem:// needs no integration"),
    ],
)
def test_integration_kind_must_match_scheme(tmp_path: Path, kind: str, url: str, want: str) -> None:
    msg = error_of(tmp_path, f"[integrations.i]\nkind = '{kind}'\n[drivers.d]\nurl = '{url}'\nintegration = 'i'\n")
    assert f"drivers.d.integration: 'i' is kind '{kind}'" in msg
    assert want in msg


def test_unknown_integration_kind(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[integrations.i]\nkind = 's3'\n")
    assert "integrations.i:" in msg and "'s3'" in msg


@pytest.mark.parametrize(
    ("kind", "secret"),
    [("aws", "secret_access_key"), ("aws", "session_token"), ("azure", "account_key"), ("gcp", "service_account_json")],
)
def test_secret_and_file_both_set(tmp_path: Path, kind: str, secret: str) -> None:
    value = "do-not-print-me-42"
    msg = error_of(tmp_path, f"[integrations.i]\nkind = '{kind}'\n{secret} = '{value}'\n{secret}_file = '/run/s'\n")
    assert f"integrations.i: set {secret} or {secret}_file, not both" in msg
    assert value not in msg


@pytest.mark.parametrize("given", ["access_key_id = 'AKIA-ONLY'", "secret_access_key_file = '/run/secret'"])
def test_aws_keys_come_in_pairs(tmp_path: Path, given: str) -> None:
    msg = error_of(tmp_path, f"[integrations.i]\nkind = 'aws'\n{given}\n")
    assert "integrations.i: set access_key_id and secret_access_key together" in msg
    assert "AKIA-ONLY" not in msg


def test_api_token_and_file_both_set(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[agent]\napi_token = 'tok-secret'\napi_token_file = '/run/t'\n")
    assert "set api_token or api_token_file, not both" in msg
    assert "tok-secret" not in msg


def test_wrongly_typed_secret_is_not_echoed(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[integrations.i]\nkind = 'aws'\nsecret_access_key = 123456789\n")
    assert "integrations.i.secret_access_key:" in msg
    assert "123456789" not in msg


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[datasets.p\ndriver = 'd'\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    assert str(path) in str(exc.value) and "line 1" in str(exc.value)


# ------------------------------------------------------------------ secrets


def test_secret_files_are_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("  from-a-file-secret \n\n")
    (tmp_path / "token").write_text("token-from-file\n")
    s = load_settings(
        write(
            tmp_path,
            f"""
            [agent]
            api_token_file = "{tmp_path}/token"
            [integrations.i]
            kind = "aws"
            access_key_id = "AKIA-ID"
            secret_access_key_file = "{tmp_path}/key"
            """,
        )
    )
    integ = s.integrations["i"]
    assert integ.secret("secret_access_key") == "from-a-file-secret"
    assert s.agent.token() == "token-from-file"
    # Read when used, so a rotated secret is picked up without a restart.
    (tmp_path / "key").write_text("rotated\n")
    assert integ.secret("secret_access_key") == "rotated"


def test_unreadable_secret_file_is_a_config_error(tmp_path: Path) -> None:
    s = load_settings(
        write(
            tmp_path,
            f"[integrations.i]\nkind = 'aws'\naccess_key_id = 'id'\nsecret_access_key_file = '{tmp_path}/nope'\n",
        )
    )
    with pytest.raises(ConfigError, match="secret_access_key_file: cannot read") as exc:
        s.integrations["i"].secret("secret_access_key")
    assert f"{tmp_path}/nope" in str(exc.value)


def test_secrets_never_in_repr_or_str(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_INTEGRATIONS__AWS-MAIN__SESSION_TOKEN", "env-session-token-xyz")
    s = load_settings(write(tmp_path, FULL))
    assert s.integrations["aws-main"].secret("session_token") == "env-session-token-xyz"
    texts = [repr(s), str(s), repr(s.integrations), str(s.agent), repr(s.model_dump()), s.model_dump_json()]
    for text in texts:
        for secret in (*SECRETS, "env-session-token-xyz"):
            assert secret not in text
    assert "**********" in repr(s)


# ------------------------------------------------------------------ env overrides


def test_env_overrides_deep_merge_with_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, FULL)
    monkeypatch.setenv("BUCKETSYNC_DATASETS__PHOTOS__INTERVAL", "30s")
    monkeypatch.setenv("BUCKETSYNC_DATASETS__PHOTOS__EXCLUDE", '["tmp/**"]')
    monkeypatch.setenv("BUCKETSYNC_DRIVERS__PHOTOS__ALLOW_DELETE", "false")
    monkeypatch.setenv("BUCKETSYNC_AGENT__LOG_LEVEL", "warning")
    monkeypatch.setenv("BUCKETSYNC_INTEGRATIONS__AWS-MAIN__SECRET_ACCESS_KEY", "from-env")
    s = load_settings(path)
    ds = s.dataset("photos")
    assert ds.interval == 30.0, "env overrides the file"
    assert ds.exclude == ["tmp/**"]
    # ...and everything the env does not name still comes from the file (a deep merge).
    assert ds.include == ["**/*.jpg", "*.png"] and ds.quota == 1000 and ds.driver == "photos"
    assert s.drivers["photos"].allow_delete is False
    assert s.drivers["photos"].region == "eu-west-1"
    assert s.agent.log_level == "warning" and s.agent.listen == "0.0.0.0:9900"
    aws = s.integrations["aws-main"]
    assert aws.secret("secret_access_key") == "from-env"
    assert aws.secret("access_key_id") == SECRETS[0]
    assert set(s.datasets) == {"photos", "local_docs"}


def test_env_adds_whole_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_DRIVERS__SCRATCH__URL", "mem://scratch")
    monkeypatch.setenv("BUCKETSYNC_DATASETS__EXTRA__DRIVER", "scratch")
    s = load_settings(write(tmp_path, MINIMAL))
    assert s.dataset("extra").driver == "scratch"
    assert s.dataset("photos").driver == "disk"


def test_env_errors_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL)
    monkeypatch.setenv("BUCKETSYNC_DATASETS__PHOTOS__INTERVAL", "soon")
    with pytest.raises(ConfigError, match=r"datasets\.photos\.interval: invalid duration 'soon'"):
        load_settings(path)
    monkeypatch.delenv("BUCKETSYNC_DATASETS__PHOTOS__INTERVAL")
    monkeypatch.setenv("BUCKETSYNC_DATASETS__PHOTOS__INTERVALL", "5s")
    with pytest.raises(ConfigError, match=r"datasets\.photos\.intervall: unknown field"):
        load_settings(path)


def test_config_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL, name="elsewhere.toml")
    monkeypatch.setenv("BUCKETSYNC_CONFIG", str(path))
    s = load_settings()
    assert list(s.datasets) == ["photos"]


def test_explicit_path_wins_over_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_CONFIG", str(write(tmp_path, FULL, name="env.toml")))
    s = load_settings(write(tmp_path, MINIMAL, name="explicit.toml"))
    assert list(s.datasets) == ["photos"] and list(s.drivers) == ["disk"]


def test_default_file_in_working_directory(tmp_path: Path) -> None:
    write(tmp_path / "cwd", MINIMAL)  # ./bucketsync.toml
    assert list(load_settings().datasets) == ["photos"]


def test_no_config_anywhere_is_an_error_naming_where_it_looked() -> None:
    # Starting anyway used to run an empty agent writing var/bucketsync.db in the cwd.
    with pytest.raises(ConfigError, match="no config file found") as exc:
        load_settings()
    text = str(exc.value)
    for place in ("-c/--config", "$BUCKETSYNC_CONFIG", "bucketsync.toml", str(Path.cwd()), "bucketsync init"):
        assert place in text


def test_missing_named_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as exc:
        load_settings(tmp_path / "absent.toml")
    assert "absent.toml" in str(exc.value)


def test_missing_file_named_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match=r"absent\.toml' does not exist"):
        load_settings()


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        load_settings(tmp_path)


# ------------------------------------------------------------------ the real CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bucketsync.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_cli_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "intervall = 30\nmax_delete_ratio = 7\n")
    proc = run_cli("-c", str(path), "status", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "datasets.photos.intervall: unknown field" in proc.stderr
    assert "datasets.photos.max_delete_ratio:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_secret_not_echoed_on_config_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[integrations.i]\nkind = 'aws'\nsecret_access_key = 'cli-secret-zz'\nsecret_access_key_file = '/x'\n",
    )
    proc = run_cli("-c", str(path), "status", cwd=tmp_path)
    assert proc.returncode == 2
    assert "integrations.i: set secret_access_key or secret_access_key_file, not both" in proc.stderr
    assert "cli-secret-zz" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------------- events mode


def _events_config(tmp_path: Path, driver: str) -> Path:
    path = tmp_path / "events.toml"
    path.write_text(textwrap.dedent(driver) + '\n[datasets.raw]\ndriver = "raw"\nsync = "events"\n')
    return path


def test_events_mode_on_a_local_folder_needs_no_table_and_defaults_to_an_hourly_reconcile(tmp_path: Path) -> None:
    s = load_settings(_events_config(tmp_path, f'[drivers.raw]\nurl = "{tmp_path.as_uri()}"\n'))
    assert s.datasets["raw"].sync == "events"
    assert s.datasets["raw"].reconcile_interval == 3600.0
    assert s.drivers["raw"].event_source() == "watch"


def test_events_table_with_webhook_secret(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text("s3cret\n")
    conf = f"""
    [drivers.raw]
    url = "gs://bucket/p"
    [drivers.raw.events]
    source = "webhook"
    secret_file = "{tmp_path / "hook"}"
    """
    s = load_settings(_events_config(tmp_path, conf))
    events = s.drivers["raw"].events
    assert events is not None and events.source == "webhook" and events.shared_secret() == "s3cret"


@pytest.mark.parametrize(
    ("driver", "names"),
    [
        ('[drivers.raw]\nurl = "s3://bucket/p"\n', ("datasets.raw.sync", "[drivers.raw.events]", 'source = "sqs"')),
        ('[drivers.raw]\nurl = "gs://bucket/p"\n', ("datasets.raw.sync", 'source = "webhook"')),
        ('[drivers.raw]\nurl = "mem://x"\n', ("datasets.raw.sync", 'sync = "poll"')),
        (
            '[drivers.raw]\nurl = "az://acct/c/p"\n[drivers.raw.events]\nsource = "sqs"\nqueue = "q"\n',
            ("drivers.raw.events.source", "'sqs' cannot serve az://", "'raw'", "azure-queue"),
        ),
        (
            '[drivers.raw]\nurl = "s3://bucket/p"\n[drivers.raw.events]\nsource = "watch"\n',
            ("drivers.raw.events.source", "'watch' cannot serve s3://"),
        ),
    ],
)
def test_events_mode_without_a_fitting_source_names_the_dataset_and_the_fix(
    tmp_path: Path, driver: str, names: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_events_config(tmp_path, driver))
    for name in names:
        assert name in str(err.value), str(err.value)


def test_auto_asks_for_a_worker_per_usable_core_up_to_two() -> None:
    from bucketsync.upstream.workers import usable_cpus, workers_for

    assert [workers_for("auto", cpus) for cpus in (1, 1.5, 2, 3, 16)] == [0, 0, 2, 2, 2]
    assert workers_for(0, 16) == 0 and workers_for(5, 1) == 5, "a number is taken as it is"
    assert 0 < usable_cpus() <= len(os.sched_getaffinity(0))


def test_usable_cpus_take_the_tightest_cgroup_v2_quota_on_the_path(tmp_path: Path) -> None:
    """A systemd unit's CPUQuota= is its own cgroup's cpu.max, a slice's is its parent's, and a
    container sees its own cgroup as the root: each caps the cores, the tightest wins."""
    from bucketsync.upstream.workers import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    proc, sysfs = tmp_path / "cgroup", tmp_path / "sys"
    unit = sysfs / "system.slice" / "bucketsync.service"
    unit.mkdir(parents=True)
    proc.write_text("0::/system.slice/bucketsync.service\n")
    assert usable_cpus(proc, sysfs) == affinity, "no cpu.max anywhere: the affinity"
    (unit / "cpu.max").write_text("max 100000\n")
    (sysfs / "system.slice" / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(proc, sysfs) == min(affinity, 0.5), "the slice's quota applies to the unit"
    (unit / "cpu.max").write_text("25000 100000\n")
    assert usable_cpus(proc, sysfs) == min(affinity, 0.25)
    proc.write_text("0::/\n")
    (sysfs / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(proc, sysfs) == min(affinity, 1.5), "a container's own root"
    proc.write_text("4:memory:/x\n")
    assert usable_cpus(proc, sysfs) == affinity, "cgroup v1 only: no quota read"


def test_the_default_is_auto_and_a_bad_value_names_the_field() -> None:
    from pydantic import ValidationError

    from bucketsync.config import AgentConfig

    assert AgentConfig().sync_workers == "auto"
    assert AgentConfig(sync_workers=3).sync_workers == 3
    for bad in ("some", -1, 65):
        with pytest.raises(ValidationError, match="sync_workers"):
            AgentConfig(sync_workers=bad)
