"""Placeholder; replaced by the store work."""
