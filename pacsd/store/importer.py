"""`pacsd import PATH...`: ingest existing Part 10 files through the C-STORE path."""

from __future__ import annotations

import getpass
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from pacsd.config import Config
from pacsd.errors import EXIT_OK, EXIT_PROBLEM
from pacsd.store.ingest import IngestResult, Origin, Store

SKIPPED_NAMES = {"DICOMDIR"}  # media directories index files; they are not instances


def _files(paths: list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for fn in sorted(filenames):
                    yield Path(dirpath) / fn
        else:
            yield p  # a missing path is reported by the ingest attempt


def _unix_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def run(cfg: Config, paths: list[Path]) -> int:
    """Import files and directories (recursed); 0 when all stored or duplicate, else 1."""
    store = Store.open(cfg)
    origin = Origin(calling_ae="IMPORT", source_ip="local", username=_unix_user(),
                    assoc_id=secrets.token_hex(16))
    stored = duplicate = failed = skipped = 0
    try:
        for path in _files(paths):
            if path.name in SKIPPED_NAMES:
                skipped += 1
                continue
            try:
                result: IngestResult = store.ingest_part10_file(path, origin)
            except OSError as exc:
                failed += 1
                print(f"failed: {path}: cannot read: {exc.strerror or exc}")
                continue
            if not result.ok:
                failed += 1
                print(f"failed: {path}: {result.message} (status 0x{result.status:04X})")
            elif result.duplicate and not result.stored:
                duplicate += 1
            else:
                stored += 1
    finally:
        store.close()
    extra = f", {skipped} skipped" if skipped else ""
    print(f"imported {stored + duplicate + failed} files: {stored} stored, "
          f"{duplicate} duplicate, {failed} failed{extra}")
    return EXIT_OK if failed == 0 else EXIT_PROBLEM
