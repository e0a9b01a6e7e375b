"""Everything that runs inside a hospital: DICOM ingestion, datasets, DP training, FLARE executor.

Patient data is touched only in this package; nothing here imports ``server_app``.
"""
