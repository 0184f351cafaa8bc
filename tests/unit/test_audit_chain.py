"""The hash chain and `audit verify`: intact files pass, any lost or altered record is named.

The records come from a real Sequencer whose syslog target does not exist, so they land
in its spool file: the same RFC 5424 lines rsyslog would have written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsd import audit, config
from pacsd.audit import chain
from pacsd.audit.events import Event, Outcome
from pacsd.audit.sequencer import SPOOL_FILE, Sequencer
from pacsd.errors import EnvironmentProblem


def make_cfg(tmp: Path, spool: str = "spool", fmt: str = "json") -> config.Config:
    text = (f'[audit]\nsyslog = "unix://{tmp}/nobody-listens.sock"\nspool = "{spool}"\n'
            f'format = "{fmt}"\n')
    return config.parse(text, tmp / "pacsd.toml")


def spooled_lines(tmp: Path, n: int, fmt: str = "json", spool: str = "spool") -> list[str]:
    seq = Sequencer(make_cfg(tmp, spool, fmt), listen=False)
    for i in range(n):
        seq.submit({"ts": "2026-01-01T00:00:00.000000Z", "event": Event.DICOM_STORE.value,
                    "outcome": int(Outcome.SUCCESS), "study_uid": f"1.2.3.{i}", "instances": i,
                    "calling_ae": "CT1", "source_ip": "192.0.2.1"})
    seq.shutdown(10)
    return (tmp / spool / SPOOL_FILE).read_text().splitlines(keepends=True)


def run_verify(tmp: Path, lines: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    f = tmp / "syslog.txt"
    f.write_text("".join(lines))
    rc = audit.verify_file(f)
    return rc, capsys.readouterr().out


def test_intact_file_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = spooled_lines(tmp_path, 12)
    assert len(lines) == 12
    rc, out = run_verify(tmp_path, lines, capsys)
    assert rc == 0, out
    assert "OK: 12 records, seq 1..12" in out


def test_deleted_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = spooled_lines(tmp_path, 10)
    del lines[3]  # seq 4
    rc, out = run_verify(tmp_path, lines, capsys)
    assert rc == 1
    assert "line 4:" in out and "seq 4 missing" in out


def test_edited_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = spooled_lines(tmp_path, 10)
    assert '"study_uid":"1.2.3.5"' in lines[5]
    lines[5] = lines[5].replace('"study_uid":"1.2.3.5"', '"study_uid":"1.2.3.99"')
    rc, out = run_verify(tmp_path, lines, capsys)
    assert rc == 1
    assert "line 6:" in out and "seq 6 altered" in out


def test_edit_with_recomputed_chain_is_caught_at_the_next_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    lines = spooled_lines(tmp_path, 6)
    head, body = lines[2].split(" - ", 1)
    rec = json.loads(body)
    prev_chain = json.loads(lines[1].split(" - ", 1)[1])["chain"]
    rec["instances"] = 1000
    rec["chain"] = chain.link(prev_chain, chain.json_payload(rec))
    lines[2] = f"{head} - {chain.canonical(rec)}\n"
    rc, out = run_verify(tmp_path, lines, capsys)
    assert rc == 1 and "line 4:" in out and "seq 4 altered" in out


def test_reorder_duplicate_and_foreign_lines(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    lines = spooled_lines(tmp_path, 5)
    swapped = [lines[0], lines[2], lines[1], *lines[3:]]
    rc, out = run_verify(tmp_path, swapped, capsys)
    assert rc == 1 and "line 2:" in out
    dup = [lines[0], lines[1], lines[1], *lines[2:]]
    rc, out = run_verify(tmp_path, dup, capsys)
    assert rc == 0 and "1 duplicate" in out
    foreign = [lines[0], "<13>1 2026-01-01T00:00:00Z h sshd 9 - - {\"x\": 1}\n",
               "Jan  1 00:00:00 h cron[5]: hello\n", *lines[1:]]
    rc, out = run_verify(tmp_path, foreign, capsys)
    assert rc == 0, out


def test_mangled_pacsd_line_and_chain_restart(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    lines = spooled_lines(tmp_path, 5)
    mangled = [*lines[:2], lines[2][:60] + "\n", *lines[3:]]
    rc, out = run_verify(tmp_path, mangled, capsys)
    assert rc == 1 and "line 3:" in out
    other = spooled_lines(tmp_path, 2, spool="spool2")  # a chain that starts again at seq 1
    rc, out = run_verify(tmp_path, lines + other, capsys)
    assert rc == 1 and "line 6:" in out


def test_file_starting_mid_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = spooled_lines(tmp_path, 6)
    rc, out = run_verify(tmp_path, lines[2:], capsys)
    assert rc == 0 and "starts at seq 3" in out


def test_empty_or_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_verify(tmp_path, ["nothing here\n"], capsys)
    assert rc == 1 and "no pacsd audit records" in out
    with pytest.raises(EnvironmentProblem):
        audit.verify_file(tmp_path / "missing.log")


def test_atna_lines_verify_and_edits_are_caught(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    lines = spooled_lines(tmp_path, 5, fmt="atna")
    assert all("<AuditMessage>" in line and "[pacsd@32473 seq=" in line for line in lines)
    rc, out = run_verify(tmp_path, lines, capsys)
    assert rc == 0, out
    lines[3] = lines[3].replace("1.2.3.3", "1.2.3.7")
    rc, out = run_verify(tmp_path, lines, capsys)
    assert rc == 1 and "line 4:" in out


def test_chain_state_persists_and_continues(tmp_path: Path) -> None:
    spooled_lines(tmp_path, 3)
    state = chain.load_state(tmp_path / "spool")
    assert state.seq == 3
    lines = spooled_lines(tmp_path, 2)  # a second sequencer on the same spool continues
    ok, report = chain.check_lines(iter(lines))
    assert ok and "seq 1..5" in report, report
    assert oct((tmp_path / "spool" / chain.STATE_FILE).stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "spool" / SPOOL_FILE).stat().st_mode & 0o777) == "0o600"


def test_corrupt_state_is_an_environment_problem(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / chain.STATE_FILE).write_text("{not json")
    with pytest.raises(EnvironmentProblem, match="chain state"):
        Sequencer(make_cfg(tmp_path), listen=False)
    # the lock was released: a fixed state lets the next one start
    (tmp_path / "spool" / chain.STATE_FILE).unlink()
    Sequencer(make_cfg(tmp_path), listen=False).shutdown(2)
