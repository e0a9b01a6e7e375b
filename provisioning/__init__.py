"""Provisioning, startup kits and POC deployment.

Not built yet (issue 4): this package is a placeholder so the layout matches docs/ARCHITECTURE.md.
"""
