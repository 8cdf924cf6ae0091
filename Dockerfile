# bucketsync as a container (e.g. a sidecar next to an application).
#   docker build -t bucketsync .
#   docker run -v $PWD/bucketsync.toml:/etc/bucketsync/bucketsync.toml:ro -v bucketsync-state:/var/lib/bucketsync \
#     -p 9810:9810 -e BUCKETSYNC_AGENT__API_TOKEN_FILE=/run/secrets/api_token bucketsync
FROM python:3.11-slim

RUN useradd --system --home /var/lib/bucketsync --create-home bucketsync
WORKDIR /opt/bucketsync
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .

USER bucketsync
WORKDIR /var/lib/bucketsync
ENV BUCKETSYNC_CONFIG=/etc/bucketsync/bucketsync.toml \
    BUCKETSYNC_AGENT__LEDGER=/var/lib/bucketsync/bucketsync.db \
    BUCKETSYNC_AGENT__LOG_FORMAT=json
VOLUME ["/var/lib/bucketsync"]
EXPOSE 9810
# Inside a container the API must listen beyond loopback, so the agent requires an API token
# (agent.api_token or agent.api_token_file); it refuses to start without one.
ENV BUCKETSYNC_AGENT__LISTEN=0.0.0.0:9810
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9810/healthz')"
STOPSIGNAL SIGTERM
ENTRYPOINT ["bucketsync"]
CMD ["run"]
