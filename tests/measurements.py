"""Numbers a test measured (cold starts, switches) for the end-of-run summary: CI output shows
them so a regression is visible, without any timing assertion."""

MEASURED: list[str] = []


def record(line: str) -> None:
    MEASURED.append(line)
