"""fedseg command-line entry point; the domain logic lives in the other packages."""

__version__ = "0.1.0"
