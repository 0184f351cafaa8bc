"""`pacsd user ...`: manage accounts (DESIGN §2). Called by cli.py as run(cfg, args).

Passwords come from a no-echo prompt (asked twice) or one line of standard input
(`--password-stdin`), never from argv or the environment. Every change is recorded
through the audit API as `admin.user` with the operator's Unix user.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import qrcode

from pacsd import audit
from pacsd.auth import aes, operator, passwords, totp, users
from pacsd.auth import secrets as sealed
from pacsd.auth.database import open_auth_db
from pacsd.auth.identity import aad_for
from pacsd.auth.lockout import FOREVER
from pacsd.config import Config
from pacsd.errors import EXIT_OK, AlreadyExists, UsageError

Command = Callable[[Config, argparse.Namespace], int]


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Run one `pacsd user` subcommand; raises PacsdError subclasses for cli.py to map."""
    db = open_auth_db(cfg)
    changes = args.user_command not in ("list", "review") or bool(getattr(args, "disable", False))
    if changes:  # read-only commands neither need nor wait for the audit chain
        audit.start_standalone(cfg)
    try:
        return _COMMANDS[args.user_command](cfg, args)
    finally:
        if changes:
            audit.shutdown(5.0)
        db.close()


# --------------------------------------------------------------------------- helpers


def _audit(action: str, name: str, **fields: Any) -> None:
    # never a password, passcode, code or secret in here
    audit.record(audit.Event.ADMIN_USER, audit.Outcome.SUCCESS, action=action,
                 target_user=name, operator=operator(), **fields)


def _read_password(args: argparse.Namespace) -> str:
    """One line of stdin with --password-stdin, else a no-echo prompt asked twice."""
    if args.password_stdin:
        raw = sys.stdin.buffer.readline()
        if not raw:
            raise UsageError("--password-stdin: no password on standard input")
        try:
            pw = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UsageError("--password-stdin: the password is not valid UTF-8") from None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            try:
                pw = getpass.getpass("New password: ")
                again = getpass.getpass("Repeat password: ")
            except (getpass.GetPassWarning, EOFError):
                raise UsageError(
                    "no terminal to read the password from; use --password-stdin"
                ) from None
        if pw != again:
            raise UsageError("the two passwords differ; nothing changed")
    if not pw:
        raise UsageError("empty password; nothing changed")
    return pw


def _ae_titles(cfg: Config) -> list[str]:
    return [cfg.node.ae_title, *(p.title for p in aes.all_peers())]


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _locked_text(u: users.UserInfo, now: float) -> str | None:
    if not u.locked(now):
        return None
    assert u.locked_until is not None
    return "until unlock" if u.locked_until >= FOREVER else _when(u.locked_until)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# --------------------------------------------------------------------------- commands


def create_user(cfg: Config, name: str, role: str, password: str) -> str:
    """Create a user after the password policy; audited. Raises AlreadyExists, PolicyViolation."""
    name = users.validate_name(name)
    role = users.validate_role(role)
    if users.get(name) is not None:
        raise AlreadyExists(f"user {name!r} already exists")
    pw = passwords.check_policy(cfg.auth.password, password, username=name,
                                ae_titles=_ae_titles(cfg))
    users.add(name, role, passwords.hash_password(pw, cfg.auth.password.bcrypt_rounds))
    _audit("add", name, role=role)
    return name


def _add(cfg: Config, args: argparse.Namespace) -> int:
    users.validate_name(args.name)
    if users.get(args.name) is not None:
        raise AlreadyExists(f"user {args.name!r} already exists")
    name = create_user(cfg, args.name, args.role, _read_password(args))
    print(f"user {name} added (role {args.role})")
    return EXIT_OK


def _passwd(cfg: Config, args: argparse.Namespace) -> int:
    row = users.require(args.name)
    policy = cfg.auth.password
    pw = passwords.check_policy(
        policy, _read_password(args), username=row.name, ae_titles=_ae_titles(cfg),
        has_totp=row.totp_secret is not None,
        previous_hashes=users.previous_hashes(row, policy.history),
    )
    users.set_password(row.name, passwords.hash_password(pw, policy.bcrypt_rounds),
                       history=policy.history)
    _audit("passwd", row.name)
    print(f"password of {row.name} changed")
    return EXIT_OK


def _simple(action: str, fn: Callable[[str], None], done: str) -> Command:
    def command(cfg: Config, args: argparse.Namespace) -> int:
        fn(args.name)
        _audit(action, args.name)
        print(f"user {args.name} {done}")
        return EXIT_OK

    return command


def _totp(cfg: Config, args: argparse.Namespace) -> int:
    row = users.require(args.name)
    box = sealed.box_for(cfg)  # fails clearly when the key file is missing
    secret = totp.new_secret()
    users.set_totp_secret(row.name, box.seal(secret.encode("ascii"), aad=aad_for(row.name)))
    _audit("totp_enrol", row.name, replaced=row.totp_secret is not None)
    uri = totp.provisioning_uri(secret, account=row.name, issuer=f"pacsd {cfg.node.ae_title}")
    if row.totp_secret is not None:
        print(f"the previous TOTP secret of {row.name} no longer works")
    print(f"TOTP enrolled for {row.name}. Add it to an authenticator app now; "
          "this is shown once only:")
    print(uri)
    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(uri)
    qr.make(fit=True)
    qr.print_ascii(out=sys.stdout, invert=True)
    print(f"Over DICOM the passcode of {row.name} is now the password immediately "
          f"followed by the current {totp.DIGITS}-digit code.")
    return EXIT_OK


def _list(cfg: Config, args: argparse.Namespace) -> int:
    now = time.time()
    max_age = cfg.auth.password.max_age_days
    items = [
        {
            "name": u.name, "role": u.role, "state": u.state(now, max_age), "mfa": u.mfa,
            "locked_until": _locked_text(u, now), "last_login": _when(u.last_login),
            "last_address": u.last_address,
        }
        for u in users.all_users()
    ]
    if args.json:
        print(json.dumps(items, indent=2))
        return EXIT_OK
    if not items:
        print("no users")
        return EXIT_OK
    rows = [["NAME", "ROLE", "STATE", "MFA", "LAST LOGIN", "LAST ADDRESS"]]
    rows += [[str(i["name"]), str(i["role"]), str(i["state"]), "on" if i["mfa"] else "off",
              str(i["last_login"] or "never"), str(i["last_address"] or "-")] for i in items]
    print(_table(rows))
    return EXIT_OK


def review_items(cfg: Config, idle_days: int, now: float) -> list[dict[str, Any]]:
    """One dict per account with what a periodic permission review needs, and its flags."""
    max_age = cfg.auth.password.max_age_days
    out = []
    for u in users.all_users():
        idle_since = u.last_login if u.last_login is not None else u.created
        flags = []
        if now - idle_since > idle_days * 86_400:
            flags.append("stale")
        if u.expired(now, max_age):
            flags.append("expired")
        if u.locked(now):
            flags.append("locked")
        if u.last_login is None:
            flags.append("never_used")
        out.append({
            "name": u.name, "role": u.role, "state": u.state(now, max_age),
            "enabled": u.enabled, "last_login": _when(u.last_login),
            "last_address": u.last_address,
            "password_age_days": int((now - u.password_set) // 86_400),
            "mfa": u.mfa, "flags": flags,
        })
    return out


def _review(cfg: Config, args: argparse.Namespace) -> int:
    idle_days = cfg.auth.stale_after_days if args.idle_days is None else args.idle_days
    if idle_days < 1:
        raise UsageError(f"--idle-days: {idle_days} must be at least 1")
    now = time.time()
    items = review_items(cfg, idle_days, now)
    disabled: list[str] = []
    if args.disable:
        for item in items:
            if "stale" in item["flags"] and item["enabled"]:
                users.set_enabled(item["name"], False)
                _audit("disable", item["name"], why="stale", idle_days=idle_days)
                item["enabled"], item["state"] = False, "disabled"
                disabled.append(item["name"])
    if args.json:
        print(json.dumps({"idle_days": idle_days, "users": items, "disabled": disabled},
                         indent=2))
        return EXIT_OK
    if not items:
        print("no users")
    else:
        rows = [["NAME", "ROLE", "STATE", "LAST LOGIN", "LAST ADDRESS", "PW AGE", "MFA",
                 "FLAGS"]]
        rows += [[i["name"], i["role"], i["state"], i["last_login"] or "never",
                  i["last_address"] or "-", f"{i['password_age_days']}d",
                  "on" if i["mfa"] else "off", ",".join(i["flags"]) or "-"] for i in items]
        print(_table(rows))
    if args.disable:
        print(f"disabled {len(disabled)} stale account(s)"
              + (f": {', '.join(disabled)}" if disabled else ""))
    return EXIT_OK


_COMMANDS: dict[str, Command] = {
    "add": _add,
    "passwd": _passwd,
    "lock": _simple("lock", users.lock, "locked until `pacsd user unlock`"),
    "unlock": _simple("unlock", users.unlock, "unlocked"),
    "disable": _simple("disable", lambda n: users.set_enabled(n, False), "disabled"),
    "enable": _simple("enable", lambda n: users.set_enabled(n, True), "enabled"),
    "totp": _totp,
    "list": _list,
    "review": _review,
}
