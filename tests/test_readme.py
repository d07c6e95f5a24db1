"""
The README and docs/ stay true to the code.

Every `python X.py ...` (and `torchrun ... X.py ...`) line in a ```bash block of README.md or docs/*.md
must name a script that exists and use only flags that script accepts, spelled --key=value for flags
that take a value. The accepted flags are read from the scripts themselves, all in one subprocess: for
argparse scripts the parser they build (intercepted at parse time, so nothing runs), for configurator
scripts (train.py, bench_train.py) the fields of the dataclass they configure. Config files passed to
configurator scripts must exist, and where argparse declares choices (--dtype), the values must be
among them. Links from README.md and docs/ to files of the repository must point at files that exist.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
CONTROL = {"&&", "||", ";", "|", "&", "(", ")"}
PYTHONS = {"python", "python3"}

# Run in a subprocess with the scripts as arguments: prints {script: flags} as JSON, where flags is
# {"--flag": {"takes_value": bool, "choices": [...] or None}}, "positional": how many positionals the
# parser takes (None: config files, as configurator reads them), or {"error": "..."}.
PROBE = r"""
import argparse, dataclasses, json, runpy, sys
sys.path.insert(0, sys.argv[1])
import configurator

class Got(BaseException):
    pass

def from_parser(self, args=None, namespace=None):
    flags = {}
    for action in self._actions:
        for option in action.option_strings:
            flags[option] = {"takes_value": action.nargs != 0,
                             "choices": None if action.choices is None else [str(c) for c in action.choices]}
    raise Got({"flags": flags, "positional": sum(1 for a in self._actions if not a.option_strings)})

def from_dataclass(config, argv):
    flags = {"--" + f.name: {"takes_value": True, "choices": None} for f in dataclasses.fields(config)}
    flags["--help"] = {"takes_value": False, "choices": None}     # train.py --help lists the settings
    raise Got({"flags": flags, "positional": None})

argparse.ArgumentParser.parse_known_args = from_parser
configurator.configure = configurator.configure_and_report = from_dataclass
found = {}
for script in sys.argv[2:]:
    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
        found[script] = {"error": "reads no command-line flags"}
    except Got as got:
        found[script] = got.args[0]
    except BaseException as e:
        found[script] = {"error": f"{type(e).__name__}: {e}"}
print("PROBE" + json.dumps(found))
"""


def bash_blocks(text):
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def split_commands(block):
    """Each simple command of a bash block as a token list (continuations joined, comments dropped)."""
    pending = ""
    for line in block.replace("\\\n", " ").splitlines():
        pending += line
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:                      # a quote spans lines (python -c "..."): read on
            pending += "\n"
            continue
        pending, command = "", []
        for token in tokens:
            if token in CONTROL:
                yield command
                command = []
            else:
                command.append(token)
        yield command


def script_call(tokens):
    """(script, arguments) of a python or torchrun command, else None (python -c / -m, other tools)."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):    # VAR=value python ...
        tokens = tokens[1:]
    if tokens and tokens[0] == "nice":
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] in PYTHONS:
        if len(tokens) < 2 or tokens[1].startswith("-"):
            return None
        return tokens[1], tokens[2:]
    if tokens[0] == "torchrun":
        for i, token in enumerate(tokens):
            if token.endswith(".py"):
                return token, tokens[i + 1:]
    return None


def readme_calls():
    calls = []
    for page in PAGES:
        for block in bash_blocks(page.read_text()):
            for tokens in split_commands(block):
                call = script_call(tokens)
                if call:
                    calls.append((page.relative_to(ROOT).as_posix(), " ".join(tokens), *call))
    return calls


CALLS = readme_calls()
FORWARDS_TO = {"experiments/quickstart_vs_nanogpt.py": "train.py"}   # flags it does not take go to that script


@pytest.fixture(scope="module")
def accepted():
    scripts = sorted({script for _, _, script, args in CALLS if args and (ROOT / script).is_file()})
    result = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), *scripts], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE")]
    assert lines, f"the flag probe failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return json.loads(lines[-1][len("PROBE"):])


def test_the_pages_have_commands():
    assert (ROOT / "README.md").is_file()
    assert any(page == "README.md" for page, *_ in CALLS), "no python command found in README.md's bash blocks"


@pytest.mark.parametrize("page,command,script,args", CALLS, ids=[f"{c[0]}: {c[1][:90]}" for c in CALLS])
def test_command_matches_its_script(page, command, script, args, accepted):
    assert (ROOT / script).is_file(), f"{page}: `{command}`: there is no {script}"
    if not args:
        return
    info = accepted[script]
    assert "error" not in info, f"{page}: `{command}`: could not read {script}'s flags: {info['error']}"
    flags, positional = info["flags"], info["positional"]
    bare = []
    for arg in args:
        if not arg.startswith("--"):
            bare.append(arg)
            continue
        name, has_value, value = arg.partition("=")
        owner, known = script, flags
        if name not in flags and script in FORWARDS_TO:
            owner = FORWARDS_TO[script]
            known = accepted[owner]["flags"]
        assert name in known, (f"{page}: `{command}`: {owner} has no {name} "
                               f"(it takes {', '.join(sorted(known))})")
        spec = known[name]
        if spec["takes_value"]:
            assert has_value, f"{page}: `{command}`: write {name}=VALUE (one spelling: --key=value)"
            if spec["choices"] is not None:
                assert value in spec["choices"], (f"{page}: `{command}`: {name}={value} is not one of "
                                                  f"{spec['choices']}")
        else:
            assert not has_value, f"{page}: `{command}`: {name} is an on/off switch, it takes no value"
    if positional is None:                       # configurator: bare arguments are config files
        for path in bare:
            assert (ROOT / path).is_file(), f"{page}: `{command}`: there is no config file {path}"
    else:
        assert len(bare) <= positional, (f"{page}: `{command}`: {script} takes {positional} positional "
                                         f"argument(s), got {bare}")


def links(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            yield target.split("#")[0]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_links_point_at_files_that_exist(page):
    missing = [t for t in links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t).resolve() for t in links(ROOT / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
