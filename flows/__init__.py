"""Prefect 3 flows that run the DVC stages of this pipeline (see ``flows.training``)."""
