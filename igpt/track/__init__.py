"""Tracking: the one MLflow run lifecycle every job uses (``tracking``) and run comparison (``compare``)."""
