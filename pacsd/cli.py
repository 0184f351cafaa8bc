"""Command-line front end: parse, call app/admin functions, map errors to exit codes.

Only this module turns a PacsdError into an exit status and a one-line message
on stderr; nothing below it calls sys.exit().
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pacsd import __version__
from pacsd import config as configmod
from pacsd.errors import EXIT_OK, EXIT_USAGE, PacsdError, UsageError

Handler = Callable[[argparse.Namespace], int]


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config)


# --------------------------------------------------------------------------- node lifecycle


def _cmd_serve(args: argparse.Namespace) -> int:
    from pacsd import daemon

    return daemon.serve(_load(args))


def _cmd_worker(args: argparse.Namespace) -> int:
    from pacsd import daemon

    return daemon.run_worker(daemon.worker_config(args.config or str(configmod.default_path())),
                             args.fd, args.index)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from pacsd import app

    problems = app.check(_load(args))
    for line in problems:
        print(line)
    if problems:
        return 1
    print("configuration OK")
    return EXIT_OK


def _cmd_init(args: argparse.Namespace) -> int:
    from pacsd import setup

    cfg_path = setup.init_node(Path(args.dir), ae_title=args.ae_title, port=args.port,
                               encryption=args.encryption)
    print(f"created {cfg_path}")
    return EXIT_OK


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from pacsd import setup

    return setup.quickstart(Path(args.dir), port=args.port, serve=not args.no_serve)


def _cmd_cert_issue(args: argparse.Namespace) -> int:
    from pacsd import setup

    cert, key = setup.issue_client_cert(_load(args), args.name, Path(args.out), args.days,
                                        server=args.server, hosts=tuple(args.san))
    print(f"wrote {cert} and {key}")
    return EXIT_OK


# --------------------------------------------------------------------------- peers (AE titles)


def _cmd_ae(args: argparse.Namespace) -> int:
    from pacsd.auth import aecli

    return aecli.run(_load(args), args)


# --------------------------------------------------------------------------- people (users)


def _cmd_user(args: argparse.Namespace) -> int:
    from pacsd.auth import usercli

    return usercli.run(_load(args), args)


# --------------------------------------------------------------------------- store


def _cmd_verify(args: argparse.Namespace) -> int:
    from pacsd.store import verify

    return verify.run(_load(args), as_json=args.json)


def _cmd_import(args: argparse.Namespace) -> int:
    from pacsd.store import importer

    return importer.run(_load(args), [Path(p) for p in args.paths])


def _cmd_backup(args: argparse.Namespace) -> int:
    from pacsd.store import backup

    return backup.run_backup(_load(args), Path(args.dest), encrypt=args.encrypt)


def _cmd_restore(args: argparse.Namespace) -> int:
    from pacsd.store import backup

    return backup.run_restore(_load(args), Path(args.src))


def _cmd_key(args: argparse.Namespace) -> int:
    from pacsd import keycli

    cfg = _load(args)
    if args.key_command == "rotate":
        return keycli.run_rotate(cfg)
    if args.key_command == "rewrap":
        return keycli.run_rewrap(cfg, rate_mb=args.rate, retire=args.retire)
    if args.key_command == "encrypt-existing":
        return keycli.run_encrypt_existing(cfg, rate_mb=args.rate)
    return keycli.run_list(cfg)


# --------------------------------------------------------------------------- audit


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from pacsd import audit

    return audit.verify_file(Path(args.file))


# --------------------------------------------------------------------------- parser


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pacsd", description="pacsd: a DICOM node with mutual TLS and audited access"
    )
    p.add_argument("--config", metavar="PATH",
                   help="config file (default: $PACSD_CONFIG, then /etc/pacsd/pacsd.toml)")
    p.add_argument("--version", action="version", version=f"pacsd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, handler: Handler, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        sp.set_defaults(handler=handler)
        return sp

    cmd("serve", _cmd_serve, "run the node in the foreground (systemd Type=notify)")
    w = sub.add_parser("_worker")  # internal: a pre-forked worker started by `serve`
    w.set_defaults(handler=_cmd_worker)
    w.add_argument("--fd", type=int, required=True)
    w.add_argument("--index", type=int, default=0)
    cmd("check-config", _cmd_check_config,
        "validate config, certificates and databases; print what is wrong")
    sp = cmd("init", _cmd_init, "create DIR/pacsd.toml, a development PKI and empty databases")
    sp.add_argument("dir")
    sp.add_argument("--ae-title", default="PACSD")
    sp.add_argument("--port", type=int, default=2762)
    sp.add_argument("--encryption", action="store_true", help="encrypt objects at rest")
    sp = cmd("quickstart", _cmd_quickstart,
             "init if needed, register a demo modality and user, then serve on 127.0.0.1")
    sp.add_argument("dir", nargs="?", default="pacsd-demo")
    sp.add_argument("--port", type=int, default=2762)
    sp.add_argument("--no-serve", action="store_true", help="set up and print, but do not serve")

    cert = sub.add_parser("cert", help="certificates from the development CA")
    csub = cert.add_subparsers(dest="cert_command", required=True)
    sp = cmd("issue", _cmd_cert_issue, "issue a client certificate (key written 0600)", csub)
    sp.add_argument("name")
    sp.add_argument("--out", default=".")
    sp.add_argument("--days", type=int, default=365)
    sp.add_argument("--server", action="store_true",
                    help="also serverAuth, for a peer that receives associations from pacsd "
                         "(C-MOVE destination, storage commitment reports)")
    sp.add_argument("--san", action="append", default=[], metavar="NAME",
                    help="subject alternative name (host name or IP) for --server; repeatable")

    ae = sub.add_parser("ae", help="manage peer AE titles bound to certificates")
    asub = ae.add_subparsers(dest="ae_command", required=True)
    sp = cmd("add", _cmd_ae, "register a peer AE bound to its certificate", asub)
    sp.add_argument("title")
    sp.add_argument("--cert", required=True, metavar="PEM")
    sp.add_argument("--host", action="append", default=[], metavar="CIDR")
    sp.add_argument("--permit", type=_csv, default=None, metavar="SERVICES",
                    help="comma list of echo,store,commit,find,move,get (default: echo,store)")
    sp.add_argument("--require-user", action="store_true")
    sp.add_argument("--dest", metavar="HOST:PORT")
    sp.add_argument("--move-to", type=_csv, default=[], metavar="AE,...")
    sp = cmd("list", _cmd_ae, "list registered peers", asub)
    sp.add_argument("--json", action="store_true")
    for name in ("show", "remove", "disable", "enable"):
        sp = cmd(name, _cmd_ae, f"{name} a registered peer", asub)
        sp.add_argument("title")

    user = sub.add_parser("user", help="manage users")
    usub = user.add_subparsers(dest="user_command", required=True)
    sp = cmd("add", _cmd_user, "create a user (password from a prompt or --password-stdin)", usub)
    sp.add_argument("name")
    sp.add_argument("--role", required=True, choices=("modality", "workstation", "admin"))
    sp.add_argument("--password-stdin", action="store_true")
    sp = cmd("passwd", _cmd_user, "set a user's password", usub)
    sp.add_argument("name")
    sp.add_argument("--password-stdin", action="store_true")
    for name in ("lock", "unlock", "disable", "enable", "totp"):
        sp = cmd(name, _cmd_user, f"{name} a user", usub)
        sp.add_argument("name")
    sp = cmd("list", _cmd_user, "list users", usub)
    sp.add_argument("--json", action="store_true")
    sp = cmd("review", _cmd_user, "list stale, expired and locked accounts", usub)
    sp.add_argument("--idle-days", type=int, default=None)
    sp.add_argument("--disable", action="store_true")
    sp.add_argument("--json", action="store_true")

    sp = cmd("verify", _cmd_verify, "recompute SHA-256 of every object; exit 1 on any problem")
    sp.add_argument("--json", action="store_true")
    sp = cmd("import", _cmd_import, "ingest DICOM files through the C-STORE path")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp = cmd("backup", _cmd_backup, "consistent snapshot of databases and objects")
    sp.add_argument("dest")
    sp.add_argument("--encrypt", action="store_true",
                    help="write databases and objects as AES-256-GCM envelopes")
    sp = cmd("restore", _cmd_restore, "restore a backup into the (empty) configured locations")
    sp.add_argument("src")

    key = sub.add_parser("key", help="encryption keys at rest: versions, rotation, rewrap")
    ksub = key.add_subparsers(dest="key_command", required=True)
    cmd("list", _cmd_key, "key versions and the objects each encrypts", ksub)
    cmd("rotate", _cmd_key, "a new key version for new objects and secrets", ksub)
    sp = cmd("rewrap", _cmd_key, "re-encrypt objects of older key versions (resumable)", ksub)
    sp.add_argument("--rate", type=float, default=50.0, metavar="MB/S",
                    help="throughput cap so the node keeps serving (0 = none)")
    sp.add_argument("--retire", action="store_true",
                    help="then drop data keys that no object uses any more")
    sp = cmd("encrypt-existing", _cmd_key, "encrypt plaintext objects in place (resumable)",
             ksub)
    sp.add_argument("--rate", type=float, default=50.0, metavar="MB/S",
                    help="throughput cap so the node keeps serving (0 = none)")

    aud = sub.add_parser("audit", help="audit trail tools")
    ausub = aud.add_subparsers(dest="audit_command", required=True)
    sp = cmd("verify", _cmd_audit_verify, "check the hash chain of audit records in a file", ausub)
    sp.add_argument("file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one pacsd command; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its usage line
        return int(exc.code or 0) and EXIT_USAGE
    try:
        return int(args.handler(args))
    except PacsdError as exc:
        print(f"pacsd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


__all__ = ["UsageError", "build_parser", "main"]
