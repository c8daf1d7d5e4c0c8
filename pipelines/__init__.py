"""Prefect flows that run the DVC stages and manage model versions."""
