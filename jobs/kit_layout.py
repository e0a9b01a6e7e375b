"""Names of the files in a startup kit that more than one side reads or writes.

The project admin's provisioning writes them and the site reads them, so the names live in the
contract that both import, not in either side.
"""

__all__ = ["SITE_CONFIG_FILE"]

SITE_CONFIG_FILE = "fedseg_site.yaml"
"""The site's own configuration, in the kit's ``local/`` folder: data path, privacy policy."""
