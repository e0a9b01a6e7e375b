"""``fedseg provision``, ``fedseg poc`` and ``fedseg job``: parsing and printing only.

The work is done by ``provisioning`` (FLARE provisioning, POC processes), ``researcher_app.session``
(FLARE's Session API) and ``site_app.kit_check``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from fedseg.terminal import console, int_at_least
from jobs.text_tables import format_number

# -- provision -----------------------------------------------------------------------------------


def _provision(args: argparse.Namespace) -> None:
    from provisioning.provision import provision, template_text
    from site_app.kit_check import format_sha256

    if args.write_template:
        path = Path(args.write_template)
        if path.exists():
            raise FileExistsError(f"{path} exists; choose another name or remove it first")
        path.write_text(template_text())
        console.print(
            f"[green]wrote[/green] {escape(str(path))}: edit the participants and policy, then "
            f"run `fedseg provision --project {escape(str(path))} --out DIR`"
        )
        return
    if not args.project or not args.out:
        raise FileNotFoundError("pass --project FILE and --out DIR (or --write-template FILE)")
    federation = provision(args.project, args.out)
    table = Table(
        title=f"startup kits of {escape(federation.project)} in {escape(str(federation.kits_dir))}"
    )
    for column in ("participant", "role", "kit"):
        table.add_column(column)
    rows = [(federation.server, "server", federation.server_kit)]
    rows += [(site, "site", kit) for site, kit in sorted(federation.sites.items())]
    rows += [(name, role, kit) for name, (role, kit) in sorted(federation.admins.items())]
    for name, role, kit in rows:
        table.add_row(escape(name), escape(role), escape(str(kit)))
    console.print(table)
    console.print(
        "Send each kit to its owner over a secure channel. Site admins edit "
        "local/fedseg_site.yaml (data path, policy) and run `fedseg site check --kit KIT "
        "--root-ca-sha256 FINGERPRINT`."
    )
    if federation.root_ca_sha256 is not None:
        console.print(
            f"[bold]root CA sha256[/bold]: {format_sha256(federation.root_ca_sha256)}\n"
            "Tell this fingerprint to each site admin out of band (read it out by phone, not in "
            "the message carrying the kit): whoever can change a kit on its way can also swap "
            "its root CA and re-sign it, and only this fingerprint shows the swap."
        )
    console.print(
        f"[yellow]keep private[/yellow]: {escape(str(federation.kits_dir.parent / 'state'))} "
        "holds the root CA key (owner-only); whoever reads it can issue kits for this project"
    )


# -- poc ---------------------------------------------------------------------------------------


def _poc_default_data(args: argparse.Namespace) -> Path:
    """Without --data: small simulated sites in the workspace (kept, so a restart reuses them).

    Composed here rather than in ``provisioning``, which does not depend on the simulator.
    """
    from simulator.synthetic_data import generate_federation_data

    data_dir = Path(args.workspace).resolve() / "data"
    if not (data_dir / "manifest.json").is_file():
        console.print(
            f"no --data: writing {args.sites} small simulated site(s) to {escape(str(data_dir))}"
        )
        generate_federation_data(
            out_dir=data_dir, sites=args.sites, patients_per_site=12, seed=0, matrix=64
        )
    return data_dir


def _poc_start(args: argparse.Namespace) -> None:
    from provisioning.poc import start_poc

    data_dir = Path(args.data) if args.data else _poc_default_data(args)
    console.print(f"provisioning and starting a server and {args.sites} site(s) on loopback…")
    state = start_poc(Path(args.workspace), sites=args.sites, data_dir=data_dir, port=args.port)
    federation = state.federation
    console.print(
        f"[green]ready[/green]: {len(federation.sites)} site(s) connected after "
        f"{state.connected_after_s:.1f} s; server localhost:{federation.port}"
    )
    researcher = federation.admin_with_role("lead")
    console.print(
        f"submit a job: fedseg job submit jobs/specs/demo.yaml --kit "
        f"{escape(str(federation.admins[researcher][1]))}\nstop: fedseg poc stop --workspace "
        f"{escape(args.workspace)}"
    )


def _poc_stop(args: argparse.Namespace) -> None:
    from provisioning.poc import stop_poc

    forced = stop_poc(Path(args.workspace))
    note = f" ({escape(', '.join(forced))} had to be killed)" if forced else ""
    console.print(f"[green]stopped[/green]: no POC process left{note}")


def _poc_status(args: argparse.Namespace) -> None:
    from provisioning.poc import PocState, connected_sites

    state = PocState.load(Path(args.workspace))
    sites = connected_sites(state.federation)
    console.print(
        f"connected: {escape(', '.join(sites) or 'none')} (kits in {escape(str(state.kits_dir))})"
    )


# -- job -----------------------------------------------------------------------------------------


def _job_submit(args: argparse.Namespace) -> None:
    from jobs.spec import load_spec
    from researcher_app.session import submit

    spec = load_spec(args.spec)
    job_id = submit(spec, Path(args.kit), sites=args.sites)
    console.print(f"[green]submitted[/green] {escape(spec.name)}: job id {escape(job_id)}")
    console.print(f"follow it: fedseg job status {escape(job_id)} --kit {escape(args.kit)}")


def _job_list(args: argparse.Namespace) -> None:
    from researcher_app.session import list_jobs

    table = Table(title="jobs")
    for column in ("job id", "name", "status", "submitted", "duration"):
        table.add_column(column)
    for job in list_jobs(Path(args.kit)):
        cells = (
            job.get("job_id", "?"),
            job.get("job_name", "?"),
            job.get("status", "?"),
            job.get("submit_time", ""),
            job.get("duration", ""),
        )
        table.add_row(*(escape(str(cell)) for cell in cells))  # FLARE's answer: data, not markup
    console.print(table)


def _job_status(args: argparse.Namespace) -> int:
    from researcher_app.session import job_status

    status = job_status(Path(args.kit), args.job_id)
    planned = "?" if status.rounds_planned is None else status.rounds_planned
    console.print(
        f"[bold]{escape(status.name)}[/bold] ({escape(status.job_id)}): "
        f"{escape(status.status)}; round {status.rounds_done}/{planned}; sites connected: "
        f"{escape(', '.join(status.sites_connected) or 'none')}"
    )
    if status.sites:
        table = Table()
        for column in ("site", "last round", "val Dice", "epsilon", "budget left", "note"):
            table.add_column(column)
        for site in status.sites:
            notes = []
            if site.refused:
                notes.append(f"refused: {site.refused}")
            if site.missing_rounds:
                notes.append(f"no result in round(s) {[r + 1 for r in site.missing_rounds]}")
            table.add_row(
                escape(site.site),
                "-" if site.last_round is None else str(site.last_round + 1),
                format_number(site.val_dice),
                format_number(site.epsilon, 2),
                format_number(site.budget_left, 2),
                escape("; ".join(notes)),
            )
        console.print(table)
    for line in status.errors:
        console.print(f"[red]site error[/red] {escape(line)}")
    if status.status == "FINISHED:ABNORMAL" and status.rounds_done:
        console.print(
            "[yellow]note[/yellow]: FLARE marks a job ABNORMAL when a site lost its job process "
            f"(e.g. it was restarted); {status.rounds_done} round(s) were aggregated and saved — "
            "the rounds a site missed are listed above"
        )
    return 0


def _job_abort(args: argparse.Namespace) -> None:
    from researcher_app.session import abort

    abort(Path(args.kit), args.job_id)
    console.print(f"[yellow]aborted[/yellow] {escape(args.job_id)}")


def _job_download(args: argparse.Namespace) -> None:
    from researcher_app.session import download
    from server_app.history import read_history
    from server_app.report import write_report
    from server_app.report_render import final_table

    out = download(Path(args.kit), args.job_id, Path(args.out))
    history = read_history(out / "history.json")
    report = write_report(history, spec=history.spec or {}, out_dir=out)
    console.print(final_table(report))
    console.print(
        f"report: {escape(str(out / 'report.md'))}; models: {escape(str(out / 'models'))}"
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Add the deployment command groups to the top-level parser."""
    provision = commands.add_parser(
        "provision", help="project admin: FLARE startup kits for server, sites and admins"
    )
    provision.add_argument("--project", help="project file (FLARE project.yml + fedseg builders)")
    provision.add_argument("--out", help="folder for the kits")
    provision.add_argument("--write-template", metavar="FILE", help="write the project template")
    provision.set_defaults(handler=_provision)

    poc = commands.add_parser("poc", help="a real FLARE server and sites on this machine")
    poc_commands = poc.add_subparsers(dest="poc_command", required=True)
    start = poc_commands.add_parser("start", help="provision, start and wait until connected")
    start.add_argument("--sites", type=int_at_least(1), default=2)
    start.add_argument("--workspace", default="poc", help="folder for kits, logs and state")
    start.add_argument(
        "--data", help="folder from `fedseg simulate data` (default: generated in the workspace)"
    )
    start.add_argument("--port", type=int_at_least(1), help="server port (default: a free one)")
    start.set_defaults(handler=_poc_start)
    for name, handler, text in (
        ("stop", _poc_stop, "shut the POC down; no process is left"),
        ("status", _poc_status, "sites connected now"),
    ):
        sub = poc_commands.add_parser(name, help=text)
        sub.add_argument("--workspace", default="poc")
        sub.set_defaults(handler=handler)

    job = commands.add_parser("job", help="researcher: jobs on a real federation")
    job_commands = job.add_subparsers(dest="job_command", required=True)
    submit = job_commands.add_parser("submit", help="submit a job spec")
    submit.add_argument("spec")
    submit.add_argument("--sites", nargs="+", help="sites to train at (default: all connected)")
    listing = job_commands.add_parser("list", help="jobs you may see")
    status = job_commands.add_parser("status", help="round, sites, epsilon, refusals")
    status.add_argument("job_id")
    abort = job_commands.add_parser("abort", help="stop a running job")
    abort.add_argument("job_id")
    download = job_commands.add_parser("download", help="results, models and report of a job")
    download.add_argument("job_id")
    download.add_argument("--out", required=True)
    for sub, handler in (
        (submit, _job_submit),
        (listing, _job_list),
        (status, _job_status),
        (abort, _job_abort),
        (download, _job_download),
    ):
        sub.add_argument("--kit", required=True, help="your admin startup kit folder")
        sub.set_defaults(handler=handler)


def user_errors() -> tuple[type[Exception], ...]:
    from provisioning.poc import PocError
    from provisioning.provision import ProvisioningError
    from researcher_app.session import FederationError

    return (FederationError, PocError, ProvisioningError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `fedseg` command")
