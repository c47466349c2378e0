"""The collector's image (docker/collector/Dockerfile), checked without a
container builder, which this machine cannot run.

- The chart runs that image as the Dockerfile means it: the same user and
  group, the port it exposes, its volumes mounted (and nothing else
  writable), the history file inside one of them.
- The Dockerfile's own commands, the RUN lines marked ``wheel`` and
  ``install``, build the source tree's wheel and install the collector
  extra into a fresh virtualenv outside the source tree; the collector
  then starts from that virtualenv as the image's user, on a root
  filesystem made read-only (a private mount namespace) where only the
  image's volumes are writable, and consumes from the real broker.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib

import pytest
import yaml

from support import RUN_ID, free_port, wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "collector" / "Dockerfile"
CHART = ROOT / "helm" / "commlens"


def instructions(path=DOCKERFILE):
    """[(stage, INSTRUCTION, arguments, the comment just above)] of a Dockerfile."""
    found, stage, comment, pending = [], -1, "", ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not pending:
            comment = stripped.lstrip("# ")
            continue
        if not stripped and not pending:
            comment = ""
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = pending + stripped, ""
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        found.append((stage, keyword, arguments.strip(), comment))
        comment = ""
    return found


def final_stage():
    found = instructions()
    last = max(stage for stage, *_ in found)
    return [(keyword, arguments, comment) for stage, keyword, arguments, comment in found
            if stage == last]


def image():
    """What the final stage declares: user, group, port, volumes, environment..."""
    declared = {"env": {}, "args": {}, "labels": {}}
    for keyword, arguments, _ in final_stage():
        if keyword == "USER":
            user, _, group = arguments.partition(":")
            declared["user"], declared["group"] = int(user), int(group)
        elif keyword == "EXPOSE":
            declared["port"] = int(arguments.split("/")[0])
        elif keyword == "VOLUME":
            declared["volumes"] = set(json.loads(arguments))
        elif keyword == "ENTRYPOINT":
            declared["entrypoint"] = json.loads(arguments)
        elif keyword in ("ENV", "LABEL"):
            target = declared["env" if keyword == "ENV" else "labels"]
            target.update(item.split("=", 1) for item in shlex.split(arguments))
        elif keyword == "ARG":
            name, _, default = arguments.partition("=")
            declared["args"][name] = default
    return declared


def marked_run(mark):
    """The RUN command under the comment that starts with ``mark:``."""
    (command,) = [arguments for _, keyword, arguments, comment in instructions()
                  if keyword == "RUN" and comment.startswith(mark + ":")]
    return command


def _workload(objects):
    # "NOTES" is the rendered notes; the objects are keyed (kind, name).
    (workload,) = [o for key, o in objects.items()
                   if key[0] in ("Deployment", "StatefulSet") and key != "NOTES"]
    return workload["spec"]["template"]["spec"]


def test_the_chart_runs_the_image_as_the_dockerfile_means_it():
    from test_helm_chart import EXISTING_SECRET, render

    declared = image()
    pod = _workload(render(EXISTING_SECRET))
    (container,) = pod["containers"]
    # The user and group.
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == declared["user"]
    assert security["runAsGroup"] == declared["group"]
    assert security["fsGroup"] == declared["group"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The port.
    assert [p["containerPort"] for p in container["ports"]] == [declared["port"]]
    assert f"--listen=0.0.0.0:{declared['port']}" in container["args"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["service"]["port"] == declared["port"]
    # The paths: exactly the image's volumes are mounted, each on a volume
    # that is writable (an emptyDir, or the history's claim).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == declared["volumes"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in mounts.values():
        assert "emptyDir" in volumes[name] or "persistentVolumeClaim" in volumes[name]
    history = declared["env"]["COMMLENS_HISTORY"]
    assert f"--history={history}" in container["args"]
    assert any(history.startswith(volume + "/") for volume in declared["volumes"])
    for name in ("HOME", "TMPDIR"):
        assert declared["env"][name] in declared["volumes"]
    assert container["command"][0] == declared["entrypoint"][0] == "commlens"
    # The image: the name the Dockerfile gives it, tagged with the version it installs.
    assert values["image"]["repository"] == declared["labels"]["org.opencontainers.image.title"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert values["image"]["tag"] in ("", None)
    assert container["image"] == f"commlens:{chart['appVersion']}"
    assert chart["appVersion"] == version
    assert f"-t commlens:{version} ." in DOCKERFILE.read_text()


def _tracked_copy(destination):
    """The build context: the tracked files (what .dockerignore leaves)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def installed_image():
    """The Dockerfile's wheel and install commands, run outside a container:
    (the root standing for the image's filesystem, the virtualenv)."""
    # Readable by the image's user: pytest's own tmp folders are root's alone.
    base = pathlib.Path(tempfile.mkdtemp(prefix="commlens-image-"))
    base.chmod(0o755)
    try:
        context, wheels, venv = base / "context", base / "wheels", base / "opt-commlens"
        _tracked_copy(context)
        # `python` in the image is its base image's; here the system's
        # (readable by any user, as the image's is), and .venv's pip builds.
        bin_dir = base / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to("/usr/bin/python3")
        env = {k: v for k, v in os.environ.items()
               if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
               and not k.startswith("COMMLENS_")}
        build_env = dict(env, WHEELS=str(wheels),
                         PATH=f"{pathlib.Path(sys.executable).parent}:{env['PATH']}")
        done = subprocess.run(["sh", "-ec", marked_run("wheel")], cwd=context, env=build_env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        install_env = dict(env, WHEELS=str(wheels), VENV=str(venv),
                           PATH=f"{bin_dir}:{env['PATH']}")
        done = subprocess.run(["sh", "-ec", marked_run("install")], cwd=base, env=install_env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert done.stdout.strip().splitlines()[-1] == f"commlens {version}"
        yield base, venv
    finally:
        shutil.rmtree(base, ignore_errors=True)


# Inside a private mount namespace: the root read-only, the image's volumes
# writable tmpfs (the chart's emptyDirs), then the collector as the image's user.
READ_ONLY_ROOT = """
mount -o remount,bind,ro /
for volume in "$@"; do
    mount -t tmpfs -o "mode=0755,uid=$COMMLENS_UID,gid=$COMMLENS_GID" tmpfs "$volume"
done
exec setpriv --reuid "$COMMLENS_UID" --regid "$COMMLENS_GID" --clear-groups \\
    "$VENV/bin/commlens" collector --listen "127.0.0.1:$PORT" --export-url "$EXPORT"
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_dockerfiles_install_runs_the_collector_as_its_user_on_a_read_only_root(
        installed_image, rabbitmq):
    base, venv = installed_image
    declared = image()
    # The image's volumes, at their places under the stand-in root.
    volumes = {path: base / ("volume" + path.replace("/", "-")) for path in declared["volumes"]}
    for place in volumes.values():
        place.mkdir()
    environment = {name: value for name, value in declared["env"].items() if name != "PATH"}
    for path, place in volumes.items():
        environment = {name: value.replace(path, str(place))
                       for name, value in environment.items()}
    port = free_port()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **environment,
           "VENV": str(venv), "PORT": str(port),
           "COMMLENS_UID": str(declared["user"]), "COMMLENS_GID": str(declared["group"]),
           "EXPORT": f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-image-{RUN_ID}"
                     f"&queue=commlens-image-{RUN_ID}"}
    log_path = base / "collector.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec", READ_ONLY_ROOT,
             "read-only-root", *map(str, volumes.values())],
            cwd="/", env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import urllib.request

        def ready():
            if process.poll() is not None:
                raise AssertionError("collector exited:\n" + log_path.read_text())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                            timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(ready, timeout=60, message="the image's collector ready")
        # It is the image's user, on a root it cannot write.
        status = pathlib.Path(f"/proc/{process.pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1)
        assert int(uid) == declared["user"]
        mounts = pathlib.Path(f"/proc/{process.pid}/mountinfo").read_text().splitlines()
        (root,) = [m.split() for m in mounts if m.split()[4] == "/"]
        assert "ro" in root[5].split(",")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"commlens_collector_intake_up 1.0" in response.read()
        log = log_path.read_text()
        history = re.search(r"history in (\S+)", log).group(1)
        assert history == environment["COMMLENS_HISTORY"]
        # Its modules come from the virtualenv the Dockerfile made, not this tree.
        found = subprocess.run([str(venv / "bin/python"), "-c",
                                "import commlens.cli.main as m; print(m.__file__)"],
                               cwd="/", capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/bin:/bin"})
        assert pathlib.Path(found.stdout.strip()).is_relative_to(venv), found.stderr
    finally:
        process.terminate()
        process.wait(15)
    assert process.returncode == 0, log_path.read_text()
