"""Integrations with model libraries (imported on demand, never with the package)."""
