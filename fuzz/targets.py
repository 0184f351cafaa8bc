"""In-process fuzz targets: pacsd's request path as pynetdicom and pacsd run it.

Each target takes bytes (or a Dataset) and raises `Finding` only for what must never
happen: an exception escaping where the node has no handler for it, a decision that lets
garbage through, a partial file or row left behind, or a slow input (a hang). Exceptions
the node already turns into an abort or a DIMSE status (documented per target) are the
expected outcome of garbage and are counted, not reported.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

SLOW_SECONDS = 5.0  # one input taking longer than this is reported as a hang (2 shared cores)


class Finding(AssertionError):
    """Something the node must never do with this input."""


@dataclass
class Stats:
    executions: int = 0
    rejected: int = 0  # garbage the node refused the intended way
    accepted: int = 0
    findings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    took = time.monotonic() - t0
    if took > SLOW_SECONDS:
        raise Finding(f"{what} took {took:.1f} s")


# ------------------------------------------------------------------------------ PDUs

def decode_pdu(data: bytes) -> Any:
    """Decode as pynetdicom's DUL does (`_read_pdu_data` + `_decode_pdu`), then convert to
    the primitive as the state machine's actions do.

    pynetdicom turns an exception while decoding into Evt19 (A-ABORT); one in
    `to_primitive` kills the DUL thread, which ends the association (a close). Both are
    refusals; returns None for them. Anything slow is a finding.
    """
    from pynetdicom.dul import _PDU_TYPES  # noqa: TID251 - the harness drives pynetdicom's decoder

    if len(data) < 6 or data[0:1] not in _PDU_TYPES:
        return None
    length = int.from_bytes(data[2:6], "big")
    if length != len(data) - 6:
        return None  # the reader would wait for more bytes (bounded by network_timeout)
    cls, _ = _PDU_TYPES[data[0:1]]
    with timed("PDU decode"):
        try:
            pdu = cls()
            pdu.decode(data)
        except Exception:
            return None
        try:
            return pdu.to_primitive()
        except Exception:
            return None


def admit(primitive: Any, cfg: Any) -> str:
    """What admission (scp/admission.py) reads from an A-ASSOCIATE-RQ primitive, and gate 4
    (`identity.verify_identity`) on its user identity item. Returns the decision reason.
    verify_identity must never raise on peer data."""
    from pacsd.auth import aes, identity

    calling = str(primitive.calling_ae_title).strip()
    called = str(primitive.called_ae_title).strip()
    len(primitive.presentation_context_definition_list)
    with timed("AE lookup"):
        try:
            aes.get(calling)
        except Exception as exc:
            raise Finding(f"aes.get({calling!r}) raised {exc!r}") from exc
    _ = called
    item = None
    for sub in primitive.user_information or []:
        if type(sub).__name__ == "UserIdentityNegotiation":
            item = sub
    if item is None:
        return "no_identity"
    try:
        with timed("verify_identity"):
            d = identity.verify_identity(
                cfg, user_type=int(item.user_identity_type or 0),
                primary=bytes(item.primary_field or b""),
                secondary=bytes(item.secondary_field or b""),
                source_ip="127.0.0.1", require_user=True)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"verify_identity raised {exc!r}") from exc
    if d.ok:
        raise Finding(f"a fuzzed identity was accepted: {item!r}")
    return str(d.reason)


def associate_rq(data: bytes, cfg: Any, stats: Stats) -> None:
    """Target: A-ASSOCIATE-RQ bytes through decode and admission's reading of them."""
    stats.executions += 1
    prim = decode_pdu(data)
    if prim is None or type(prim).__name__ != "A_ASSOCIATE":
        stats.rejected += 1
        return
    admit(prim, cfg)
    stats.accepted += 1


# ------------------------------------------------------------------------------ DIMSE

class _FakeAssoc:
    """Enough of an Association for DIMSEMessage.decode_msg (non-chunked path) with
    pacsd's scp/limits.py installed: an AE carrying the limit, a DUL event queue."""

    class ae:
        pacsd_max_request = 4096 * 1024

    def __init__(self) -> None:
        import queue

        self.dul = type("Dul", (), {"event_queue": queue.Queue()})()
        self._accepted_cx: dict[int, Any] = {}


def dimse(command_set: bytes, dataset: bytes | None, stats: Stats) -> None:
    """Target: a command set (and dataset) through pynetdicom's DIMSE decoding, as
    `DIMSEServiceProvider.receive_primitive` runs it, with pacsd's scp/limits.py
    installed. pynetdicom catches exceptions from `message_to_primitive` (Evt19: abort);
    one escaping `decode_msg` runs into the state machine and kills the DUL thread, so it
    is a finding (limits.py turns it into an audited abort)."""
    from pynetdicom import _config  # noqa: TID251 - the harness drives pynetdicom's decoder
    from pynetdicom.dimse_messages import DIMSEMessage  # noqa: TID251
    from pynetdicom.pdu_primitives import P_DATA  # noqa: TID251

    from pacsd.scp import limits

    limits.apply()
    stats.executions += 1
    msg = DIMSEMessage()
    p = P_DATA()
    pdvs = [[1, b"\x03" + command_set]]
    if dataset is not None:
        pdvs.append([1, b"\x02" + dataset])
    p.presentation_data_value_list = pdvs  # type: ignore[assignment]
    chunked = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = False
    try:
        with timed("DIMSE decode"):
            assoc = _FakeAssoc()
            try:
                done = msg.decode_msg(p, assoc)
            except Exception as exc:
                raise Finding(f"decode_msg raised {type(exc).__name__}: {exc}") from exc
            if not done:
                stats.rejected += 1
                return
            try:
                prim = msg.message_to_primitive()
            except Exception:
                stats.rejected += 1
                return
            ds = getattr(prim, "Identifier", None) or getattr(prim, "DataSet", None)
            if isinstance(ds, BytesIO):
                ds.getvalue()
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = chunked
    stats.accepted += 1


# ------------------------------------------------------------------------------ C-FIND

def decode_identifier(data: bytes, implicit: bool) -> Any:
    """As the C-FIND handler gets it: `event.identifier` (pynetdicom's dsutils.decode)
    through scp/qr.py's own `_identifier`. Raises QueryError (C000) for bytes that do not
    decode."""
    from pynetdicom.dsutils import decode  # noqa: TID251 - as pynetdicom decodes it

    from pacsd.scp import qr

    class Event:
        @property
        def identifier(self) -> Any:
            return decode(BytesIO(data), implicit, True, False)

    return qr._identifier(Event())


def find_identifier(data: bytes, implicit: bool, model: str, stats: Stats, *,
                    limit: int = 20) -> None:
    """Target: an encoded C-FIND identifier through decoding and store/query.py. Only
    QueryError (a DIMSE failure status naming the problem) may come out; anything else
    is answered by scp/qr.py as "unable to process" (C001, a server fault, audited as a
    major failure, traceback logged), which is wrong for a peer's bad input. Results
    never exceed limit + 1. The node answers with `find_encoded` (matches encoded by
    hand): its bytes must equal pydicom's encoding of what `find` returns, match by
    match, in both VRs."""
    from pacsd.store import query

    stats.executions += 1
    try:
        with timed("C-FIND"):
            q = query.parse(decode_identifier(data, implicit), model)
            n = 0
            plain = list(query.find(q, limit=limit))
            for vr in (True, False):
                fast = list(query.find_encoded(q, limit=limit, implicit_vr=vr))
                want = [query.encode_dataset(ds, vr) for ds in plain]
                if fast != want:
                    at = next((i for i, (a, b) in enumerate(zip(fast, want, strict=False))
                               if a != b), min(len(fast), len(want)))
                    raise Finding(f"find_encoded ({'implicit' if vr else 'explicit'} VR) "
                                  f"differs from find: {len(fast)} vs {len(want)} matches, "
                                  f"first difference at match {at}")
            n = len(plain)
    except query.QueryError:
        stats.rejected += 1
        return
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"query raised {type(exc).__name__}: {exc}") from exc
    if n > limit + 1:
        raise Finding(f"{n} results with limit {limit}")
    stats.accepted += 1


# ------------------------------------------------------------------------------ Part 10

def part10(data: bytes, store: Any, work: Path, stats: Stats) -> None:
    """Target: a Part 10 file through Store.ingest_part10_file (the `import` path).
    It returns a result for any content; afterwards no temp file is left and a success
    has its row and its object."""
    from pacsd.store.index import Instance
    from pacsd.store.ingest import SUCCESS, Origin

    stats.executions += 1
    f = work / "in.dcm"
    f.write_bytes(data)
    origin = Origin(calling_ae="FUZZ", source_ip="127.0.0.1", username="", assoc_id="f" * 32)
    try:
        with timed("ingest"):
            r = store.ingest_part10_file(f, origin)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"ingest_part10_file raised {type(exc).__name__}: {exc}") from exc
    left = list(store.objects.tmp.iterdir())
    if left:
        raise Finding(f"temp files left behind: {left}")
    if r.status == SUCCESS:
        row = Instance.get_or_none(Instance.sha256 == r.sha256) if r.sha256 else None
        if row is None:
            raise Finding("Success without an index row")
        if not store.objects.path_for(r.sha256).exists():
            raise Finding("Success without an object file")
        stats.accepted += 1
    else:
        stats.rejected += 1
