"""The documentation cannot go stale: every link, repository path, command and option that README.md,
docs/*.md and the notebooks' markdown name exists, and no tracked file names a path of a build machine.

  * README.md stays a five-minute read (at most README_MAX_LINES lines);
  * every relative link (and its #anchor, GitHub's heading slugs) resolves;
  * every repository path in backticks or in a code block (`src/...`, `tests/...`, `clap/encode.py`,
    `benchmarks/bench.py`, a bare `demo.py`) exists in the tree;
  * every `audio-residual <command>` is a subcommand of the real parser (built in-process), every `--option`
    after it is one of that subcommand's options, every `--method-option NAME.KEY=` names an option of that
    method, every `--methods a,b` names registered methods, every `make <target>` is a Makefile target;
  * docs/architecture.md's layer table equals tests/test_code_shape.py's LAYERS, and its file table lists
    exactly the modules of src/audio_residual;
  * README names every subcommand in its command table, each with a link to a docs page;
  * no tracked (or new, not ignored) file contains an absolute path of a build machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
from functools import cache
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "audio_residual"
README_MAX_LINES = 200

# Options of other programs that the docs show beside ours (torchrun, pip, pytest, benchmarks/bench.py).
EXTERNAL_OPTIONS = {"--nproc_per_node", "--nnodes", "--rdzv-endpoint", "--rdzv-backend", "--rdzv-id", "--standalone",
                    "--index-url", "--quiet", "--upgrade", "--durations", "--scale-clips"}
STUDY_COMMANDS = {"experiment": "classification", "sweep": "classification", "retrieval": "retrieval"}  # --methods
# Output and dataset folders a path may start with: never files of the repository.
NOT_REPO_ROOTS = {"runs", "OUT", "out", "data", "cache", "CACHE", "figures", "wavs", "clips", "models"}
# Deliberate absolute paths: inputs a test feeds to a check that must refuse them.
ALLOWED_MACHINE_PATHS = {
    "tests/test_data_download.py": {"/{}/evil.txt".format("tmp")},  # an absolute member name extraction refuses
}
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:tmp|work|root)/[^\s\"'`)]*|(?<![\w.:/~-])/home/[\w.-]+/[^\s\"'`)]*"
                          r"|\b[A-Za-z]:\\+Users\\+[^\s\"'`)]*")


# ------------------------------------------------------------------------------------------------ sources
def markdown_pages() -> dict[str, str]:
    """README, every docs page and the notebooks' markdown cells: relative path → text."""
    pages = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    pages |= {f"docs/{p.name}": p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}
    for notebook in sorted(ROOT.glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        pages[notebook.name] = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return pages


FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def split_code(text: str) -> tuple[str, list[str]]:
    """(the prose with fenced blocks removed, every code line: fenced, indented by 4 and joined over `\\`)."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    lines = [line for block in blocks for line in block.splitlines()]
    lines += [line for line in prose.splitlines() if line.startswith("    ") and line.strip()[:1] not in ("-", "*", "|", "")]
    return prose, "\n".join(lines).replace("\\\n", " ").splitlines()


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: rendered text, lower case, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("**", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


@cache
def cli() -> dict[str, set[str]]:
    """Subcommand → its options, from the real parser (no subprocess)."""
    from audio_residual.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


@cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))


@cache
def repo_names() -> set[str]:
    """Base names of every file in the working tree (outputs and environments aside)."""
    skip = {".git", ".venv", "runs", "cache", "data", "__pycache__", ".whl", "wandb"}
    names = set()
    for path in ROOT.rglob("*"):
        if not skip & set(path.relative_to(ROOT).parts):
            names.add(path.name)
    return names


PACKAGE_DIRS = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
REPO_ROOTS = {"src", "tests", "docs", "benchmarks", ".ci", "audio_residual"}
PATHLIKE = re.compile(r"[A-Za-z0-9_][\w.-]*(?:/[\w.-]+)*/?")


def repo_path(token: str) -> str | None:
    """`token` when it names a file or folder of the repository (not an output, a dataset layout or a hub id)."""
    token = token.strip("\"'()[],;:")
    if not PATHLIKE.fullmatch(token) or token.split("/")[0] in NOT_REPO_ROOTS:
        return None
    first = token.split("/")[0]
    if "/" in token and (first in REPO_ROOTS or first in PACKAGE_DIRS):
        return token
    if token.endswith((".py", ".ipynb", ".sh")):
        return token
    return None


def path_exists(token: str) -> bool:
    if "/" not in token.rstrip("/"):
        return token.rstrip("/") in repo_names()
    return any((base / token).exists() for base in (ROOT, ROOT / "src", PACKAGE))


# ------------------------------------------------------------------------------------------------ checks
def link_problems(page: str, text: str, pages: dict[str, str]) -> list[str]:
    problems = []
    base = (ROOT / page).parent
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else ROOT / page
        relative = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
        if not file.exists():
            problems.append(f"{page}: link to {target!r}: {relative} missing (no such file)")
        elif anchor and relative.endswith(".md"):
            page_text = pages.get(relative) or file.read_text(encoding="utf-8")
            if anchor not in anchors(page_text):
                problems.append(f"{page}: link to {target!r}: no heading with anchor #{anchor} in {relative}")
    return problems


def path_problems(page: str, text: str) -> list[str]:
    prose, code = split_code(text)
    tokens = INLINE.findall(prose) + [t for line in code for t in line.split()]
    return [f"{page}: `{t}` is not in the repository" for t in dict.fromkeys(tokens)
            if (path := repo_path(t)) is not None and not path_exists(path)]


INVOCATION = re.compile(r"(?:audio-residual|-m audio_residual)\s+([a-z][a-z0-9-]*)(.*)")


def invocation_problems(page: str, line: str) -> list[str]:
    """Problems of every `audio-residual CMD --opt ...` (or `make TARGET`) on one code line or inline span."""
    problems = []
    for target in re.findall(r"(?:^|[\s;&(])make\s+([a-z][\w-]*)", line):
        if target not in make_targets():
            problems.append(f"{page}: `make {target}`: no such Makefile target")
    match = INVOCATION.search(line)
    if match is None:
        return problems
    command, rest = match.group(1), re.split(r"\s(?:\||&&|;|#|&)\s?", match.group(2) + " ")[0]
    if command not in cli():
        return [*problems, f"{page}: `audio-residual {command}`: no such command (have {sorted(cli())})"]
    for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
        if option not in cli()[command]:
            problems.append(f"{page}: `audio-residual {command} {option}`: no such option (`{command} --help`)")
    problems += method_problems(page, command, rest)
    return problems


def method_problems(page: str, command: str, rest: str) -> list[str]:
    from audio_residual.methods import REGISTRIES

    if command not in STUDY_COMMANDS:
        return []  # saliency's --methods are attribution methods
    task, problems = STUDY_COMMANDS[command], []
    for names in re.findall(r"--methods[ =]([\w,-]+)", rest):
        problems += [f"{page}: `{command} --methods`: {n!r} is no {task} method" for n in names.split(",")
                     if n not in REGISTRIES[task]]
    for name, key in re.findall(r"--method-option[ =]([\w-]+)\.(\w+)=", rest):
        known = {k for registry in REGISTRIES.values() if name in registry for k in registry[name].defaults}
        if key not in known:
            problems.append(f"{page}: `--method-option {name}.{key}`: {name!r} has no option {key!r}")
    return problems


def command_problems(page: str, text: str) -> list[str]:
    prose, code = split_code(text)
    problems = [p for line in code for p in invocation_problems(page, line)]
    for span in INLINE.findall(prose):
        words = span.split()
        if words and words[0] in cli() and len(words) > 1 and words[1].startswith("--"):
            span = "audio-residual " + span  # `train-residual --force`
        if words and words[0].startswith("--"):
            every = set().union(*cli().values()) | EXTERNAL_OPTIONS
            problems += [f"{page}: `{o}` is no option of any command" for o in re.findall(r"--[a-z][a-z0-9-]*", span)
                         if o not in every]
        problems += invocation_problems(page, span)
    for command in re.findall(r"audio-residual ([a-z][a-z0-9-]*)", prose):
        if command not in cli():
            problems.append(f"{page}: `audio-residual {command}`: no such command")
    return list(dict.fromkeys(problems))


# ------------------------------------------------------------------------------------------------ tests
def test_readme_is_a_five_minute_read():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference text to docs/"


def test_every_link_resolves():
    pages = markdown_pages()
    problems = [p for page, text in pages.items() for p in link_problems(page, text, pages)]
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_every_repository_path_exists():
    problems = [p for page, text in markdown_pages().items() for p in path_problems(page, text)]
    assert not problems, "\n".join(problems)


def test_every_command_and_option_exists():
    problems = [p for page, text in markdown_pages().items() for p in command_problems(page, text)]
    assert not problems, "\n".join(problems)


def test_readme_links_every_command_to_its_page():
    rows = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if line.startswith("| `audio-residual ")]
    linked = {re.match(r"\| `audio-residual ([\w-]+)`", row).group(1) for row in rows if "](docs/" in row}
    missing = sorted(set(cli()) - linked)
    assert not missing, f"README's command table lacks (or does not link to a docs page) {missing}"


def test_layer_table_matches_the_code_shape_rules():
    spec = importlib.util.spec_from_file_location("code_shape", ROOT / "tests" / "test_code_shape.py")
    shape = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shape)
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = {}
    for layer, cell in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M):
        names = re.findall(r"`([\w/.]+)`", cell)
        table.setdefault(int(layer), set()).update(f"audio_residual.{n.removesuffix('.py').rstrip('/')}" for n in names)
    rules = {i: set(entries) for i, entries in enumerate(shape.LAYERS)}
    assert table == rules, f"docs/architecture.md's layer table {table} != tests/test_code_shape.py's LAYERS {rules}"


def test_file_table_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "\n## Files\n" in text, "docs/architecture.md has no '## Files' section (the table of every module)"
    section = text.split("\n## Files\n", 1)[1].split("\n## ", 1)[0]
    listed = {folder: set(re.findall(r"`(\w+\.py)`", cell))
              for folder, cell in re.findall(r"^\| `([\w/]+)` \| (.+) \|$", section, re.M)}
    actual = {"audio_residual/": {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py"}}
    actual |= {f"{d}/": {p.name for p in (PACKAGE / d).glob("*.py")} - {"__init__.py"}
               for d in PACKAGE_DIRS if any((PACKAGE / d).glob("*.py"))}
    problems = [f"{folder}: not in the table" for folder in sorted(set(actual) - set(listed))]
    problems += [f"{folder}: no such package folder" for folder in sorted(set(listed) - set(actual))]
    for folder in sorted(set(actual) & set(listed)):
        if missing := sorted(actual[folder] - listed[folder]):
            problems.append(f"{folder}: modules missing from the table: {missing}")
        if gone := sorted(listed[folder] - actual[folder]):
            problems.append(f"{folder}: the table lists modules that do not exist: {gone}")
    assert not problems, "docs/architecture.md, ## Files:\n" + "\n".join(problems)


def test_no_file_names_a_path_of_a_build_machine():
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    problems = []
    for name in filter(None, listed):
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (weights, images)
        text = data.decode("utf-8", errors="replace")
        allowed = ALLOWED_MACHINE_PATHS.get(name, set())
        for number, line in enumerate(text.splitlines(), 1):
            found = [m for m in MACHINE_PATH.findall(line) if not any(m.startswith(a) for a in allowed)]
            problems += [f"{name}:{number}: {m}" for m in found]
    assert not problems, "absolute paths of a build machine in the repository:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------ the checks' own behaviour
def test_the_checks_catch_what_they_are_for():
    """Each check on a page that breaks it: a stale path, command, option, method option and anchor."""
    page = ("# Title\n\nSee [x](docs/nowhere.md), [y](README.md#no-such-heading), `evaluation/retrieval.py`.\n\n"
            "```bash\naudio-residual experiment --data esc50 --finetune-epochs 3\naudio-residual frobnicate\n"
            "audio-residual retrieval --methods zero-shot --method-option projection.text_mdl=x\nmake nothing\n```\n"
            "Also `--retention esc50` and `train-residual --no-such`.\n")
    pages = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    problems = link_problems("page.md", page, pages) + path_problems("page.md", page) + command_problems("page.md", page)
    for needle in ("nowhere.md", "#no-such-heading", "evaluation/retrieval.py", "--finetune-epochs", "frobnicate",
                   "'zero-shot'", "text_mdl", "make nothing", "`--retention`", "--no-such"):
        assert any(needle in p for p in problems), (needle, problems)
    assert not path_problems("ok.md", "`clap/encode.py`, `runs/demo/report.md`, `laion/clap-htsat-unfused`, `demo.py`")
    assert MACHINE_PATH.findall("at " + "/tm" + "p/x/y and C:" + "\\Users\\me\\a") and not MACHINE_PATH.findall(
        "/path/to/clotho, https://example.org/tmp/x, ~/.cache/x, /shared/runs")
    assert slug("Zero-shot transfer (`--transfer DATA ...`)") == "zero-shot-transfer---transfer-data-"


def refresh_module():
    spec = importlib.util.spec_from_file_location("refresh_figures", ROOT / "docs" / "refresh_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_table_comes_from_the_demo_outputs():
    refresh = refresh_module()
    summary = pd.DataFrame({"method": ["zeroshot", "residual"], "accuracy_mean": [0.75, 0.8],
                            "accuracy_std": [0.1, 0.05], "trainable_params": [0, 185]})
    few_shot = pd.DataFrame({"method": ["zeroshot", "residual"], "shots": [1, 1], "accuracy_mean": [0.7, 0.72],
                             "accuracy_std": [0.1, 0.2]})
    gains = pd.DataFrame({"task": ["classification"], "method": ["residual"], "gain": [0.05], "noise": [0.03]})
    table = refresh.demo_table(summary, few_shot, gains).splitlines()
    assert table[0].startswith("| method |") and "1-shot" in table[0] and "gain over zero-shot" in table[0]
    assert table[3] == "| residual | 0.80 ± 0.05 | 0.72 ± 0.20 | +0.050 ± 0.030 | 185 |"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    replaced = refresh.replace_block(readme, "NEW TABLE")
    assert "NEW TABLE" in replaced and refresh.replace_block(replaced, "NEW TABLE") == replaced
    assert replaced.split(refresh.START)[1].split(refresh.END)[0] == "\nNEW TABLE\n"
    with pytest.raises(ValueError, match="markers"):
        refresh.replace_block("no markers here", "x")
