"""Every command shown in README.md, docs/*.md and the CLI's `--help` examples runs as written.

Commands come from fenced code blocks: bash, sh, shell and console blocks, and untagged blocks
whose first line is a command, with `\\` continuations joined and `# comments` dropped. Each
document's commands run in order, in a fresh folder that looks like the repository (configs/,
bench/, tests/ are linked in), so a command may use what an earlier one made (`prepare`, then
`train --data.path`). Absolute paths (/shared/..., /mnt/...) are moved under that folder.

What "runs" means, by program (see `Session.run_simple`):
- `gigatrain` (also `python -m gigatrain`) runs in this process and must exit 0; `train` gets
  --dry-run, so its config, layout, data folder and GIGATRAIN_FAULT are checked and nothing is
  trained (a documented run takes minutes to weeks).
- `gigatrain lighthouse` serves until stopped: its options are parsed, not served.
- `torchrun ... -m gigatrain train ...`: the same dry run, for the world size torchrun would
  start (--nnodes x --nproc-per-node), with the command's environment.
- What a user brings is made up, small: a missing source of `prepare` or text of `eval` becomes
  a few standard-library files; a missing run directory that `eval`, `generate`, `export`, `report` or
  `plan --calibrate` reads becomes a copy of a tiny trained run.
- NOT_RUN: programs that need other systems or take minutes; what is checked of them is there.
"""

import argparse
import contextlib
import glob
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from gigatrain import cli

DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
# Repository entries the documented commands read (linked into each session's folder).
LINKED = ("configs", "bench", "tests", "gigatrain", "pyproject.toml")
# A usage synopsis, not a command: "[options]", "[--section.key=value ...]", "<first pod>", "...".
SYNOPSIS = re.compile(r"\.\.\.|…|<[a-z][a-z _-]*>|\[(options|-|[A-Z])[^\]]*\]")

# Not run, and why. What is checked instead is in Session.run_simple.
NOT_RUN = {
    "pip": "installs packages from the network",
    ".": "activates a virtual environment (the test runs in the current one)",
    "source": "activates a virtual environment (the test runs in the current one)",
    "python -m venv": "creates a virtual environment",
    "python -m pytest": "the test suite itself, which this test is part of; the named test files must exist",
    "python SCRIPT": "benchmarks (bench/*.py) run for minutes; the script must exist",
    "sbatch": "needs a Slurm cluster (tests/launch/test_slurm.py runs one); the script must exist and parse",
    "kubectl": "needs a Kubernetes cluster (tests/launch/test_k8s.py checks the manifests); stdin must be "
               "the JSON manifest",
    "tail": "follows the log of a running job",
    "torchft_lighthouse": "torchft's quorum server runs until stopped (tests/launch checks how the launchers start it); "
                          "it must be installed beside this Python",
    "lm_eval": "lm-evaluation-harness, not a gigatrain dependency, evaluates for hours; it reads an exported folder",
    "vllm": "an inference server: needs a GPU and the vllm package; it serves an exported folder",
}
KNOWN_PROGRAMS = {"gigatrain", "torchrun", "python", "python3", "export", *NOT_RUN}  # that start a command block
RUN_READERS = ("eval", "generate", "export", "report")  # gigatrain commands whose first argument is a run directory


# -- extraction -----------------------------------------------------------------------------------
def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, fence language, body) of every fenced block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1), m.group(2))
            for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S)]


def program_of(words: list[str]) -> str | None:
    for word in words:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word):
            return word
    return None


def command_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command line) of every shell command in a markdown text; synopses and
    script listings (a block starting with #!) are left out."""
    commands = []
    for first_line, language, body in code_blocks(text):
        if language not in SHELL_FENCES + ("",) or body.startswith("#!"):
            continue
        lines, pending, start = [], "", 0
        for number, line in enumerate(body.splitlines(), first_line):
            if not pending:
                start = number
                if language == "console":
                    if not line.startswith("$ "):
                        continue  # output
                    line = line[2:]
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            line, pending = (pending + line).strip(), ""
            if line and not line.startswith("#"):
                lines.append((start, line))
        if not lines:
            continue
        if language == "" and program_of(shlex.split(lines[0][1], comments=True)) not in KNOWN_PROGRAMS:
            continue  # an untagged block of something else: a file tree, a data flow
        commands += [(number, line) for number, line in lines if not SYNOPSIS.search(line.split(" #")[0])]
    return commands


def help_examples() -> list[tuple[int, str]]:
    """The `examples:` lines of every sub-command's --help."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for name, sub in commands.choices.items():
        epilog = sub.epilog or ""
        if "examples:" in epilog:
            block = epilog.split("examples:", 1)[1].strip().splitlines()
            found += [(0, f"{line.strip()}  # gigatrain {name} --help") for line in block if line.strip()]
    return found


# -- the shell, as far as the docs use it ----------------------------------------------------------
def split_pipelines(line: str) -> list[list[list[str]]]:
    """`a | b && c` -> [[a, b], [c]]: pipelines of simple commands (lists of words)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    pipelines, pipeline, words = [], [], []
    for token in lexer:
        if token in ("&&", ";", "|"):
            pipeline.append(words)
            words = []
            if token != "|":
                pipelines.append(pipeline)
                pipeline = []
        elif token in ("||", "&", ">", ">>", "<", "(", ")"):
            raise AssertionError(f"{token!r} in {line!r}: the documented-commands test does not emulate it; extend it")
        else:
            words.append(token)
    pipeline.append(words)
    pipelines.append(pipeline)
    return pipelines


def stdlib_text(n: int) -> list[str]:
    from gigatrain.data.prepare import default_corpus_files

    files = [f for f in default_corpus_files() if 2_000 < f.stat().st_size < 8_000][:n]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


class Session:
    """One document's commands, run in order in one folder."""

    def __init__(self, folder: Path, tiny_run: Path):
        self.folder = folder
        self.root = folder / "root"  # where absolute paths land
        self.tiny_run = tiny_run
        self.variables: dict[str, str] = {}
        self.env: dict[str, str] = {}  # exported
        for name in LINKED:
            (folder / name).symlink_to(REPO / name)

    # One line of a document.
    def run_line(self, line: str) -> None:
        line = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                      lambda m: self.variables.get(m.group(1), self.env.get(m.group(1), m.group(0))), line)
        assert "$" not in line.split(" #")[0], f"unknown shell variable in {line!r}"
        for pipeline in split_pipelines(line):
            stdin = None
            for words in pipeline:
                stdin = self.run_simple([self.move_absolute(w) for w in words], stdin)

    def move_absolute(self, word: str) -> str:
        """/shared/runs/x -> <folder>/root/shared/runs/x, also after '=' and ':'."""
        if "://" in word:
            return word
        return re.sub(r"(^|[=:])/", lambda m: f"{m.group(1)}{self.root}/", word)

    def run_simple(self, words: list[str], stdin: str | None) -> str:
        """Run (or check) one simple command; returns its stdout, for a pipe."""
        env = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if not words:
            self.variables.update(env)  # NAME=value alone: a shell variable
            return ""
        program, args = Path(words[0]).name or words[0], words[1:]  # /path/to/venv/bin/python is python
        program = re.sub(r"^(python)3?(\.\d+)?$", r"\1", program)
        if program == "export":
            for word in args:
                key, _, value = word.partition("=")
                self.env[key] = value
            return ""
        if program == "gigatrain":
            return self.gigatrain(args, env)
        if program == "torchrun":
            return self.torchrun(args, env)
        if program == "python":
            return self.python(args, env)
        if program == "sbatch":
            script = Path(args[-1])
            assert script.is_file(), f"sbatch {args[-1]}: the documented command did not write it"
            checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert checked.returncode == 0, checked.stderr
            return ""
        if program == "kubectl":
            assert args[:3] == ["apply", "-f", "-"], f"kubectl {' '.join(args)}: only `apply -f -` is checked"
            manifest = json.loads(stdin)
            assert manifest["kind"] == "List" and manifest["items"], manifest
            return ""
        assert program in NOT_RUN, f"{program}: a program the documented-commands test does not know; add it"
        if program == "torchft_lighthouse":
            assert (Path(sys.executable).parent / program).is_file(), "torchft_lighthouse is not installed"
        return ""

    def python(self, args: list[str], env: dict) -> str:
        if args[:2] == ["-m", "gigatrain"]:
            return self.gigatrain(args[2:], env)
        if args[:2] == ["-m", "pytest"]:
            for path in (a for a in args[2:] if not a.startswith("-")):
                assert (self.folder / path.split("::")[0]).exists(), f"python -m pytest {path}: no such test file"
            return ""
        if args[:1] == ["-m"]:
            assert f"python -m {args[1]}" in NOT_RUN, f"python -m {args[1]}: not known to this test; add it"
            return ""
        assert args and (self.folder / args[0]).is_file(), f"python {' '.join(args)}: no such script"
        return ""

    def torchrun(self, args: list[str], env: dict) -> str:
        from torch.distributed.run import get_args_parser

        parsed = get_args_parser().parse_args(args)
        assert parsed.module and parsed.training_script == "gigatrain", f"torchrun {' '.join(args)}: not gigatrain"
        assert parsed.training_script_args[:1] == ["train"], "torchrun runs gigatrain train"
        world = int(parsed.nnodes.split(":")[-1]) * int(parsed.nproc_per_node)
        return self.gigatrain([*parsed.training_script_args, "--world-size", str(world)], env)

    def gigatrain(self, args: list[str], env: dict) -> str:
        if args[:1] == ["lighthouse"]:
            # It serves until stopped: its options are parsed, and tests/fault/test_replica.py runs it.
            cli.build_parser().parse_args(args)
            return ""
        self.provide_inputs(args)
        args = [expanded for word in args for expanded in (sorted(glob.glob(word)) or [word])]
        if args[:1] == ["train"] and "--dry-run" not in args:
            args.append("--dry-run")
        out, err = io.StringIO(), io.StringIO()
        with scoped_environ({**self.env, **env}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.run(args)
        assert code == 0, f"gigatrain {' '.join(args)} exited {code}:\n{err.getvalue()}"
        assert "gigatrain: warning" not in err.getvalue(), err.getvalue()
        return out.getvalue()

    def provide_inputs(self, args: list[str]) -> None:
        """Make up what a documented command reads but the docs assume the user has."""
        command = args[0] if args else ""
        if command in RUN_READERS:
            self.provide_run(args[1])
        if args[:1] == ["plan"] and "--calibrate" in args:
            for word in option_values(args, "--calibrate"):
                self.provide_run(word)
        if command == "prepare":
            for word in [*positionals(args[1:]), *option_values(args, "--val")]:
                provide_text(Path(word))
        if command == "eval":
            for word in option_values(args, "--text"):
                provide_text(Path(word))

    def provide_run(self, word: str) -> None:
        if not Path(word).exists():
            shutil.copytree(self.tiny_run, word)


def positionals(args: list[str]) -> list[str]:
    """The words before the first option."""
    return args[: next((i for i, a in enumerate(args) if a.startswith("-")), len(args))]


def option_values(args: list[str], option: str) -> list[str]:
    """The words after `option` up to the next option."""
    if option not in args:
        return []
    rest = args[args.index(option) + 1:]
    return rest[: next((i for i, a in enumerate(rest) if a.startswith("-")), len(rest))]


def provide_text(path: Path) -> None:
    """A folder (or glob, or file) of a few standard-library sources, where nothing is yet."""
    if any(c in str(path) for c in "*?["):
        if glob.glob(str(path)):
            return
        folder, suffix = path.parent, path.suffix or ".txt"
        names = [f"sample{i}{suffix}" for i in range(3)]
    elif path.exists():
        return
    elif path.suffix:
        folder, names = path.parent, [path.name]
    else:
        folder, names = path, [f"sample{i}.py" for i in range(4)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in zip(names, stdlib_text(len(names))):
        (folder / name).write_text(json.dumps({"text": text}) + "\n" if name.endswith(".jsonl") else text)


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- the tests ------------------------------------------------------------------------------------
def documented(source: str) -> list[tuple[int, str]]:
    return help_examples() if source == "--help" else command_lines((REPO / source).read_text())


@pytest.mark.parametrize("source", [*DOCUMENTS, "--help"])
def test_documented_commands_run_as_written(source, tmp_path, monkeypatch, tiny_run):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    session = Session(tmp_path, tiny_run)
    for number, line in documented(source):
        try:
            session.run_line(line)
        except Exception as err:
            raise AssertionError(f"{source}:{number}: {line}\n{err}") from err


def test_extraction_sees_continuations_pipes_and_skips_synopses():
    text = "\n".join([
        "```bash",
        "gigatrain launch slurm --nodes N --gpus-per-node G [options] CONFIG.toml",
        "A=1 torchrun --nproc-per-node 2 \\",
        "    -m gigatrain train configs/tiny.toml   # two processes",
        "gigatrain launch k8s x | kubectl apply -f -",
        "```",
        "```",
        "runs/<name>/",
        "  config.json",
        "```",
        "```console",
        "$ gigatrain report runs/a",
        "step 1 ...",
        "```",
        "```bash",
        "#!/bin/bash",
        "srun torchrun",
        "```",
    ])
    assert [(number, line.split()) for number, line in command_lines(text)] == [
        (3, "A=1 torchrun --nproc-per-node 2 -m gigatrain train configs/tiny.toml # two processes".split()),
        (5, "gigatrain launch k8s x | kubectl apply -f -".split()),
        (12, "gigatrain report runs/a".split())]
    assert split_pipelines("A=1 x 'a b' | y -f - && z # c") == [[["A=1", "x", "a b"], ["y", "-f", "-"]], [["z"]]]
    # Something in every document that has commands: the extraction did not silently stop working.
    assert sum(len(documented(source)) for source in [*DOCUMENTS, "--help"]) >= 40
