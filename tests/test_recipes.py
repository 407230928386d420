"""The deployment recipes in workers/: every `farpool` command line in them is one the CLI takes.

Each recipe format is read the way its runner reads it (systemd's ExecStart= with its
variable rules, a Containerfile's JSON ENTRYPOINT/CMD, the shell of an sbatch script,
a Kubernetes container's command/args with $(VAR) from its env), shell variables are
set to sample values, and the result goes through ``farpool.cli.build_parser()`` with
abbreviated options refused, so a misspelt or shortened option fails here rather than
on a cluster. Then each recipe's parsed fields are checked against what it means to do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from farpool.cli import build_parser

pytestmark = pytest.mark.timeout(30)

WORKERS = Path(__file__).resolve().parents[1] / "workers"
SUBCOMMANDS = ("scheduler", "worker", "cluster", "status", "keygen", "demo")


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


def read_markdown(text: str, env: dict[str, str], name: str) -> list[Command]:
    """The shell lines of fenced code blocks."""
    commands: list[Command] = []
    block: list[str] | None = None
    first = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            if block is None:
                block, first = [], number + 1
            else:
                commands += read_shell_script("\n".join(block), env, name, first)
                block = None
        elif block is not None:
            block.append(line)
    assert block is None, f"{name}: unclosed code block"
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
