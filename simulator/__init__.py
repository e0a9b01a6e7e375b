"""Synthetic multi-site DICOM data and the in-process multi-site federation (FLARE's simulator)."""

from simulator.cohort_manifest import FederationDataSummary
from simulator.synthetic_data import generate_federation_data

__all__ = ["FederationDataSummary", "generate_federation_data"]
