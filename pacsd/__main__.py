"""``python -m pacsd`` runs the command line."""

from pacsd.cli import main

raise SystemExit(main())
