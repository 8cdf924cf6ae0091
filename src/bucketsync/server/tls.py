"""TLS for the API listener and for the CLI's client of it.

The agent serves HTTPS when ``agent.tls_cert_file`` and ``agent.tls_key_file`` are set.
The CLI reads the same config, so it trusts that certificate (a self-signed one is the
common case on one host) besides the system's CAs, and keeps hostname checks on.
"""

from __future__ import annotations

import ssl

from bucketsync.config import AgentConfig
from bucketsync.core.errors import ConfigError


def server_context(conf: AgentConfig) -> ssl.SSLContext | None:
    """The listener's context, or None for plain HTTP; unreadable or bad files are a ConfigError."""
    if conf.tls_cert_file is None or conf.tls_key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for field, path in (("agent.tls_cert_file", conf.tls_cert_file), ("agent.tls_key_file", conf.tls_key_file)):
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{field}: cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        ctx.load_cert_chain(conf.tls_cert_file, conf.tls_key_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"agent.tls_cert_file/agent.tls_key_file: {str(conf.tls_cert_file)!r} and {str(conf.tls_key_file)!r} "
            f"are not a PEM certificate chain and its private key: {exc.reason or exc}"
        ) from None
    return ctx


def client_context(conf: AgentConfig) -> ssl.SSLContext | None:
    """What the CLI trusts when the agent serves HTTPS: the system CAs and the agent's own certificate."""
    if conf.tls_cert_file is None:
        return None
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cafile=conf.tls_cert_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"agent.tls_cert_file: cannot load {str(conf.tls_cert_file)!r}: {exc}") from None
    return ctx
