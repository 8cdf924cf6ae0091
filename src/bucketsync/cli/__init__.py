"""The ``bucketsync`` command and its client of a running agent's API."""
