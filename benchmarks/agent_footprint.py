"""The agent's footprint: its installed size and its import time.

    .venv/bin/python benchmarks/agent_footprint.py [--source DIR] [--imports 9]

Installs commlens from ``--source`` (default: this checkout; give another,
e.g. ``git worktree add /tmp/main main``, to compare before and after) into
two fresh virtualenvs, the way an operator would: ``pip install DIR`` (the
agent that runs inside services) and ``pip install 'DIR[collector]'``. Prints
what each install added to site-packages (a fresh venv's own pip and
setuptools left out), then the import time of the RPC driver and of the WSGI
filter in the agent-only venv, by ``python -X importtime``: the sum of the
top-level imports the statement made (the interpreter's start-up imports
left out), median of ``--imports`` fresh interpreters, since one
interpreter's figure swings by a tenth on a busy machine.

tests/test_agent_footprint.py checks what the agent imports (no collector
package); this script only measures.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATEMENTS = {
    "RPC driver": "import commlens.middleware.rpc_driver",
    "WSGI filter": "import commlens.middleware.wsgi",
}
# "import time: self [us] | cumulative | name"; a top-level import has no indent.
_TOP_LEVEL = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")


def _venv(path):
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    return os.path.join(path, "bin", "python")


def _site_packages(python):
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _size(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                total += os.path.getsize(file)
    return total


def installed_size(source, extra, workdir):
    """(bytes the install added to site-packages, the venv's python)."""
    python = _venv(os.path.join(workdir, extra or "agent"))
    site = _site_packages(python)
    before = _size(site)
    target = f"{source}[{extra}]" if extra else source
    # Quiet (pip's output only if it fails), and never from a cached wheel of
    # an older checkout.
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-cache-dir", target],
                          capture_output=True, text=True,
                          env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    if done.returncode != 0:
        raise SystemExit(f"benchmark: pip install {target} failed:\n{done.stderr[-3000:]}")
    return _size(site) - before, python


def _top_level_imports(python, code):
    """{module: cumulative µs} of the top-level imports of one interpreter."""
    done = subprocess.run([python, "-X", "importtime", "-c", code], capture_output=True,
                          text=True, cwd=tempfile.gettempdir(),
                          env={"PATH": "/usr/bin:/bin", "COMMLENS_EXPORT_URL": "memory://"})
    if done.returncode != 0:
        raise SystemExit(f"benchmark: {code!r} failed:\n{done.stderr[-2000:]}")
    found = {}
    for line in done.stderr.splitlines():
        match = _TOP_LEVEL.match(line)
        if match:
            found[match.group(2)] = int(match.group(1))
    return found


def import_ms(python, statement, runs):
    """Median over ``runs`` interpreters of the statement's own imports, in ms."""
    totals = []
    for _ in range(runs):
        start_up = _top_level_imports(python, "pass")
        imported = _top_level_imports(python, statement)
        totals.append(sum(us for name, us in imported.items() if name not in start_up))
    return statistics.median(totals) / 1000, (max(totals) - min(totals)) / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=REPO, help="the commlens source to install")
    parser.add_argument("--imports", type=int, default=9, help="interpreters per figure")
    args = parser.parse_args()
    source = os.path.abspath(args.source)
    with tempfile.TemporaryDirectory(prefix="commlens-footprint-") as workdir:
        agent_bytes, agent_python = installed_size(source, None, workdir)
        collector_bytes, _ = installed_size(source, "collector", workdir)
        imports = {name: import_ms(agent_python, statement, args.imports)
                   for name, statement in STATEMENTS.items()}
    print(f"\nThe agent's footprint, installed from {source} into fresh venvs "
          f"(Python {sys.version_info.major}.{sys.version_info.minor})")
    print(f"  pip install commlens              {agent_bytes / 1e6:6.1f} MB added to site-packages")
    print(f"  pip install 'commlens[collector]' {collector_bytes / 1e6:6.1f} MB "
          f"(the collector's packages: {(collector_bytes - agent_bytes) / 1e6:.1f} MB more)")
    print(f"import time in the agent-only venv (python -X importtime, median of "
          f"{args.imports} interpreters, start-up imports left out):")
    for name, statement in STATEMENTS.items():
        median, spread = imports[name]
        print(f"  {statement:<40} {median:6.0f} ms  (runs spread {spread:.0f} ms)  {name}")


if __name__ == "__main__":
    main()
