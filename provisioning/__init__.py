"""Provisioning (FLARE startup kits with fedseg's builders) and the POC of real FLARE processes.

Runs at the project admin's; see docs/project-admin.md.
"""
