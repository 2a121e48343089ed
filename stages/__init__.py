"""Pipeline stages: thin scripts that read params.yaml, validate it, call kdlib, write outputs.

Run as modules from the repository root (``python -m stages.train teacher``), as dvc.yaml does.
"""
