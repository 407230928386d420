"""The deployment recipes in workers/: every `farpool` command line in them is one the CLI takes.

Each recipe format is read the way its runner reads it (systemd's ExecStart= with its
variable rules, a Containerfile's JSON ENTRYPOINT/CMD, the shell of an sbatch script,
a Kubernetes container's command/args with $(VAR) from its env), shell variables are
set to sample values, and the result goes through ``farpool.cli.build_parser()`` with
abbreviated options refused, so a misspelt or shortened option fails here rather than
on a cluster. Then each recipe's parsed fields are checked against what it means to do.

Beyond the command lines: the systemd units pass ``systemd-analyze verify`` and rate
"OK" in ``systemd-analyze security`` (where systemd-analyze is installed), and every
install line of the recipes works from a fresh clone of the repository (farpool is not
on PyPI, so no recipe may install it from an index).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farpool.cli import build_parser

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "workers"
SUBCOMMANDS = ("scheduler", "worker", "cluster", "status", "keygen", "demo", "run")


class RecipeError(Exception):
    """A recipe's command line is malformed or not accepted by the CLI."""


def strict_parser() -> argparse.ArgumentParser:
    """The real parser, which refuses abbreviations: `--nproc 4` must not pass for `--nprocs`."""
    return build_parser()


def parse(argv: list[str], where: str) -> argparse.Namespace:
    """``argv`` (after ``farpool``) through the CLI parser, or RecipeError with its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = strict_parser().parse_args(argv)
    except SystemExit:
        raise RecipeError(f"{where}: `farpool {shlex.join(argv)}` is refused by the CLI:\n"
                          f"{err.getvalue().strip()}") from None
    if getattr(args, "insecure", False):
        raise RecipeError(f"{where}: recipes must be secure by default, without --insecure")
    return args


# -- expanding variables ---------------------------------------------------------------------

_SHELL_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_shell(word: str, env: dict[str, str], where: str) -> str:
    """``$NAME`` and ``${NAME}`` in one word; an unknown name is an error, not an empty string."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise RecipeError(f"{where}: no sample value for ${name} (a typo in the recipe?)")
        return env[name]

    if re.search(r"\$\{[^}]*[^A-Za-z0-9_}]", word):
        raise RecipeError(f"{where}: {word!r}: keep ${{...}} forms in command lines plain")
    return _SHELL_VAR.sub(value, word)


# -- readers, one per format: each returns [(argv after `farpool`, where)] ----------------------

Command = tuple[list[str], str]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with backslash-newline continuations joined, numbered by their first line."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _shell_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def shell_commands(line: str, env: dict[str, str], where: str) -> list[Command]:
    """`farpool SUBCOMMAND ...` invocations in one shell line, also inside `sh -c '...'`."""
    words = _shell_words(line)
    found: list[Command] = []
    for i, word in enumerate(words):
        if " " in word:  # a quoted script, as in `sh -c '...'`: read it as a shell line too
            found += shell_commands(word, env, where)
            continue
        if word.rsplit("/", 1)[-1] != "farpool" or i + 1 >= len(words) or words[i + 1] not in SUBCOMMANDS:
            continue
        argv: list[str] = []
        for arg in words[i + 1:]:
            if arg and set(arg) <= set("|&;<>()"):  # a shell operator ends the command
                break
            argv.append(expand_shell(arg, env, where))
        found.append((argv, where))
    return found


def read_shell_script(text: str, env: dict[str, str], name: str, first_line: int = 1) -> list[Command]:
    commands: list[Command] = []
    for number, line in _logical_lines(text):
        if line.lstrip().startswith("#"):
            continue
        commands += shell_commands(line, env, f"{name}:{first_line + number - 1}")
    return commands


def markdown_blocks(text: str, name: str) -> list[tuple[int, str]]:
    """Fenced code blocks: (number of their first line, their text, dedented)."""
    blocks: list[tuple[int, str]] = []
    block: list[str] | None = None
    first = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            if block is None:
                block, first = [], number + 1
            else:
                blocks.append((first, textwrap.dedent("\n".join(block))))
                block = None
        elif block is not None:
            block.append(line)
    assert block is None, f"{name}: unclosed code block"
    return blocks


def read_markdown(text: str, env: dict[str, str], name: str) -> list[Command]:
    """The shell lines of fenced code blocks."""
    commands: list[Command] = []
    for first, block in markdown_blocks(text, name):
        commands += read_shell_script(block, env, name, first)
    return commands


def systemd_unit(text: str, name: str) -> dict[str, list[str]]:
    """``Key=value`` settings of the [Service] section (continuations joined, repeats kept)."""
    settings: dict[str, list[str]] = {}
    section = None
    for _, line in _logical_lines(text):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise RecipeError(f"{name}: not a unit file line: {line!r}")
        if section == "[Service]":
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def read_systemd(text: str, overrides: dict[str, str], name: str) -> list[Command]:
    """ExecStart= lines as systemd runs them, with the unit's Environment= defaults and
    ``overrides`` (what an EnvironmentFile= would set)."""
    settings = systemd_unit(text, name)
    env: dict[str, str] = {}
    for value in settings.get("Environment", []):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    env.update(overrides)
    commands: list[Command] = []
    for number, value in enumerate(settings.get("ExecStart", []), 1):
        where = f"{name} ExecStart #{number}"
        words = shlex.split(value.lstrip("-@:+!"))
        argv: list[str] = []
        for word in words:
            if "%" in word.replace("%%", ""):
                raise RecipeError(f"{where}: specifier in {word!r}: add it to this reader")
            bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
            if bare:  # systemd: a bare $NAME word becomes the value split at whitespace
                if bare.group(1) not in env:
                    raise RecipeError(f"{where}: ${bare.group(1)} is set nowhere")
                argv += env[bare.group(1)].split()
            else:
                argv.append(expand_shell(word, env, where).replace("%%", "%"))
        if not argv or Path(argv[0]).name != "farpool" or not argv[0].startswith("/"):
            raise RecipeError(f"{where}: expected an absolute path to farpool, got {argv[:1]}")
        commands.append((argv[1:], where))
    return commands


def containerfile_instructions(text: str) -> list[tuple[str, str]]:
    out = []
    for _, line in _logical_lines(text):
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def container_entrypoint(text: str, name: str) -> tuple[list[str], list[str]]:
    """The last ENTRYPOINT and CMD, which must be in exec (JSON) form: a shell form would
    put a shell in front of the worker and keep SIGTERM from reaching it."""
    found: dict[str, list[str]] = {}
    for keyword, rest in containerfile_instructions(text):
        if keyword in ("ENTRYPOINT", "CMD"):
            try:
                value = json.loads(rest)
            except json.JSONDecodeError:
                raise RecipeError(f"{name}: {keyword} {rest} is not in JSON (exec) form") from None
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise RecipeError(f"{name}: {keyword} must be a JSON list of strings")
            found[keyword] = value
    return found.get("ENTRYPOINT", []), found.get("CMD", [])


def read_containerfile(text: str, _env: dict[str, str], name: str) -> list[Command]:
    entrypoint, cmd = container_entrypoint(text, name)
    argv = entrypoint + cmd
    if not argv or argv[0] != "farpool":
        raise RecipeError(f"{name}: the image should run farpool, not {argv[:1]}")
    return [(argv[1:], f"{name} ENTRYPOINT+CMD")]


def _containers(node: Any) -> list[dict[str, Any]]:
    """Every container and init container anywhere in a Kubernetes object."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += _containers(value)
    elif isinstance(node, list):
        for item in node:
            found += _containers(item)
    return found


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def container_env(container: dict[str, Any], name: str) -> dict[str, str]:
    """What Kubernetes puts in a container's $(VAR): literal values, CPU limits by
    resourceFieldRef (rounded up to the divisor, as the kubelet does), a marker for secrets."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            if ref["resource"] != "limits.cpu":
                raise RecipeError(f"{name}: resourceFieldRef {ref['resource']}: add it to this reader")
            limit = container["resources"]["limits"]["cpu"]
            env[item["name"]] = str(math.ceil(_cpu(str(limit)) / _cpu(str(ref.get("divisor", "1")))))
        else:
            env[item["name"]] = f"<{item['name']} from {', '.join(source)}>"
    return env


def read_kubernetes(text: str, _env: dict[str, str], name: str) -> list[Command]:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the Kubernetes manifest")
    commands: list[Command] = []
    for doc in yaml.safe_load_all(text):
        for container in _containers(doc):
            where = f"{name} {doc['kind']}/{doc['metadata']['name']} container {container['name']}"
            argv = list(container.get("command", [])) + list(container.get("args", []))
            env = container_env(container, where)

            def substitute(match: re.Match[str], env: dict[str, str] = env, where: str = where) -> str:
                if match.group(0).startswith("$$"):
                    return match.group(0)[1:]
                if match.group(1) not in env:
                    raise RecipeError(f"{where}: $({match.group(1)}) is not in the container's env")
                return env[match.group(1)]

            argv = [re.sub(r"\$?\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, word) for word in argv]
            if argv and Path(argv[0]).name == "farpool":
                commands.append((argv[1:], where))
            else:  # an init container's `sh -c` and the like
                for word in argv:
                    commands += shell_commands(shlex.quote(word), {}, where)
    return commands


# -- the recipes and their sample values ---------------------------------------------------------

SCHEDULER = "tcp://head.example.org:5555"
SLURM_ENV = {
    "FARPOOL_SCHEDULER": SCHEDULER,
    "FARPOOL_KEY_FILE": "/home/alice/.config/farpool/slurm.cluster-key",
    "HOME": "/home/alice",
    "SLURM_CPUS_ON_NODE": "48",
    "SLURM_JOB_ID": "81234",
    "SLURMD_NODENAME": "node017",
}
WORKER_ENV_FILE = {  # what the unit's comment suggests for /etc/farpool/worker.env
    "FARPOOL_SCHEDULER": SCHEDULER,
    "FARPOOL_WORKER_OPTS": "--nprocs 8 --max-tasks-per-child 1000",
}

Reader = Callable[[str, dict[str, str], str], list[Command]]
RECIPES: dict[str, tuple[Reader, dict[str, str]]] = {
    "systemd/farpool-worker.service": (read_systemd, {}),
    "systemd/farpool-scheduler.service": (read_systemd, {}),
    "container/Containerfile": (read_containerfile, {}),
    "slurm/farpool-workers.sbatch": (read_shell_script, SLURM_ENV),
    "kubernetes/farpool-workers.yaml": (read_kubernetes, {}),
    "kubernetes/farpool-client.yaml": (read_kubernetes, {}),
    "README.md": (read_markdown, {}),
}


def commands_of(recipe: str, env: dict[str, str] | None = None) -> list[Command]:
    reader, sample = RECIPES[recipe]
    return reader((WORKERS / recipe).read_text(encoding="utf-8"), sample if env is None else env, recipe)


def parsed(recipe: str, env: dict[str, str] | None = None) -> list[argparse.Namespace]:
    return [parse(argv, where) for argv, where in commands_of(recipe, env)]


# -- tests ---------------------------------------------------------------------------------------


def test_every_recipe_file_is_read_and_has_commands():
    present = {str(p.relative_to(WORKERS)) for p in WORKERS.rglob("*") if p.is_file()}
    assert present == set(RECIPES), "a file in workers/ without a reader here (or a reader without its file)"
    for recipe in RECIPES:
        assert commands_of(recipe), f"{recipe}: no farpool command found"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_command_is_accepted_and_secure(recipe):
    for args in parsed(recipe):
        assert args.command in SUBCOMMANDS
    if recipe != "README.md":  # the README says, in words, that none uses it
        assert "--insecure" not in (WORKERS / recipe).read_text(encoding="utf-8")


def test_systemd_worker():
    [defaults] = parsed("systemd/farpool-worker.service")
    assert (defaults.command, defaults.address) == ("worker", "tcp://head.example.org:5555")
    assert defaults.key_file == "/etc/farpool/worker.cluster-key"
    assert defaults.nprocs is None  # unset options: the CLI's defaults (CPU count)
    [tuned] = [parse(argv, where) for argv, where in commands_of("systemd/farpool-worker.service",
                                                                  WORKER_ENV_FILE)]
    assert (tuned.address, tuned.nprocs, tuned.max_tasks_per_child) == (SCHEDULER, 8, 1000)
    assert tuned.key_file == defaults.key_file


def test_systemd_scheduler():
    [args] = parsed("systemd/farpool-scheduler.service")
    assert (args.command, args.bind) == ("scheduler", "tcp://0.0.0.0:5555")
    assert args.key_dir == "/var/lib/farpool/keys"
    unit = systemd_unit((WORKERS / "systemd/farpool-scheduler.service").read_text(), "scheduler")
    # The key directory lives in the unit's private state directory, which survives restarts.
    assert unit["StateDirectory"] == ["farpool"] and unit["StateDirectoryMode"] == ["0700"]


def test_container():
    text = (WORKERS / "container/Containerfile").read_text()
    [args] = parsed("container/Containerfile")
    assert (args.command, args.address, args.key_file) == ("worker", "tcp://farpool-scheduler:5555", None)
    # Arguments after the image name replace CMD: they must fit after the ENTRYPOINT.
    entrypoint, _ = container_entrypoint(text, "Containerfile")
    custom = parse(entrypoint[1:] + [SCHEDULER, "--nprocs", "8"], "docker run ARGS")
    assert (custom.address, custom.nprocs) == (SCHEDULER, 8)
    instructions = containerfile_instructions(text)
    [base] = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert base.startswith("python:") and base.endswith("-slim")
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the worker must not run as root"
    # farpool comes from the build context, the repository's root (it is not on PyPI).
    assert "-f workers/container/Containerfile ." in text
    copies = [shlex.split(rest) for keyword, rest in instructions if keyword == "COPY"]
    assert copies, "the image installs farpool from the repository"
    for *sources, _dest in copies:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_slurm():
    [args] = parsed("slurm/farpool-workers.sbatch")
    assert (args.command, args.address, args.nprocs) == ("worker", SCHEDULER, 48)
    assert args.key_file == SLURM_ENV["FARPOOL_KEY_FILE"]
    assert args.name == "slurm-81234-node017"
    text = (WORKERS / "slurm/farpool-workers.sbatch").read_text()
    [srun] = [line for _, line in _logical_lines(text) if line.lstrip().startswith("srun")]
    assert "--ntasks-per-node=1" in _shell_words(srun), "one worker per node"


def test_slurm_script_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    done = subprocess.run([bash, "-n", str(WORKERS / "slurm/farpool-workers.sbatch")],
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr


def test_kubernetes():
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the Kubernetes manifest")
    by_role = {}
    for argv, where in commands_of("kubernetes/farpool-workers.yaml"):
        args = parse(argv, where)
        by_role[args.command] = args
    assert set(by_role) == {"scheduler", "worker"}
    scheduler, worker = by_role["scheduler"], by_role["worker"]
    assert worker.nprocs == 4  # from the CPU limit, through $(FARPOOL_NPROCS)
    docs = {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all((WORKERS / "kubernetes/farpool-workers.yaml").read_text())}
    # The workers' address is the Service, on the port the scheduler binds.
    [port] = docs["Service", "farpool-scheduler"]["spec"]["ports"]
    assert worker.address == f"tcp://farpool-scheduler:{port['port']}"
    assert scheduler.bind == f"tcp://0.0.0.0:{port['port']}"
    # The key comes from a Secret as FARPOOL_KEY, and the scheduler's keys are on its volume.
    [container] = docs["Deployment", "farpool-workers"]["spec"]["template"]["spec"]["containers"]
    [key] = [e for e in container["env"] if e["name"] == "FARPOOL_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == "farpool-worker-key"
    [sched] = docs["Deployment", "farpool-scheduler"]["spec"]["template"]["spec"]["containers"]
    assert any(scheduler.key_dir.startswith(m["mountPath"] + "/") for m in sched["volumeMounts"])


def test_readme_commands():
    commands = {args.command: args for args in parsed("README.md")}
    assert commands["keygen"].key_dir == "/var/lib/farpool/keys"


SECURE_UNIT = """\
[Service]
Environment=FARPOOL_SCHEDULER=tcp://head:5555
ExecStart=/opt/farpool/venv/bin/farpool worker ${FARPOOL_SCHEDULER} --nprocs 4
"""


@pytest.mark.parametrize("broken, message", [
    ("--nprocs 4", None),  # the untouched unit passes: the cases below fail for their typo
    ("--nproc 4", "unrecognized arguments: --nproc"),  # argparse would take it as an abbreviation
    ("--n-procs 4", "unrecognized arguments"),
    ("--nprocs four", "invalid _positive value"),
    ("--nprocs 4 --insecure", "secure by default"),
    ("--nprocs $FARPOOL_NPROCS", r"\$FARPOOL_NPROCS is set nowhere"),
])
def test_a_typo_in_a_recipe_fails(broken, message):
    unit = SECURE_UNIT.replace("--nprocs 4", broken)
    if message is None:
        [args] = [parse(argv, where) for argv, where in read_systemd(unit, {}, "unit")]
        assert args.nprocs == 4
        return
    with pytest.raises(RecipeError, match=message):
        for argv, where in read_systemd(unit, {}, "unit"):
            parse(argv, where)


def test_a_typo_in_a_shell_variable_fails():
    with pytest.raises(RecipeError, match=r"\$SLURM_CPUS_ON_NOD\b"):
        read_shell_script("srun sh -c 'farpool worker tcp://h:1 --nprocs \"$SLURM_CPUS_ON_NOD\"'",
                          SLURM_ENV, "script")


# -- Kubernetes clients ------------------------------------------------------------------------


def test_kubernetes_client():
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the Kubernetes manifests")
    workers = {(d["kind"], d["metadata"]["name"]): d
               for d in yaml.safe_load_all((WORKERS / "kubernetes/farpool-workers.yaml").read_text())}
    clients = {(d["kind"], d["metadata"]["name"]): d
               for d in yaml.safe_load_all((WORKERS / "kubernetes/farpool-client.yaml").read_text())}
    [args] = parsed("kubernetes/farpool-client.yaml")
    # The client reaches the scheduler through its Service, by name and port.
    service = workers["Service", "farpool-scheduler"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    [port] = service["spec"]["ports"]
    assert (args.command, args.address) == ("run", f"tcp://farpool-scheduler:{port['port']}")
    job = clients["Job", "farpool-client"]["spec"]["template"]
    labels = job["metadata"]["labels"]
    assert not set(service["spec"]["selector"].items()) <= set(labels.items()), \
        "the client's pods must not be endpoints of the scheduler's Service"
    [container] = job["spec"]["containers"]
    [worker] = workers["Deployment", "farpool-workers"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == worker["image"], "clients need the workers' Python and farpool"
    # Its key: a client key from a Secret of its own, as FARPOOL_KEY.
    [key] = [e for e in container["env"] if e["name"] == "FARPOOL_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == "farpool-client-key"
    readme = (WORKERS / "README.md").read_text()
    assert "farpool keygen --role client --name k8s-clients" in readme
    assert "create secret generic farpool-client-key" in readme
    # The script comes from the ConfigMap mounted where the command looks for it.
    script = Path(args.script)
    [mount] = [m for m in container["volumeMounts"] if str(script.parent) == m["mountPath"]]
    [volume] = [v for v in job["spec"]["volumes"] if v["name"] == mount["name"]]
    config = clients["ConfigMap", volume["configMap"]["name"]]
    compile(config["data"][script.name], str(script), "exec")


# -- systemd -----------------------------------------------------------------------------------

UNITS = ("farpool-worker.service", "farpool-scheduler.service")
RECIPE_FARPOOL = "/opt/farpool/venv/bin/farpool"


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed here (CI with systemd runs this check)")
    return found


@contextlib.contextmanager
def _runnable_unit(unit: str, edit: Callable[[str], str] = lambda text: text) -> Iterator[Path]:
    """A temporary copy of a unit whose ExecStart= names an executable that exists here.

    `systemd-analyze verify` rightly fails a unit whose command does not exist, and
    /opt/farpool/venv/bin/farpool (where the recipe installs farpool) is not on this
    machine: the copy points at this environment's farpool (else this Python) instead.
    Nothing else in the unit is changed, and the file keeps its name, which verify checks.
    """
    real = Path(sys.executable).with_name("farpool")
    text = (WORKERS / "systemd" / unit).read_text(encoding="utf-8")
    assert RECIPE_FARPOOL in text
    with tempfile.TemporaryDirectory(prefix="farpool-units-") as directory:
        path = Path(directory) / unit
        path.write_text(edit(text.replace(RECIPE_FARPOOL, str(real if real.exists() else sys.executable))))
        yield path


def _verify(analyze: str, path: Path) -> list[str]:
    """What `systemd-analyze verify` says about this unit. It exits 0 on unknown keys and
    unparsable values (it only warns), so its messages about the unit count too."""
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    said = [line for line in (done.stdout + done.stderr).splitlines() if path.name in line]
    if done.returncode != 0:
        said.append(f"exit status {done.returncode}: {done.stderr.strip()}")
    return said


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit):
    analyze = _systemd_analyze()
    with _runnable_unit(unit) as path:
        assert _verify(analyze, path) == []


def test_systemd_analyze_verify_catches_a_typo():
    analyze = _systemd_analyze()
    with _runnable_unit(UNITS[0], lambda text: text.replace("KillMode=mixed", "KillMode=mixd")) as path:
        assert any("mixd" in line for line in _verify(analyze, path))


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_security_rating(unit):
    """Before the hardening both units rated 8.7 "EXPOSED"; now 1.5 and 1.4 (systemd 252)."""
    analyze = _systemd_analyze()
    with _runnable_unit(unit) as path:
        done = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(path)],
                              capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    if level is None:
        pytest.skip(f"this systemd-analyze has no offline security review: {done.stderr.strip()}")
    assert float(level.group(1)) <= 3.0, done.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_settings(unit):
    settings = systemd_unit((WORKERS / "systemd" / unit).read_text(), unit)

    def one(key: str) -> str:
        [value] = settings[key]
        return value

    # SIGTERM to the main process only, which drains; SIGKILL to what is left (KillMode=mixed).
    assert (one("KillMode"), one("KillSignal")) == ("mixed", "SIGTERM")
    assert int(one("TimeoutStopSec")) >= 30
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    # What farpool needs: local sockets to its worker processes, the network, fork and the
    # pidfd calls (@process), CPU affinity (@resources), and writable memory for ctypes.
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    filters = settings["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert not any(group in f for f in filters[1:] for group in ("@process", "@resources", "@basic-io"))
    assert "MemoryDenyWriteExecute" not in settings
    # The writable places: the state directory (HOME and working directory), mode 0700.
    [state] = settings["StateDirectory"]
    assert one("StateDirectoryMode") == "0700"
    assert one("WorkingDirectory") == f"/var/lib/{state}"
    if unit == "farpool-worker.service":
        assert f"HOME=/var/lib/{state}" in settings["Environment"]
        # Tasks must not read the keys of a scheduler on the same host (same user).
        scheduler = systemd_unit((WORKERS / "systemd/farpool-scheduler.service").read_text(), "scheduler")
        assert settings["InaccessiblePaths"] == [f"-/var/lib/{scheduler['StateDirectory'][0]}"]


# -- Slurm signals -----------------------------------------------------------------------------


def test_slurm_signals_reach_the_workers():
    text = (WORKERS / "slurm/farpool-workers.sbatch").read_text()
    signals = re.findall(r"^#SBATCH --signal=(\S+)", text, re.MULTILINE)
    # No B: prefix, which would signal only the batch shell and never reach srun's tasks.
    assert len(signals) == 1 and re.fullmatch(r"TERM@\d+", signals[0]), signals
    assert "scancel --signal=TERM JOBID" in text
    assert "scancel --signal=TERM JOBID" in (WORKERS / "README.md").read_text()


# -- keys --------------------------------------------------------------------------------------


def test_readme_key_steps_say_where_the_key_file_comes_from():
    """Each `farpool keygen` in the README is followed by the path of the file it writes,
    KEY_DIR/issued/NAME.cluster-key, which a later command copies away."""
    text = (WORKERS / "README.md").read_text()
    lines = [line for _, block in markdown_blocks(text, "README.md") for _, line in _logical_lines(block)]
    keygens = 0
    for number, line in enumerate(lines):
        for argv, where in shell_commands(line, {}, "README.md"):
            args = parse(argv, where)
            if args.command != "keygen":
                continue
            keygens += 1
            issued = f"{args.key_dir}/issued/{args.name}.cluster-key"
            assert any(issued in later for later in lines[number + 1:]), f"{line!r}: nothing copies {issued}"
    assert keygens >= 4


# -- installing farpool ------------------------------------------------------------------------

# The placeholder the recipes use for the repository's URL (there is no public one).
REPO_URL = "https://git.example.org/farpool.git"
_INDEX_FARPOOL = re.compile(r"farpool\s*(\[[^\]]*\])?\s*($|[=<>!~])")


def _pip_install_lines() -> list[tuple[str, str]]:
    """(file, what follows `pip install`) for every pip install anywhere in the recipes and
    the top-level README (code blocks, comments, table cells)."""
    found = []
    for path in [REPO / "README.md", *sorted(p for p in WORKERS.rglob("*") if p.is_file())]:
        for line in path.read_text(encoding="utf-8").splitlines():
            for match in re.finditer(r"pip['\"]? install ([^`\n&|;]*)", line):
                found.append((str(path.relative_to(REPO)), match.group(1)))
    return found


def test_no_recipe_installs_farpool_from_an_index():
    """farpool is not published: `pip install farpool` (or farpool[extra], farpool==V) fails."""
    lines = _pip_install_lines()
    assert len(lines) >= 8
    extras_known = None
    for where, rest in lines:
        for word in shlex.split(rest, comments=True):
            if word.startswith("-"):
                continue
            assert not _INDEX_FARPOOL.fullmatch(word), \
                f"{where}: `pip install {rest.strip()}` asks an index for farpool, which is not published"
            extras = re.fullmatch(r"\.\[([^\]]*)\]", word)
            if extras:  # `pip install -e '.[dask]'` in a clone: the extras must exist
                if extras_known is None:
                    tomllib = pytest.importorskip("tomllib")
                    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                    extras_known = set(project["optional-dependencies"])
                assert set(extras.group(1).split(",")) <= extras_known, f"{where}: {word}"


@pytest.fixture(scope="module")
def fresh_clone() -> Iterator[Path]:
    """A `git clone` of this repository, with the work tree's uncommitted changes (what is
    under review) committed on top, so that it holds what the next commit will: no virtual
    environments, caches or other ignored files. Removed afterwards."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")

    def run_git(*args: str, cwd: Path) -> str:
        return subprocess.run([git, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                              check=True).stdout

    root = Path(tempfile.mkdtemp(prefix="farpool-clone-"))
    try:
        clone = root / "farpool"
        run_git("clone", "--quiet", str(REPO), str(clone), cwd=root)
        changed = run_git("ls-files", "-z", "--modified", "--others", "--exclude-standard", cwd=REPO)
        for name in filter(None, changed.split("\0")):
            source, target = REPO / name, clone / name
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            elif target.exists():  # deleted in the work tree
                target.unlink()
        run_git("add", "--all", cwd=clone)
        run_git("-c", "user.name=farpool tests", "-c", "user.email=tests@farpool.invalid",
                "commit", "--quiet", "--no-verify", "--allow-empty", "-m", "work tree", cwd=clone)
        yield clone
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _install_env(scratch: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HOME=str(scratch / "home"), PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               GIT_TERMINAL_PROMPT="0",
               # `python3`, `pip` in a recipe: this environment's, the one the tests run in.
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    (scratch / "home").mkdir(parents=True, exist_ok=True)
    return env


def _run_install(argv: list[str], where: str, cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        if re.search(r"(No matching distribution|Could not find a version) .*hatchling", done.stderr):
            pytest.skip(f"{where}: pip cannot fetch the build backend (hatchling) here")
        pytest.fail(f"{where} failed (exit status {done.returncode}):\n{done.stdout}\n{done.stderr}")


def _check_installed(venv: Path, where: str) -> None:
    """`farpool --help` runs from the new environment, and its farpool is the one installed
    there (not this checkout), at this checkout's version."""
    done = subprocess.run([str(venv / "bin" / "farpool"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: farpool"), f"{where}: {done.stderr}"
    probe = ("import farpool, importlib.metadata as m; "
             "print(farpool.__file__); print(m.version('farpool'))")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=venv)
    assert done.returncode == 0, f"{where}: {done.stderr}"
    location, version = done.stdout.split()
    assert Path(location).resolve().is_relative_to(venv.resolve()), f"{where}: farpool from {location}"
    tomllib = pytest.importorskip("tomllib")
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _readme_install_blocks() -> list[tuple[int, str]]:
    text = (WORKERS / "README.md").read_text(encoding="utf-8")
    return [(first, block) for first, block in markdown_blocks(text, "README.md") if "pip install" in block]


_INSTALL_COMMAND = re.compile(
    r"(git clone|python3 -m venv|python3 -m pip (install|wheel)|\S*/bin/pip install) ")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("first", [first for first, _ in _readme_install_blocks()],
                         ids=lambda first: f"README.md:{first}")
def test_readme_install_block_works_from_a_fresh_clone(first, fresh_clone):
    """The block, as written, in a scratch directory: the repository's placeholder URL is
    this clone, /opt/ a scratch directory, and `pip install` gets --no-deps (the
    dependencies come from an index and are not what is checked here)."""
    [block] = [block for number, block in _readme_install_blocks() if number == first]
    where = f"workers/README.md:{first}"
    lines = [line for _, line in _logical_lines(block) if line.strip() and not line.lstrip().startswith("#")]
    for line in lines:
        assert _INSTALL_COMMAND.match(line), f"{where}: keep install blocks to install commands: {line!r}"
    with tempfile.TemporaryDirectory(prefix="farpool-install-") as directory:
        scratch = Path(directory)
        (scratch / "work").mkdir()
        script = "\n".join(lines).replace(REPO_URL, fresh_clone.as_uri())
        script = script.replace("/opt/", f"{scratch}/opt/")
        script = re.sub(r"\bpip install ", "pip install --no-deps ", script)
        bash = shutil.which("bash") or pytest.skip("no bash here")
        _run_install([bash, "-euo", "pipefail", "-c", script], where, scratch / "work", _install_env(scratch))
        venvs = [cfg.parent for cfg in scratch.rglob("pyvenv.cfg")]
        assert len(venvs) == 1, f"{where}: expected one virtual environment, found {venvs}"
        _check_installed(venvs[0], where)


@pytest.mark.timeout(240)
def test_containerfile_installs_from_a_fresh_clone(fresh_clone):
    """The Containerfile's COPY and `pip install` steps, with the clone as the build
    context and a scratch directory as the image's file system (and a virtual environment
    as its Python); other RUN steps are not run."""
    where = "workers/container/Containerfile"
    with tempfile.TemporaryDirectory(prefix="farpool-image-") as directory:
        scratch = Path(directory)
        image, venv = scratch / "image", scratch / "venv"
        env = _install_env(scratch)
        _run_install([sys.executable, "-m", "venv", str(venv)], where, scratch, env)
        copied: list[str] = []
        installs = 0
        for keyword, rest in containerfile_instructions((WORKERS / "container/Containerfile").read_text()):
            if keyword == "COPY":
                words = shlex.split(rest)
                assert not any(w.startswith("--") for w in words), \
                    f"{where}: COPY {rest}: add its options to this reader"
                *sources, dest = words
                target = image / dest.lstrip("/")
                for source in sources:
                    path = fresh_clone / source  # the build context: the repository's root
                    assert path.exists(), f"{where}: COPY {source}: not in a clone of the repository"
                    if path.is_dir():
                        shutil.copytree(path, target, dirs_exist_ok=True)
                    else:
                        into = target / path.name if dest.endswith("/") or len(sources) > 1 else target
                        into.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, into)
                copied.append(dest.rstrip("/"))
            elif keyword == "RUN":
                for segment in re.split(r"&&|;", rest):
                    words = shlex.split(segment)
                    if words[:4] != ["python", "-m", "pip", "install"]:
                        continue
                    paths = [w for w in words if any(w == d or w.startswith(d + "/") for d in copied)]
                    if not paths:  # the libraries tasks import, from an index: not checked here
                        continue
                    argv = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps"]
                    argv += [str(image / w.lstrip("/")) if w in paths else w for w in words[4:]]
                    _run_install(argv, where, scratch, env)
                    installs += 1
        assert installs == 1, f"{where}: expected one `pip install` of farpool from the build context"
        _check_installed(venv, where)
