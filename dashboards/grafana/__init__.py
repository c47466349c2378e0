"""Grafana dashboards as code: built by build.py, committed as JSON in generated/."""

import json
import pathlib

# Built for Grafana 11.6 (the foundation SDK's newest builders) and checked
# against the dashboard schemas of 11.6 and 13.2 (tests/test_grafana_dashboards.py).
GENERATED = pathlib.Path(__file__).parent / "generated"


def load_dashboards():
    """The committed dashboards, by file name."""
    return {path.name: json.loads(path.read_text())
            for path in sorted(GENERATED.glob("*.json"))}
