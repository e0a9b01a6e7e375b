"""fedseg command-line entry point; the domain logic lives in the other packages.

The version is the installed distribution's (``importlib.metadata``, from pyproject.toml):
``server_app.model_manifest.fedseg_version``.
"""
