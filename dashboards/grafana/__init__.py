"""Grafana dashboards as code: built by build.py, committed as JSON in generated/."""

import json
import pathlib

GENERATED = pathlib.Path(__file__).parent / "generated"
# The Grafana release the dashboards are built for and checked against: the
# foundation SDK's 11.6 builders and @grafana/schema 11.6's dashboard types.
GRAFANA_VERSION = "11.6"


def load_dashboards():
    """The committed dashboards, by file name."""
    return {path.name: json.loads(path.read_text())
            for path in sorted(GENERATED.glob("*.json"))}
