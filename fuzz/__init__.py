"""Fuzz harness for pacsd (issue 9): PDU/DIMSE encoders, hypothesis strategies, targets."""
