"""fedseg command-line entry point. Domain logic lives in jobs/, site_app/, server_app/, simulator/."""

__version__ = "0.1.0"
