"""bucketsync: keeps dataset catalogs in sync with object storage."""

__version__ = "0.1.0"
