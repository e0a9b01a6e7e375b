"""The options that connect a command to a PACS over DICOMweb, declared once for every command
that talks to one (``site import``, ``site infer --dicomweb``), and the source they describe."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_connection_options", "dicomweb_source"]


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """--username, --password-env, --ca-bundle, --timeout and --allow-insecure-http."""
    parser.add_argument("--username", metavar="USER", help="HTTP basic-auth user for the PACS")
    parser.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the password"
    )
    parser.add_argument(
        "--ca-bundle", metavar="PEM", help="the CA that signed the PACS's https certificate"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="seconds per answer (30)"
    )
    parser.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="allow --username over plain http to another machine (the password crosses the "
        "network in clear); only for a link protected otherwise, e.g. a VPN",
    )


def dicomweb_source(args: argparse.Namespace):
    """The ``DicomwebSource`` that ``args.dicomweb`` and the connection options describe
    (validated by its constructor, which raises ``PacsImportError`` naming the option)."""
    from site_app.dicomweb_source import DicomwebSource

    return DicomwebSource(
        url=args.dicomweb,
        username=args.username,
        password_env=args.password_env,
        ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
        timeout_s=args.timeout,
        allow_insecure_http=args.allow_insecure_http,
    )
