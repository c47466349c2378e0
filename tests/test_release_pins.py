"""The two 2026.2 pin files say the same thing where they overlap.

constraints/2026.2.txt pins only what the agent's hooks touch (the release leg
of scripts/test-releases); tests/openstack_plane/upper-constraints-2026.2.txt
is the whole upper-constraints snapshot the real Nova plane installs under.
They come from the same openstack/requirements commit, so every agent pin
must equal the snapshot's, except where the snapshot comments a pin out
because it is older than nova's own minimum (the agent leg keeps the
snapshot's version: no nova runs there). A refresh of one file without the
other fails here.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
AGENT_PINS = ROOT / "constraints" / "2026.2.txt"
SNAPSHOT = ROOT / "tests" / "openstack_plane" / "upper-constraints-2026.2.txt"

_PIN = re.compile(r"^(?P<commented>#\s*)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"
                  r"(?:\[[^\]]*\])?===?(?P<version>[^;\s]+)")


def _name(raw):
    return re.sub(r"[-_.]+", "-", raw).lower()


def _pins(path):
    """{name: version} of the active pins, and {name: version} of commented ones."""
    active, commented = {}, {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            into = commented if match["commented"] else active
            into[_name(match["name"])] = match["version"]
    return active, commented


def test_agent_pins_match_the_upper_constraints_snapshot():
    agent, _ = _pins(AGENT_PINS)
    snapshot, set_aside = _pins(SNAPSHOT)
    assert agent, "no pins read from constraints/2026.2.txt"
    differ = {}
    for name, version in agent.items():
        theirs = snapshot.get(name, set_aside.get(name))
        if theirs != version:
            differ[name] = (version, theirs)
    assert not differ, f"agent pin vs snapshot (None: not in the snapshot): {differ}"


def test_both_files_name_the_same_requirements_commit():
    commit = re.compile(r"commit[\s#]*([0-9a-f]{12})")
    assert commit.search(AGENT_PINS.read_text())[1] == commit.search(SNAPSHOT.read_text())[1]
