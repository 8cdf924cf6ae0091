"""Configuration: a TOML file overridden by ``BUCKETSYNC_*`` env vars.

Where the file comes from: ``-c/--config``, else ``$BUCKETSYNC_CONFIG``, else
``./bucketsync.toml``. Env vars use ``__`` for nesting, e.g.
``BUCKETSYNC_DATASETS__PHOTOS__INTERVAL=30s``. Every model forbids unknown keys,
and every problem is reported as a ``ConfigError`` naming the dotted field.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bucketsync.errors import ConfigError
from bucketsync.keys import validate_glob
from bucketsync.location import Location, parse_location

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> float:
    """``"60s"``, ``"5m"``, ``"1h"``, ``"250ms"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '60s', '5m' or '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"invalid duration {value!r}: expected a number with a unit, such as '60s', '5m' or '1h'")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_secret_file(path: Path, field: str) -> SecretStr:
    try:
        return SecretStr(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"{field}_file: cannot read {str(path)!r}: {exc.strerror}") from None


class _Integration(_Strict):
    """Secrets may be given inline, by env, or as ``*_file`` paths; never both."""

    SECRETS: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _one_of_value_or_file(self) -> _Integration:
        for name in self.SECRETS:
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"set {name} or {name}_file, not both")
        return self

    def secret(self, name: str) -> str | None:
        """The secret's value, read from its ``*_file`` when that is how it was given."""
        value: SecretStr | None = getattr(self, name)
        path: Path | None = getattr(self, f"{name}_file")
        if path is not None:
            value = _read_secret_file(path, name)
        return value.get_secret_value() if value is not None else None


class AwsIntegration(_Integration):
    SECRETS = ("access_key_id", "secret_access_key", "session_token")
    kind: Literal["aws"]
    access_key_id: SecretStr | None = None
    access_key_id_file: Path | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_file: Path | None = None
    session_token: SecretStr | None = None
    session_token_file: Path | None = None
    profile: str | None = None

    @model_validator(mode="after")
    def _key_pair(self) -> AwsIntegration:
        has_id = self.access_key_id is not None or self.access_key_id_file is not None
        has_secret = self.secret_access_key is not None or self.secret_access_key_file is not None
        if has_id != has_secret:
            raise ValueError("set access_key_id and secret_access_key together (or neither, for the default chain)")
        return self


class GcpIntegration(_Integration):
    SECRETS = ("service_account_json",)
    kind: Literal["gcp"]
    service_account_file: Path | None = None
    service_account_json: SecretStr | None = None
    service_account_json_file: Path | None = None
    project: str | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> GcpIntegration:
        if self.service_account_file is not None and (
            self.service_account_json is not None or self.service_account_json_file is not None
        ):
            raise ValueError("set service_account_file or service_account_json(_file), not both")
        return self


class AzureIntegration(_Integration):
    SECRETS = ("connection_string", "account_key", "sas_token")
    kind: Literal["azure"]
    connection_string: SecretStr | None = None
    connection_string_file: Path | None = None
    account_key: SecretStr | None = None
    account_key_file: Path | None = None
    sas_token: SecretStr | None = None
    sas_token_file: Path | None = None


Integration = Annotated[AwsIntegration | GcpIntegration | AzureIntegration, Field(discriminator="kind")]
_KIND_FOR_SCHEME = {"s3": "aws", "gs": "gcp", "az": "azure"}


class DriverConfig(_Strict):
    url: str
    integration: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    storage_class: str | None = None
    allow_delete: bool = False
    #: how a local folder's changes are detected: "stat" (size, mtime, inode and change
    #: time) or "hash" (a content hash, re-read only when the change time moves)
    verify: Literal["stat", "hash"] = "stat"

    #: per request, seconds: to open a connection, and to wait for each read of a response
    #: (not a whole transfer). A stall past ``read_timeout`` is a Transient error, retried.
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 30.0

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_location(v)
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"endpoint_url {v!r} must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _verify_local_only(self) -> DriverConfig:
        if self.verify == "hash" and self.location.scheme != "file":
            raise ValueError(
                "verify = 'hash' applies to local folders (file://) only; cloud stores already "
                "compare the provider's own etag or version"
            )
        return self

    @property
    def location(self) -> Location:
        return parse_location(self.url)


class DatasetConfig(_Strict):
    driver: str
    sync: Literal["poll", "manual"] = "poll"  # "events" comes with event sources
    interval: Duration = 60.0
    include: list[str] = []
    exclude: list[str] = []
    read_only: bool = False
    quota: int | None = Field(default=None, ge=1)
    max_delete_ratio: float = Field(default=0.5, gt=0, le=1)
    max_delete_count: int = Field(default=0, ge=0)

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        return [validate_glob(p) for p in v]


class AgentConfig(_Strict):
    ledger: Path = Path("var/bucketsync.db")
    listen: str = "127.0.0.1:9810"
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    grace: Duration = 10.0
    #: outbox ops executed at once; ops on the same (dataset, key) always run one after another
    outbox_concurrency: int = Field(default=8, ge=1, le=256)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"listen {v!r} must be HOST:PORT, such as 127.0.0.1:9810")
        return v

    @model_validator(mode="after")
    def _token_once(self) -> AgentConfig:
        if self.api_token is not None and self.api_token_file is not None:
            raise ValueError("set api_token or api_token_file, not both")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def token(self) -> str | None:
        if self.api_token_file is not None:
            return _read_secret_file(self.api_token_file, "agent.api_token").get_secret_value()
        return self.api_token.get_secret_value() if self.api_token is not None else None

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BUCKETSYNC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    agent: AgentConfig = AgentConfig()
    integrations: dict[Name, Integration] = {}
    drivers: dict[Name, DriverConfig] = {}
    datasets: dict[Name, DatasetConfig] = {}

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for name, driver in self.drivers.items():
            scheme = driver.location.scheme
            if driver.integration is not None:
                integ = self.integrations.get(driver.integration)
                if integ is None:
                    raise ValueError(f"drivers.{name}.integration: no integration named {driver.integration!r}")
                want = _KIND_FOR_SCHEME.get(scheme)
                if want != integ.kind:
                    raise ValueError(
                        f"drivers.{name}.integration: {driver.integration!r} is kind {integ.kind!r}, "
                        f"but {scheme}:// needs {want or 'no integration'}"
                    )
        for name, ds in self.datasets.items():
            if ds.driver not in self.drivers:
                known = ", ".join(sorted(self.drivers)) or "none defined"
                raise ValueError(f"datasets.{name}.driver: no driver named {ds.driver!r} (drivers: {known})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init > env > TOML; the TOML file is set per load (see load_settings).
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    def dataset(self, name: str) -> DatasetConfig:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none configured"
            raise ConfigError(f"no dataset named {name!r} (datasets: {known})") from None

    def driver_of(self, dataset: str) -> DriverConfig:
        return self.drivers[self.dataset(dataset).driver]


DEFAULT_CONFIG = Path("bucketsync.toml")


def config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Where the config comes from, and whether the user named it (then it must exist)."""
    if explicit is not None:
        return Path(explicit), True
    if env := os.environ.get("BUCKETSYNC_CONFIG"):
        return Path(env), True
    return DEFAULT_CONFIG, False


def _not_found() -> ConfigError:
    # Starting anyway would run an empty agent writing a ledger wherever it was started.
    return ConfigError(
        "no config file found; looked for: -c/--config (not given), $BUCKETSYNC_CONFIG (not set), "
        f"{DEFAULT_CONFIG} in {Path.cwd()} (no such file). "
        "Write a starter config with `bucketsync init`, or name one with -c PATH"
    )


_KINDS = ("aws", "gcp", "azure")


def _field(loc: tuple[int | str, ...]) -> str:
    # The integrations union adds its tag after the name (integrations.NAME.aws.field); it is
    # not a field. Only there: an integration, driver or dataset may itself be called "aws".
    parts = [str(p) for i, p in enumerate(loc) if not (i == 2 and loc[0] == "integrations" and p in _KINDS)]
    return ".".join(parts) or "config"


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = _field(err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {msg}" if field != "config" or ":" not in msg else msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate the configuration or raise ``ConfigError``."""
    file, named = config_path(path)
    if file.exists() and not file.is_file():
        raise ConfigError(f"config {str(file)!r} is not a file")
    if not file.exists():
        raise ConfigError(f"config file {str(file)!r} does not exist") if named else _not_found()
    # A subclass per load carries the file.
    bound = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": file}})
    try:
        settings: Settings = bound()
        return settings
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"{file}: {exc}") from None
