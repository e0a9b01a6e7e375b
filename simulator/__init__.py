"""Synthetic multi-site DICOM data and the in-process multi-site federation (FLARE's simulator)."""
