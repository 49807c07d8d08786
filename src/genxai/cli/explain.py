"""Commands: explain, report, demo."""
