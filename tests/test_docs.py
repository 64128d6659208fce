"""The docs stay true: their commands parse, their lists match the code, their paths and links exist.

Documentation rots where nothing reads it back. Here every `dsmd ...` command line in the README,
docs/, BENCHMARKS.md and the Makefile goes through the real argument parser, the README's command
list is compared with the sub-commands, every module a package map (an `__init__` docstring) names
must exist and every module must be named, and every path or link inside the repository must resolve.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from test_packaging import _tracked  # the repository's files, as git sees them

from dsmd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "BENCHMARKS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
PACKAGES = ["dsmd", "distill", "distill/teachers", "export", "index", "serve", "serve/routes"]
TOP = ("bench", "configs", "docs", "dsmd", "distill", "export", "index", "serve", "tests", ".ci")

# `dsmd CMD` as a command: first on the line or after ; && |, maybe with a path (.venv/bin/, make's $(BIN)/),
# or `-m dsmd.cli CMD` under torchrun.
COMMAND = re.compile(r"(?:^\s*(?:\$\s+)?|[;&|]\s*|-m\s)(?:[\w.$()/-]*/)?(?:dsmd|dsmd\.cli)\s+([a-z][\w-]*)(.*)$")
# a line of a command list: `dsmd NAME   what it does`
LIST_ENTRY = re.compile(r"^\s*dsmd ([a-z][\w-]*)\s{2,}[a-z(]")


def _fenced_lines(text: str) -> list[str]:
    """The lines inside ``` blocks, with backslash continuations joined."""
    out, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if inside:
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            out.append(pending)
            pending = ""
    return out


def _inline_spans(text: str) -> list[str]:
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", outside)


def _makefile_lines() -> list[str]:
    """Recipe lines of the Makefile with its own variables filled in (continuations joined)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*)$", text, re.M))
    variables.update({"ARGS": "", "PORT": "8000"})
    lines = []
    for line in text.splitlines():
        if line.startswith("\t"):
            for _ in range(3):  # nested variables
                line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), "X"), line)
            lines.append(line.strip())
    return lines


def _commands() -> list[tuple[str, str, bool]]:
    """(where, command line, complete) for every dsmd command the docs and the Makefile show.

    A command in a code block or a Makefile recipe is complete: it must parse as it stands. One in
    running text (`dsmd index build`) or elided with "..." is a mention: its sub-commands and options
    must exist, its required arguments may be left out.
    """
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for line in _fenced_lines(text):
            if not LIST_ENTRY.match(line) and COMMAND.search(line):
                found.append((doc, line, "..." not in line and "…" not in line))
        found += [(doc, span, False) for span in _inline_spans(text) if COMMAND.search(span)]
    found += [("Makefile", line, True) for line in _makefile_lines() if COMMAND.search(line)]
    return found


def _argv(line: str) -> list[str]:
    """The arguments after `dsmd`, with the docs' notation turned into one concrete choice."""
    m = COMMAND.search(line)
    rest = re.split(r"\s#|;| \| | && |\s{3,}(?=[a-z(])", m.group(2))[0]  # comments, pipes, an aligned description
    rest = re.sub(r"[][()]", " ", rest)  # [--optional] and (--one | --other) notation
    try:
        tokens = [m.group(1)] + shlex.split(rest)
    except ValueError:  # an inline span cut inside quotes
        tokens = [m.group(1)] + rest.split()
    argv = []
    for t in tokens:
        if t in ("...", "…") or t.endswith("...") or t.endswith("…"):
            continue
        argv.append(t.split("|")[0] if "|" in t and not t.startswith("--") else t)
    return argv


def _parses(argv: list[str]) -> str | None:
    """None if the real parser takes `argv`, else what it said."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else f"exit {e.code}"
    return None


def _mention_fits(argv: list[str]) -> str | None:
    """None if the sub-commands named exist and every option belongs to the innermost one."""
    parser = build_parser()
    rest = list(argv)
    while rest:
        subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subs is None or rest[0].startswith("-"):
            break
        if re.fullmatch(r"[A-Z_]+", rest[0]):  # `dsmd index ACTION --help`: a placeholder for any sub-command
            extra = [t for t in rest[1:] if t not in ("--help", "-h")]
            return f"options after the placeholder {rest[0]}: {extra}" if extra else None
        if rest[0] not in subs.choices:
            return f"no sub-command {rest[0]!r} (choices: {', '.join(subs.choices)})"
        parser = subs.choices[rest.pop(0)]
    known = {o for a in parser._actions for o in a.option_strings}
    unknown = [t for t in rest if re.match(r"--?[a-zA-Z]", t) and t.split("=")[0] not in known]
    return f"{parser.prog} has no option {', '.join(unknown)}" if unknown else None


def test_the_docs_show_commands_at_all():
    """The extraction itself works: a broken regex would make the next test pass on nothing."""
    where = {doc for doc, _, _ in _commands()}
    assert {"README.md", "Makefile", "docs/indexing.md", "docs/serving.md"} <= where, where
    assert len(_commands()) > 40


def test_every_dsmd_command_in_the_docs_and_makefile_parses(capsys):
    bad = []
    for doc, line, complete in _commands():
        argv = _argv(line)
        error = _mention_fits(argv) or (complete and _parses(argv))
        if error:
            said = capsys.readouterr().err.strip().splitlines()[-1:]
            bad.append(f"{doc}: {line.strip()}  ->  {said[0] if said else error}")
    assert bad == [], "\n".join(bad)


def test_a_wrong_command_is_caught(capsys):
    """The check can fail: an option the sub-command does not have is refused."""
    assert _parses(_argv("dsmd index info artifacts/index --folder photos"))
    assert _mention_fits(_argv("dsmd index info --folder photos"))
    assert _mention_fits(_argv("dsmd index no-such-action"))
    assert _parses(_argv("dsmd evaluate runs/x --no-such-flag"))
    assert _parses(_argv("dsmd export student|teacher runs/x")) is None
    assert _mention_fits(_argv("dsmd index build --folder")) is None
    assert _mention_fits(_argv("dsmd index ACTION --help")) is None
    assert _mention_fits(_argv("dsmd index ACTION --folder x"))
    assert _parses(_argv("dsmd index build --folder")) is not None


def _subcommands() -> set[str]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return set(action.choices)


def test_the_readme_command_list_is_the_cli():
    listed = {m.group(1) for line in _fenced_lines((ROOT / "README.md").read_text(encoding="utf-8"))
              if (m := LIST_ENTRY.match(line))}
    assert listed == _subcommands()


def test_the_cli_docstring_lists_every_command():
    import dsmd.cli

    listed = {m.group(1) for line in dsmd.cli.__doc__.splitlines() if (m := LIST_ENTRY.match(line))}
    assert listed == _subcommands()


@pytest.mark.parametrize("package", PACKAGES)
def test_the_package_map_names_every_module_and_only_modules_that_exist(package):
    """An `__init__` docstring is the package's map: each module in it, and nothing that is gone."""
    folder = ROOT / package
    doc = (folder / "__init__.py").read_text(encoding="utf-8").split('"""')[1]
    named = set(re.findall(r"(?<![\w.])([\w/]+\.(?:py|html))\b", doc))
    missing = [n for n in named if not (folder / n).exists()]
    assert missing == [], f"{package}/__init__.py names files that do not exist: {missing}"
    modules = {p.relative_to(folder).as_posix() for p in folder.rglob("*.py")
               if p.name != "__init__.py" and "__pycache__" not in p.parts}
    # a sub-package's modules may be mapped by its own __init__ instead
    own_maps = {p.parent.relative_to(folder).as_posix() for p in folder.rglob("__init__.py") if p.parent != folder}
    unnamed = []
    for module in sorted(modules):
        sub = module.rsplit("/", 1)[0] if "/" in module else None
        if sub in own_maps and f"{sub}/" in doc:
            continue  # e.g. distill/teachers/: named as a folder here, mapped in its own __init__
        if module not in named and Path(module).name not in named:
            unnamed.append(module)
    assert unnamed == [], f"{package}/__init__.py does not name: {unnamed}"


def test_every_link_and_path_in_the_docs_resolves():
    """Markdown links and `path` mentions of repository files point at files that exist."""
    placeholder = re.compile(r"[*{}<>]|YYYY|DATE|\.\.\.|…|NAME|/N\b|/X\b")
    bad = []
    for doc in _tracked("*.md"):
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            if not (path.is_relative_to(ROOT) and path.exists()):
                bad.append(f"{doc.relative_to(ROOT)}: link {target}")
        for span in _inline_spans(text):
            token = span.split()[0] if span.split() else ""
            if token.startswith(tuple(f"{t}/" for t in TOP)) and not placeholder.search(token):
                if not (ROOT / token.rstrip(":,")).exists():
                    bad.append(f"{doc.relative_to(ROOT)}: path `{token}`")
    assert bad == [], "\n".join(bad)
