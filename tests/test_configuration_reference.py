"""docs/configuration.md is generated from the options (cli/reference.py),
and oslo-config-generator shows the defaults commlens really uses."""

import pathlib
import re
import subprocess
import sys

from commlens.cli import reference
from commlens.tracer import settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"


def test_the_configuration_reference_is_what_the_options_generate():
    assert PAGE.read_text() == reference.render(), (
        "docs/configuration.md differs from the options: regenerate it with "
        "`python -m commlens.cli.reference > docs/configuration.md`")


def test_the_reference_names_every_option_and_the_readme_links_it():
    page = PAGE.read_text()
    for opt in settings.list_opts()[0][1]:
        assert f"### `{opt.dest}`" in page
        assert f"`{settings.env_name(opt)}`" in page
    for flag in ("--export-url URL` (repeatable)", "--listen", "--history", "--replica",
                 "--queue-ttl", "--dashboard-token"):
        assert f"### `{flag}" in page
    assert "(docs/configuration.md)" in (ROOT / "README.md").read_text()
    assert "(configuration.md)" in (ROOT / "docs" / "operator-guide.md").read_text()


def test_oslo_config_generator_shows_the_defaults_commlens_uses():
    done = subprocess.run([sys.executable, "-m", "oslo_config.generator",
                           "--namespace", "commlens"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shown = dict(re.findall(r"^#(\w+) = ?(.*)$", done.stdout, re.MULTILINE))
    assert shown == {
        "service_name": "<the program's name>",
        "export_url": "<the commlens+ transport URL's first broker and vhost>",
        "ship_interval": "5.0",
        "hop_sample_ratio": "0.01",
        "slow_hop_seconds": "1.0",
        "http_outbound": "true",
        "http_max_routes": "200",
        "http_endpoints": "",
        "service_names": "",
    }
    # The same values the settings fall back on.
    for name, value in settings.DEFAULTS.items():
        if value is not None:
            assert settings._checked(
                next(o for o in settings.list_opts()[0][1] if o.dest == name),
                shown[name]) == (value, None) or (value == [] and shown[name] == "")
