"""Pre-framed P-DATA-TF PDUs, carried through pynetdicom's DUL queue and written as they are.

C-FIND pending responses (`scp/find.py`) and the C-STORE sub-operations of a C-GET
(`scp/sender.py`) are encoded by us into complete P-DATA-TF PDUs. They travel as the one
PDV value of a P-DATA primitive, so they keep their place in the DUL's queue among
pynetdicom's own PDUs, and the DUL thread, which owns the socket, writes them with one
`sendall` (a per-association wrapper of `dul._send`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pynetdicom.pdu_primitives import P_DATA


class Frames:
    """Complete P-DATA-TF PDUs; `done` runs once they are written (or could not be)."""

    __slots__ = ("data", "done")

    def __init__(self, data: bytes | bytearray | memoryview,
                 done: Callable[[], None] | None = None) -> None:
        self.data = data
        self.done = done

    def __len__(self) -> int:  # PresentationDataValueItem.item_length asks
        return len(self.data)


def pdata(context_id: int, frames: Frames) -> P_DATA:
    """The P-DATA primitive that carries `frames` through `dul.send_pdu`."""
    primitive = P_DATA()
    # bypasses the list setter's bytes check, as pynetdicom's own encode_msg does
    primitive.presentation_data_value_list.append((context_id, frames))  # type: ignore[arg-type]
    return primitive


def install(dul: Any) -> None:
    """Let this DUL write `Frames` as they are (idempotent, this association only)."""
    if getattr(dul, "_pacsd_frames", False):
        return
    original = dul._send

    def send(pdu: Any) -> None:
        items = getattr(pdu, "presentation_data_value_items", None)
        frames = items[0].presentation_data_value if items else None
        if type(frames) is not Frames:
            original(pdu)
            return
        try:
            sock = getattr(dul.socket, "socket", None)
            if sock is not None:
                sock.sendall(frames.data)
        except Exception:  # OSError, or ValueError from a socket closed under us: never
            # let it out into the DUL thread; the transport is gone, as AssociationSocket.send
            dul.event_queue.put("Evt17")
        finally:
            frames.data = b""
            if frames.done is not None:
                frames.done()

    dul._send = send
    dul._pacsd_frames = True


__all__ = ["Frames", "install", "pdata"]
