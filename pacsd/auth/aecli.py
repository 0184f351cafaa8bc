"""`pacsd ae ...`: register, list, show, remove, disable and enable peer AE titles."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pacsd import tls
from pacsd.auth import aes, operator
from pacsd.auth.database import open_auth_db
from pacsd.config import Config, parse_host_port
from pacsd.errors import ConfigError, UsageError


def _audit(action: str, title: str, **fields: object) -> None:
    from pacsd import audit

    audit.record(audit.Event("admin.ae"), audit.Outcome.SUCCESS, action=action, target_ae=title,
                 operator=operator(), **fields)


def _print_peer(p: aes.Peer) -> None:
    print(f"{p.title}")
    print(f"  enabled:       {'yes' if p.enabled else 'no'}")
    print(f"  certificate:   sha256 {p.cert_sha256}")
    print(f"  subject:       {p.cert_subject}")
    print(f"  not after:     {p.cert_not_after}")
    print(f"  permits:       {','.join(sorted(p.permits, key=aes.SERVICES.index)) or '-'}")
    print(f"  hosts:         {', '.join(p.hosts) or 'any'}")
    print(f"  require user:  {'yes' if p.require_user else 'no'}")
    print(f"  destination:   {p.dest or '-'}")
    print(f"  may move to:   {', '.join(p.move_to) or '-'}")


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Dispatch `pacsd ae <command>`; raises PacsdError subclasses on operator mistakes."""
    from pacsd import audit

    db = open_auth_db(cfg)
    audit.start_standalone(cfg)
    try:
        return _dispatch(args)
    finally:
        audit.shutdown(5.0)
        db.close()


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.ae_command
    if cmd == "add":
        info = tls.read_cert(Path(args.cert))
        if args.dest:
            try:
                parse_host_port(args.dest, "--dest")
            except ConfigError as exc:
                raise UsageError(str(exc)) from None
        peer = aes.add(
            args.title, cert_sha256=info.sha256, cert_subject=info.subject,
            cert_not_after=info.not_after.isoformat(), hosts=args.host, permits=args.permit,
            require_user=args.require_user, dest=args.dest or "", move_to=args.move_to,
        )
        _audit("add", peer.title, cert_sha256=peer.cert_sha256,
               permits=sorted(peer.permits), hosts=list(peer.hosts))
        print(f"registered {peer.title} (certificate sha256 {peer.cert_sha256})")
    elif cmd == "list":
        peers = aes.all_peers()
        if args.json:
            print(json.dumps([p.as_dict() for p in peers], indent=2))
        else:
            for p in peers:
                print(f"{p.title:<16} {'enabled ' if p.enabled else 'disabled'} "
                      f"{','.join(sorted(p.permits, key=aes.SERVICES.index)):<28} "
                      f"{p.cert_sha256[:16]}…")
    elif cmd == "show":
        _print_peer(aes.require(args.title))
    elif cmd == "remove":
        aes.remove(args.title)
        _audit("remove", args.title)
        print(f"removed {args.title}")
    elif cmd in ("disable", "enable"):
        aes.set_enabled(args.title, cmd == "enable")
        _audit(cmd, args.title)
        print(f"{cmd}d {args.title}")
    return 0
