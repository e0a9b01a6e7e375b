"""``fedseg`` command line: parses arguments and dispatches; no domain logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from rich.markup import escape

from fedseg.pacs_options import add_connection_options, dicomweb_source
from fedseg.terminal import UserError, console, error_console, int_at_least, print_table

# Domain packages are imported inside the handlers, so `fedseg --help` stays fast.

# -- site ----------------------------------------------------------------------------------------


def _sha256_fingerprint(text: str) -> str:
    from site_app.kit_check import parse_sha256

    try:
        return parse_sha256(text)
    except ValueError as error:  # argparse names the option itself
        raise argparse.ArgumentTypeError(str(error)) from None


def _site_kit_check(kit: Path, root_ca_sha256: str | None) -> int:
    from site_app.kit_check import Outcome, check_kit

    colour = {Outcome.PASS: "green", Outcome.WARN: "yellow", Outcome.FAIL: "red"}

    def show(result) -> None:
        console.print(
            f"[{colour[result.outcome]}]{result.outcome.value:>4}[/{colour[result.outcome]}] "
            f"{escape(result.item)}: {escape(result.detail)}"
            + (f"\n       fix: {escape(result.fix)}" if result.fix else "")
        )

    results = check_kit(kit, root_ca_sha256=root_ca_sha256, on_result=show)
    failed = [r.item for r in results if r.outcome is Outcome.FAIL]
    if failed:
        error_console.print(f"[red]not ready[/red]: fix {escape(', '.join(failed))}")
        return 1
    console.print("[green]ready[/green] to join the federation")
    return 0


def _site_check(args: argparse.Namespace) -> int | None:
    if args.kit:
        return _site_kit_check(Path(args.kit), args.root_ca_sha256)
    if args.root_ca_sha256:
        raise UserError("--root-ca-sha256 checks a startup kit: pass it with --kit KIT")
    from site_app.data_summary import summarize, summary_table
    from site_app.ingestion import ingest_site
    from site_app.quarantine import write_quarantine

    data_dir = Path(args.data)
    result = ingest_site(
        data_dir, cache_dir=Path(args.cache) if args.cache else None, progress=True
    )
    console.print(summary_table(summarize(result)))
    quarantine_path = Path(args.quarantine_out)
    write_quarantine(list(result.quarantine), quarantine_path)
    console.print(
        f"{len(result.quarantine)} quarantined item(s), each with its reason: {quarantine_path}",
        markup=False,
    )


def _site_import(args: argparse.Namespace) -> None:
    from site_app.dicomweb_source import (
        ImportLimits,
        StudySelection,
        limit_flags,
    )
    from site_app.pacs_errors import PacsImportError
    from site_app.pacs_import import import_from_dicomweb

    try:
        source = dicomweb_source(args)
        selection = StudySelection(study_uids=tuple(args.study), modality=args.modality)
        given = {
            name: getattr(args, flag.removeprefix("--").replace("-", "_")) * unit
            for name, (flag, unit) in limit_flags().items()
            if getattr(args, flag.removeprefix("--").replace("-", "_")) is not None
        }
        summary = import_from_dicomweb(
            source,
            Path(args.out),
            selection=selection,
            limit=args.max_instances,
            limits=ImportLimits(**given),
            progress=True,
        )
    except PacsImportError as error:
        raise UserError(str(error)) from None
    except KeyboardInterrupt:
        error_console.print("files written so far are complete; run the same command to resume")
        raise
    console.print(
        f"[green]imported[/green] {summary.fetched} new instance(s) from {summary.studies} "
        f"study(ies) into {escape(str(summary.out_dir))} ({summary.already_present} already "
        f"there; journal: {escape(str(summary.journal))})"
    )
    if summary.complete:
        console.print(f"next: fedseg site check --data {summary.out_dir}", markup=False)
    else:
        console.print(f"{summary.remaining} instance(s) left: run the same command again")


# -- spec ----------------------------------------------------------------------------------------


def _spec_check(args: argparse.Namespace) -> None:
    from jobs.model import (
        build_network,
        dp_incompatibilities,
        trainable_names,
        unmatched_trainable_patterns,
    )
    from jobs.spec import load_spec

    spec = load_spec(args.spec)
    network = build_network(spec.model)
    problems = dp_incompatibilities(network) if spec.privacy.enabled else []
    if problems:
        raise UserError(
            f"{args.spec}: the model cannot be trained with DP:\n  " + "\n  ".join(problems)
        )
    unmatched = unmatched_trainable_patterns(network, spec.training.trainable)
    if unmatched:
        names = ", ".join(name for name, _ in network.named_parameters())
        raise UserError(
            f"{args.spec}: training.trainable: {unmatched} match no parameter of this network; "
            f"its parameters are: {names}"
        )
    chosen = set(trainable_names(network, spec.training.trainable))
    trained = sum(p.numel() for n, p in network.named_parameters() if n in chosen)
    total = sum(p.numel() for p in network.parameters())
    console.print(
        f"[green]ok[/green] {escape(args.spec)}: job '{escape(spec.name)}' is valid; "
        f"{trained:,} of {total:,} parameters train"
    )


# -- report and model ----------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> None:
    from server_app.model_card import ModelCardError
    from server_app.report import rebuild_report
    from server_app.report_render import final_table
    from server_app.report_schema import ReportError

    results = Path(args.results)
    try:
        report = rebuild_report(results)
    except (ReportError, ModelCardError) as error:
        raise UserError(str(error)) from None
    print_table(final_table(report))
    files = ["report.md", "report.json", "model_card.md", *report.plots]
    console.print(f"rebuilt in {results}: {', '.join(files)}", markup=False)


def _model_verify(args: argparse.Namespace) -> int:
    from jobs.spec import load_spec
    from server_app.model_manifest import ManifestError, trust_anchor_from_kit, verify_model

    spec = load_spec(args.spec).to_plain() if args.spec else None
    root_ca, signer_name = (Path(args.root_ca) if args.root_ca else None), args.signer
    try:
        if args.kit:
            root_ca, server = trust_anchor_from_kit(Path(args.kit))
            signer_name = signer_name or server
        result = verify_model(Path(args.model), root_ca=root_ca, signer_name=signer_name, spec=spec)
    except ManifestError as error:
        raise UserError(str(error)) from None
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    model = escape(args.model)
    if not result.ok:
        error_console.print(f"[red]FAILED[/red]: {model} could not be verified:")
        for problem in result.problems:
            error_console.print(f"  - {problem}", markup=False)
        return 1
    manifest = result.manifest
    facts = escape(
        f"sha256 {manifest.get('model_sha256')}, job '{manifest.get('job')}', "
        f"{manifest.get('rounds_completed')} round(s), sites "
        f"{', '.join(map(str, manifest.get('contributing_sites') or [])) or 'none'}, "
        f"signed {manifest.get('created_utc')}"
    )
    if result.verified_signer is None:  # a simulation signature: anyone could have made it
        console.print(
            f"[yellow]integrity only[/yellow] {model}: unchanged since signing ({facts}), but "
            "with a SIMULATION signature, a throwaway key: it does not show who made the model"
        )
        return 0
    console.print(
        f"[green]verified[/green] {model}: {facts} by the federation's server "
        f"'{escape(result.verified_signer)}' (certified by {escape(str(root_ca))})"
    )
    return 0


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedseg",
        description="Federated, differentially private medical-image segmentation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    from fedseg import simulate_cli

    sim_commands = simulate_cli.register(commands)
    site = commands.add_parser("site", help="site administration")
    site_commands = site.add_subparsers(dest="site_command", required=True)
    check = site_commands.add_parser(
        "check", help="check a site's DICOM folder (--data) or its whole startup kit (--kit)"
    )
    what = check.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="the site's DICOM folder")
    what.add_argument(
        "--kit", help="the site's startup kit: files, signature, certificate, server, data, policy"
    )
    check.add_argument(
        "--root-ca-sha256",
        type=_sha256_fingerprint,
        metavar="HEX",
        help="with --kit: the project's root CA fingerprint, from the project admin by phone "
        "or another channel than the kit (hex, colons allowed)",
    )
    check.add_argument("--cache", help="cache folder for decoded volumes (optional)")
    check.add_argument(
        "--quarantine-out", default="quarantine.json", help="where to write the quarantine list"
    )
    check.set_defaults(handler=_site_check)
    from fedseg import ledger_cli

    ledger_cli.register(site_commands)  # here, so `fedseg site --help` keeps its order
    pacs = site_commands.add_parser(
        "import", help="copy studies from the PACS over DICOMweb into the site's data folder"
    )
    pacs.add_argument(
        "--dicomweb",
        required=True,
        metavar="URL",
        help="DICOMweb root, e.g. https://pacs.example.org/dicom-web",
    )
    pacs.add_argument(
        "--out", required=True, metavar="DIR", help="the site's DICOM folder (a rerun resumes)"
    )
    pacs.add_argument(
        "--study",
        action="append",
        default=[],
        metavar="UID",
        help="StudyInstanceUID to import (repeatable)",
    )
    pacs.add_argument("--modality", metavar="CODE", help="only studies holding it, e.g. CT")
    add_connection_options(pacs)
    pacs.add_argument(
        "--max-instances",
        type=int_at_least(1),
        metavar="N",
        help="fetch at most N instances in this run (import in batches)",
    )
    caps = pacs.add_argument_group(
        "limits on what the PACS may send (past one the import stops; files written stay)"
    )
    for flag, metavar, default, text in (
        ("--max-search-pages", "N", "1000", "pages of one search"),
        ("--max-listed-instances", "N", "500000", "instances the selected studies list"),
        ("--max-search-answer-mb", "MB", "64", "one search answer, decoded"),
        ("--max-instance-mb", "MB", "1024", "one instance as received"),
        ("--max-decompressed-mb", "MB", "2048", "one instance's pixel data or inflated dataset"),
        ("--max-run-gb", "GB", "500", "everything this run receives"),
    ):
        caps.add_argument(
            flag, type=int_at_least(1), metavar=metavar, help=f"{text} (default {default})"
        )
    pacs.set_defaults(handler=_site_import)

    from fedseg import deploy_cli, drift_cli, infer_cli, privacy_cli

    infer_cli.register(site_commands)
    drift_cli.register(site_commands)
    deploy_cli.register(commands)
    privacy_cli.register(commands, sim_commands)

    report = commands.add_parser(
        "report", help="rebuild report, plots and model card from a results folder"
    )
    report.add_argument("results", help="results folder holding history.json")
    report.set_defaults(handler=_report)

    model = commands.add_parser("model", help="trained models")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    verify = model_commands.add_parser(
        "verify", help="check a model file against its signed manifest (exit 1 on any change)"
    )
    verify.add_argument("model", help="the model file, e.g. RESULTS/models/final_model.pt")
    anchor = verify.add_mutually_exclusive_group()
    anchor.add_argument(
        "--kit",
        help="a startup kit of the federation you hold (site, admin or server): its rootCA.pem "
        "and the server's name it connects to",
    )
    anchor.add_argument(
        "--root-ca", help="rootCA.pem from the federation's startup kit (needs --signer)"
    )
    verify.add_argument(
        "--signer",
        help="require this signer (the server's name in project.yml; default with --kit: the "
        "kit's server)",
    )
    verify.add_argument("--spec", help="also require that the model was trained with this spec")
    verify.set_defaults(handler=_model_verify)

    spec = commands.add_parser("spec", help="job specs")
    spec_commands = spec.add_subparsers(dest="spec_command", required=True)
    spec_check = spec_commands.add_parser("check", help="validate a job spec")
    spec_check.add_argument("spec")
    spec_check.set_defaults(handler=_spec_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)

    from jobs.spec import JobSpecError
    from server_app.history import HistoryError
    from site_app.site_config import SiteConfigError

    user_errors = (
        UserError,
        JobSpecError,
        HistoryError,
        SiteConfigError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
    )
    try:
        from fedseg.deploy_cli import user_errors as deploy_errors
        from simulator.federation import SimulationError

        user_errors = (*user_errors, SimulationError, *deploy_errors())
        status = args.handler(args)
    except user_errors as error:
        error_console.print(f"[red]error:[/red] {escape(str(error))}")
        return 2
    except KeyboardInterrupt:
        error_console.print("[yellow]interrupted[/yellow]")
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
