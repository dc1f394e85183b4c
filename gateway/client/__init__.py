"""The ``sandman`` API client: settings, HTTP calls, output formatting and the commands."""
