"""Prefect flows (thin wrappers over mapex_core); filled in by the orchestration issue."""
