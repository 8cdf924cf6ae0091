"""The daemon: supervision of loops and the server, reload, and systemd notifications."""
