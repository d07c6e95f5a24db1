"""
nanoGPT-style configuration for a dataclass of settings: defaults in the dataclass, then config files
(python files that assign settings), then --key=value overrides, applied left to right.

  python train.py config/train_mobilellm_125m.py --batch_size=32 --compile=True
  python train.py --batch_size 32                      # --key value works too, as in the argparse scripts

An unknown key or a value of the wrong type is an error that names it, never a silent default.
-h or --help prints the script's docstring and every setting with its default and the comment beside it in the
source (exit_if_help).
Also here, for the argparse scripts: HelpFormatter (defaults in --help), at_least (an integer option's lower
bound) and accept_old_flags (renamed flags keep working).
"""
import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import os
import sys
import textwrap
import tokenize
import traceback
import types
import typing


BOOL_WORDS = {"true": True, "false": False}     # a bool setting's value, in any case


class ConfigError(ValueError):
    """A config file or --key=value override that does not fit the settings."""


def _field_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(key, value, annotation):
    """Return value converted to the field's type (int -> float is allowed), or raise ConfigError."""
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (bool, str) and type(value) is kind:
            return value
    names = " or ".join("None" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r} ({type(value).__name__})")


def parse_value(text):
    """--key=value: a python literal (3, 1e-3, True, None, 'x'), else the bare text as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _read_config_file(path):
    """The settings a config file assigns: every top-level name not starting with '_', except modules,
    functions and classes (which it may import or define). A file that does not run is one ConfigError
    naming its line."""
    namespace = {"__file__": str(path)}    # lets a config file build on another: exec(open(...).read())
    try:
        source = open(path).read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        exec(compile(source, path, "exec"), namespace)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}") from e
    except Exception as e:                # a config file is Python: NameError, ImportError, ... in its code
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == str(path)]
        raise ConfigError(f"config file {path}, line {lines[-1] if lines else '?'}: {type(e).__name__}: {e}") from e
    code = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, code)}


def apply_settings(config, settings, source):
    """A copy of the dataclass instance config with settings (a dict) applied and type-checked."""
    types_by_name = _field_types(type(config))
    unknown = sorted(set(settings) - set(types_by_name))
    if unknown:
        close = {k: difflib.get_close_matches(k, types_by_name, n=1) for k in unknown}
        hints = [f"{k!r} (did you mean {close[k][0]!r}?)" if close[k] else repr(k) for k in unknown]
        raise ConfigError(f"unknown config key(s) {', '.join(hints)} in {source}; "
                          f"known keys: {', '.join(types_by_name)}")
    checked = {k: _check_type(k, v, types_by_name[k]) for k, v in settings.items()}
    return dataclasses.replace(config, **checked)


def _joined(argv, bool_keys=()):
    """argv with every `--key value` pair written as `--key=value`, and a bool key on its own (`--compile`)
    as `--key=True`."""
    out, args = [], list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--") and "=" not in arg:
            if arg[2:] in bool_keys and (not args or args[0].lower() not in BOOL_WORDS):
                args.insert(0, "True")
            if not args or args[0].startswith("--"):
                raise ConfigError(f"override {arg!r} must look like --key=value (or --key value)")
            arg = f"{arg}={args.pop(0)}"
        out.append(arg)
    return out


def configure(config, argv):
    """Apply command-line arguments (config file paths, --key=value and --key value) to a dataclass instance."""
    return configure_and_report(config, argv)[0]


def configure_and_report(config, argv):
    """configure(), also returning the set of keys that the config files and overrides assigned: what
    the user chose, as opposed to what was left at its default."""
    applied, types_by_name = set(), _field_types(type(config))
    for arg in _joined(argv, [key for key, kind in types_by_name.items() if kind is bool]):
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            value = parse_value(text)
            if types_by_name.get(key) is str and not isinstance(value, str):
                value = text                     # --out_dir=2024 is the folder "2024", not an int
            if types_by_name.get(key) is bool and text.lower() in BOOL_WORDS:
                value = BOOL_WORDS[text.lower()]     # --compile=true, as other tools spell it
            settings, source = {key: value}, f"override {arg!r}"
        else:
            settings, source = _read_config_file(arg), f"config file {arg}"
        config = apply_settings(config, settings, source)
        applied |= settings.keys()
    return config, applied


def field_comments(cls):
    """{field: the comment beside it in cls's source}, a comment that goes on in the comment-only lines
    below it (indented past the fields, unlike a section heading) joined into one line. What --help says
    about each setting."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):                     # no source (e.g. a class made in an interpreter)
        return {}
    body = [node for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)]
    fields, indent = {node.lineno: node.target.id for node in body}, body[0].col_offset if body else 0
    lines, comments, last = source.splitlines(), {}, None      # last: (field, row) of the latest comment line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        (row, column), text = tok.start, tok.string.lstrip("#").strip()
        if row in fields:
            comments[fields[row]], last = text, (fields[row], row)
        elif last and row == last[1] + 1 and column > indent and not lines[row - 1][:column].strip():
            comments[last[0]] += " " + text                   # a comment-only line indented past the fields
            last = (last[0], row)
        else:
            last = None                                       # e.g. a section heading "# system"
    return comments


def exit_if_help(argv, doc, config, more_comments=()):
    """With -h or --help in argv: print doc (the script's usage) and every setting of the dataclass
    instance config with its default and its comment in the source (or in a dataclass it extends), then
    exit. more_comments: other dataclasses whose comments describe settings that have none of their own
    (TrainConfig's model fields: ModelConfig)."""
    if {"-h", "--help"} & set(argv):
        comments = {}
        for cls in (*more_comments, *reversed(type(config).__mro__)):     # a subclass's own comments last
            if dataclasses.is_dataclass(cls):
                comments.update(field_comments(cls))
        given, values = [arg for arg in argv if arg not in ("-h", "--help")], "their defaults"
        if given:                                   # `train.py config/x.py --help`: the values that run would take
            try:
                config, values = configure(config, given), "as the config files and overrides given set them"
            except ConfigError:
                pass                                # a bad one is said when the script runs without --help
        lines = [doc.strip() + f"\n\nSettings (--key=value), {values}, and what they are:"]
        for key, value in dataclasses.asdict(config).items():
            setting = f"  --{key}={value!r}"
            comment = comments.get(key, "")
            lines.append(setting if not comment else textwrap.fill(
                comment, width=max(100, len(setting) + 40), initial_indent=f"{setting:<38}",
                subsequent_indent=" " * 38))
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:                         # `train.py --help | head`: the reader has gone
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit()


def usage_description(doc):
    """A script's docstring as its --help shows it: the paragraphs up to the one of example command lines
    (`  python ...`), without the notes after them."""
    paragraphs = doc.strip("\n").split("\n\n")
    for i, paragraph in enumerate(paragraphs):
        if "\n  python " in "\n" + paragraph:
            return "\n\n".join(paragraphs[:i + 1])
    return doc


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of the argparse scripts: the usage docstring as written, and each option's default after its
    help, as train.py's --help lists every setting's. Not for flags, nor for None, 0 and blank strings: those
    mean "off" or "decided when run", which the option's help says.
    Reaches into argparse's internals: argparse documents only its formatter classes' names as public, and
    _get_help_string is the method its own ArgumentDefaultsHelpFormatter overrides to do the same (checked on
    Python 3.11). If it changes, --help lines lose their "(default: ...)", which tests/test_configurator.py
    checks; nothing else depends on it."""

    def _get_help_string(self, action):
        if action.default in (None, False, 0, argparse.SUPPRESS) or not str(action.default).strip() \
                or "%(default)" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


def at_least(minimum):
    """An argparse type: an integer >= minimum (a count of tokens, runs, threads; 0 where it means "none"
    or "the default"), so that a bad count is a usage error naming the option, not a traceback later."""
    def integer(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    integer.__name__ = "integer"                     # argparse: "invalid integer value: 'abc'"
    return integer


def accept_old_flags(argv, renamed):
    """argv (None: sys.argv[1:]) with the old spellings of renamed flags replaced by the new ones, in both
    `--old=value` and `--old value` forms, so old command lines keep working while --help shows only the
    new names. renamed: {"--old-name": "--new_name"}."""
    argv = sys.argv[1:] if argv is None else argv
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(renamed.get(flag, flag) + eq + value)
    return out
