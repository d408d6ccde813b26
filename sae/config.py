"""Config files for every command: `sae COMMAND --config FILE` and `--print-config`.

A config file is YAML or JSON: a mapping whose keys are the command's options, spelt with dashes or
underscores (`d-sae`, `d_sae`, `l1_coefficient`), values as on the command line (a list is joined with
commas: `layers: [3, 6]`; a mapping or a list of mappings is passed as JSON text, e.g. sweep's `grid`).
An optional `command:` key names the command the file is for. A run's own RUN/config.json is also a
config for `sae train`: its variant, knobs, width, layer, store (or model) and training options come back
as the options that made it, so `sae train --config RUN/config.json --out NEW` trains the same SAE.

The file is turned into command-line tokens placed BEFORE the user's own, so argparse's "the last
occurrence wins" makes the command line override the file, and every value goes through the option's
own type and checks. The command line's choice in a mutually exclusive group (e.g. --d-sae against the
file's expansion) drops the file's other member of that group.
"""
from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

from sae.errors import UserError

CONFIG_OPTIONS = ("config", "print_config")     # the options this module adds to every command
_SKIPPED = {"help", "command", "_run"} | set(CONFIG_OPTIONS)


def add_config_arguments(parser) -> None:
    """--config FILE and --print-config, added to every command by sae.cli.build_parser."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read options from a YAML or JSON file (keys: option names, dashes or underscores; "
                             "flags given on the command line override it)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (the file, then the flags) as YAML and exit")


def read_file(path) -> dict:
    """The mapping in a YAML or JSON config file; a missing or malformed file is refused in one line."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got a {type(data).__name__}")
    return data


def key_of(action) -> str:
    """The config key of an argparse action: its first long option without dashes, underscored; a positional's dest."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs[0][2:] if longs else action.dest).replace("-", "_")


def key_table(parser) -> dict[str, argparse.Action]:
    """Every key the command accepts (each long option's spelling, and each dest) -> its action."""
    prepare = getattr(parser, "_sae_add_lazy_arguments", None)
    if prepare is not None:         # options added only when parsed (train's variant knobs)
        prepare()
    table = {}
    for action in parser._actions:
        if action.dest in _SKIPPED or isinstance(action, argparse._VersionAction):
            continue
        for spelling in [s for s in action.option_strings if s.startswith("--")] + [action.dest]:
            table.setdefault(spelling.lstrip("-").replace("-", "_"), action)
    return table


# ---- a run's config.json back to `sae train` options ------------------------------------------------
_RUN_SKIPPED = {"d_in", "version", "git_commit", "commit", "store_digest", "tau", "threshold", "firing_threshold",
                "model_dtype", "store_dtype", "live", "run_name", "sweep", "format", "name", "architecture",
                "complete", "steps", "world_size", "sharded_latents", "total_steps", "init_rows", "autocast",
                "beta1", "beta2", "eps", "revive_every", "created", "digest", "manifest_digest"}
_RUN_RENAMED = {"store": "activations", "cpu_bf16": "bf16", "context_size": "context_size"}


def is_run_config(data: dict) -> bool:
    return isinstance(data.get("training"), dict) and "variant" in data and "d_sae" in data


def from_run_config(data: dict, table: dict) -> dict:
    """The `sae train` options that reproduce the run described by a RUN/config.json."""
    out = {"variant": data["variant"], "d_sae": data["d_sae"]}
    if data.get("store"):
        out["activations"] = data["store"]
        if data.get("layer") is not None:
            out["layer"] = data["layer"]
    elif data.get("live") or data.get("model"):
        out.update({"model": data.get("model"), "dataset": data.get("dataset"), "site": data.get("site"),
                    "target_site": data.get("target_site")})       # a live transcoder's target (None: dropped)
        if data.get("layer") is not None:
            out["layers"] = data["layer"]
        if data.get("context_size"):
            out["context_size"] = data["context_size"]
    for name, value in (data.get("knobs") or {}).items():
        out[name] = value
    for name in ("transcoder", "skip"):          # a transcoder run: the same kind of SAE again
        if data.get(name) and name in table:
            out[name] = True
    for name, value in data["training"].items():
        name = _RUN_RENAMED.get(name, name)
        if name in _RUN_SKIPPED or name == "device" or value is None or name not in table:
            continue
        out[name] = value
    if data["variant"] == "vq":          # the codebook size is d_sae
        out.pop("codebook_size", None)
    return {k: v for k, v in out.items() if v is not None}


# ---- refusing what does not belong -----------------------------------------------------------------
def check_keys(command: str, config: dict, table: dict, others: dict[str, dict]) -> None:
    """Refuse a config for another command, and a key no command knows (naming the close matches)."""
    named = config.get("command")
    if named is not None and str(named) != command:
        raise UserError(f"--config: this file is for `sae {named}`, not `sae {command}` (its command: key says so)")
    unknown = [str(raw) for raw in config if raw != "command" and str(raw).replace("-", "_") not in table]
    if not unknown:
        return
    keys = {key.replace("-", "_") for key in unknown}
    owners = sorted(name for name, known in others.items() if keys <= set(known))
    mine = len(config) - len(unknown) - ("command" in config)
    if owners and len(unknown) >= mine:     # mostly another command's options: a config for that one
        raise UserError(f"--config: this looks like a config for `sae {' / sae '.join(owners)}`, not `sae {command}` "
                        f"({', '.join(unknown[:3])} {'is not an option' if len(unknown) == 1 else 'are not options'}"
                        f" of `sae {command}`)")
    for raw in unknown:
        key = raw.replace("-", "_")
        takers = sorted(name for name, known in others.items() if key in known)
        close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.6)
        if takers and not close:
            raise UserError(f"--config: {raw!r} is an option of `sae {' / sae '.join(takers)}`, not of "
                            f"`sae {command}`: is this a config for another command?")
        raise UserError(f"--config: unknown key {raw!r} for `sae {command}`"
                        + (f" (did you mean: {', '.join(close)}?)" if close else f" (see sae {command} --help)"))


# ---- the file as command-line tokens ---------------------------------------------------------------
def _text(value) -> str:
    """A config value as the one command-line token its option parses."""
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list))
                                                                            for v in value)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_tokens(config: dict, table: dict, given: set[str], parser) -> tuple[list[str], dict]:
    """(option tokens, positional defaults) for the config's keys. Keys whose option the command line gives
    (`given`: dests) or whose mutually exclusive partner it gives are left out: the command line wins."""
    excluded = set(given)
    for group in parser._mutually_exclusive_groups:
        dests = {a.dest for a in group._group_actions}
        if dests & given:
            excluded |= dests
    tokens, positionals = [], {}
    for raw, value in config.items():
        if raw == "command" or value is None:
            continue
        action = table[str(raw).replace("-", "_")]
        if action.dest in excluded:
            continue
        if not action.option_strings:
            positionals[action.dest] = value
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction)) and action.nargs == 0:
            if value is True or str(value).lower() in ("1", "true", "yes", "on"):
                tokens.append(flag)
            elif not (value is False or str(value).lower() in ("0", "false", "no", "off")):
                raise UserError(f"--config: {raw} is a switch: give true or false, not {value!r}")
            continue
        if isinstance(action, argparse._StoreFalseAction):
            if value is False:
                tokens.append(flag)
            continue
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):    # several values: one token each
            tokens += [flag, *(_text(v) for v in (value if isinstance(value, (list, tuple)) else [value]))]
        else:
            tokens += [flag, _text(value)]
    return tokens, positionals


def given_dests(parser, argv: list[str]) -> set[str]:
    """The dests of the options written on the command line (long, short and --opt=value forms)."""
    by_flag = {s: a.dest for a in parser._actions for s in a.option_strings}
    found = set()
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag in by_flag:
            found.add(by_flag[flag])
        elif flag.startswith("--"):
            matches = [f for f in by_flag if f.startswith(flag)]     # argparse's unambiguous abbreviations
            if len(matches) == 1:
                found.add(by_flag[matches[0]])
    return found


def config_path(argv: list[str]) -> str | None:
    """The FILE of --config FILE / --config=FILE in the command's arguments (the last one), or None."""
    path = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    return path


def prepare(parser, command: str, argv: list[str], others: dict[str, dict]) -> list[str]:
    """The command's arguments with the config file's tokens put first (positional values become defaults).
    `parser` is the command's subparser; argv the arguments after the command name."""
    path = config_path(argv)
    if path is None:
        return argv
    config = read_file(path)
    table = key_table(parser)
    if command == "train" and is_run_config(config):
        config = from_run_config(config, table)
    check_keys(command, config, table, others)
    tokens, positionals = to_tokens(config, table, given_dests(parser, argv), parser)
    for action in parser._actions:
        if action.dest in positionals:
            value = positionals[action.dest]
            if action.nargs in ("+", "*"):      # RUN…: a list in the file; the command line's, when given, wins
                action.default, action.nargs = list(value) if isinstance(value, (list, tuple)) else [value], "*"
            else:
                action.default, action.nargs = value, "?"
            action.required = False
    return tokens + argv


# ---- --print-config ---------------------------------------------------------------------------------
def effective(parser, command: str, args) -> dict:
    """The parsed options as a config mapping (keys as --config takes them), `command` first."""
    result = {"command": command}
    seen = set()
    for action in parser._actions:
        if action.dest in _SKIPPED or action.dest in seen or action.dest == argparse.SUPPRESS \
                or not hasattr(args, action.dest):
            continue
        seen.add(action.dest)            # two spellings of one option (--batch-rows, --batch-size): the first
        value = getattr(args, action.dest)
        result[key_of(action)] = value
    return result


def dump(config: dict, as_json: bool = False) -> str:
    import yaml
    if as_json:
        return json.dumps(config, indent=2, default=str)
    return yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False)
