"""A package, so that the tier's Ray instance (conftest.py, package scope) stops when the tier's last test ends."""
