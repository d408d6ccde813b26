"""Config files for every command (`--config FILE`, `--print-config`), a run's config.json reproducing the run,
the sweep's grid file, and the one-line refusals of a bad config."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sae.cli import COMMANDS, _subparsers, build_parser, main
from sae.store import from_tensors
from tiny_variants import synthetic

SMALL = ["--tokens", "1024", "--batch-size", "128", "--eval-rows", "256", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return from_tensors(tmp_path_factory.mktemp("cfg") / "store", synthetic(n=3000, d_in=16), layer=4,
                        model="synthetic", site="resid_post")


def cli(*argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    return done.value.code, err.getvalue(), out.getvalue()


def test_every_command_takes_config_and_print_config():
    commands = _subparsers(build_parser())
    assert set(COMMANDS) <= set(commands)
    for name, parser in commands.items():
        flags = {s for action in parser._actions for s in action.option_strings}
        assert {"--config", "--print-config"} <= flags, name


def test_the_command_line_overrides_the_file_and_print_config_round_trips(store, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"command": "train", "activations": str(store.path), "variant": "topk",
                                      "k": 4, "d-sae": 32, "lr": 0.001, "tokens": 2048, "out": str(tmp_path / "r"),
                                      "bf16": False, "keep_special_tokens": True}))
    status, err, out = cli("train", "--config", config, "--lr", "0.003", "--print-config")
    assert status == 0, err
    printed = yaml.safe_load(out)
    assert printed["command"] == "train" and printed["variant"] == "topk" and printed["k"] == 4
    assert printed["d_sae"] == 32 and printed["tokens"] == 2048 and printed["keep_special_tokens"] is True
    assert printed["lr"] == 0.003                     # the flag wins over the file's 0.001
    assert printed["bf16"] is None and printed["seed"] == 0
    assert not (tmp_path / "r").exists()              # --print-config does no work
    again = tmp_path / "printed.yaml"
    again.write_text(out)
    status, _, out_again = cli("train", "--config", again, "--print-config")
    assert status == 0 and yaml.safe_load(out_again) == printed
    # a mutually exclusive option given on the command line drops the file's partner (--expansion vs d_sae)
    status, err, out = cli("train", "--config", config, "--expansion", "4", "--print-config")
    assert status == 0, err
    assert yaml.safe_load(out)["expansion"] == 4.0 and yaml.safe_load(out)["d_sae"] is None


def test_json_config_with_positionals(tmp_path):
    config = tmp_path / "export.json"
    config.write_text(json.dumps({"run": "some/run", "format": "saelens", "out": "some/out", "force": True}))
    status, err, out = cli("export", "--config", config, "--print-config")
    assert status == 0, err
    printed = json.loads(out)                       # a .json config prints JSON
    assert printed == {"command": "export", "run": "some/run", "format": "saelens", "out": "some/out",
                       "allow_incomplete": False, "force": True}
    status, err, out = cli("export", "--config", config, "other/run", "--print-config")
    assert status == 0 and json.loads(out)["run"] == "other/run"
    dashboard = tmp_path / "dashboard.yaml"
    dashboard.write_text("runs: [a, b]\nport: 9000\n")
    status, err, out = cli("dashboard", "--config", dashboard, "--print-config")
    assert status == 0 and yaml.safe_load(out)["runs"] == ["a", "b"] and yaml.safe_load(out)["port"] == 9000
    status, err, out = cli("dashboard", "c", "--config", dashboard, "--print-config")
    assert status == 0 and yaml.safe_load(out)["runs"] == ["c"]


def test_a_runs_config_json_reproduces_the_run(store, tmp_path):
    first = tmp_path / "first"
    status, err, _ = cli("train", "--activations", store.path, "--variant", "jumprelu", "--d-sae", "24", "--seed", "7",
                         "--lr-warmup", "0.1", "--noise-std", "0.05", "--out", first, *SMALL)
    assert status == 0, err
    status, err, _ = cli("train", "--config", first / "config.json", "--out", tmp_path / "second")
    assert status == 0, err
    a, b = load_file(str(first / "sae.safetensors")), load_file(str(tmp_path / "second" / "sae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one, two = (json.loads((p / "config.json").read_text()) for p in (first, tmp_path / "second"))
    assert one["knobs"] == two["knobs"] and one["training"]["seed"] == two["training"]["seed"] == 7
    # a different seed on the command line makes a different SAE: the comparison above can fail
    status, err, _ = cli("train", "--config", first / "config.json", "--out", tmp_path / "third", "--seed", "8")
    assert status == 0, err
    c = load_file(str(tmp_path / "third" / "sae.safetensors"))
    assert not torch.equal(a["W_enc"], c["W_enc"])


def test_bad_configs_are_refused_in_one_line(tmp_path):
    cases = [({"variant": "topk", "lrr": 0.1}, "train", "unknown key 'lrr' for `sae train` (did you mean: lr"),
             ({"command": "collect", "model": "x"}, "train", "this file is for `sae collect`, not `sae train`"),
             ({"top_k": 5, "run": "r"}, "train", "this looks like a config for `sae analyze`, not `sae train` "
                                                 "(run, top_k are not options of `sae train`)"),
             ({"variant": "relu", "top_k": 5, "lr": 3}, "train", "'top_k' is an option of `sae analyze`, not of"),
             ({"bf16": "maybe", "variant": "relu"}, "train", "bf16 is a switch: give true or false"),
             ({"expansion": "wide", "activations": "s", "out": "o"}, "sweep", "--expansion: invalid float value")]
    for number, (content, command, message) in enumerate(cases):
        path = tmp_path / f"bad{number}.yaml"
        path.write_text(yaml.safe_dump(content))
        status, err, _ = cli(command, "--config", path)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (content, err)
    (tmp_path / "broken.yaml").write_text("variant: [unclosed\n")
    status, err, _ = cli("train", "--config", tmp_path / "broken.yaml")
    assert status == 2 and "not valid YAML" in err
    status, err, _ = cli("train", "--config", tmp_path / "missing.yaml")
    assert status == 2 and "no such file" in err


def test_grid_entries_set_their_own_width_and_learning_rate(store, tmp_path):
    from sae.evaluate.grid import read_grid
    points = read_grid('[{"variant": "topk", "k": [4, 8], "expansion": 2}, {"variant": "l1", "d_sae": 24, '
                       '"lr": 0.002, "name": "mine"}]')
    assert [(p.name, p.knobs, p.expansion, p.d_sae, p.lr) for p in points] == [
        ("topk_k4_x2", {"k": 4}, 2.0, None, None), ("topk_k8_x2", {"k": 8}, 2.0, None, None),
        ("mine", {}, None, 24, 0.002)]
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"activations": str(store.path), "out": str(tmp_path / "sw"), "tokens": 512,
                                      "batch_size": 128, "no_model": True, "device": "cpu",
                                      "grid": [{"variant": "topk", "k": 4, "d_sae": 20, "lr": 0.004},
                                               {"variant": "relu", "expansion": 1.5}]}))
    status, err, _ = cli("sweep", "--config", config)
    assert status == 0, err
    topk = json.loads((tmp_path / "sw" / "topk_k4_d20_lr0.004" / "config.json").read_text())
    relu = json.loads((tmp_path / "sw" / "relu_x1.5" / "config.json").read_text())
    assert (topk["d_sae"], topk["training"]["lr"]) == (20, 0.004) and relu["d_sae"] == 24
    (tmp_path / "bad.yaml").write_text("- {variant: topk, kk: 3}\n")
    status, err, _ = cli("sweep", "--activations", store.path, "--out", tmp_path / "x", "--grid", tmp_path / "bad.yaml")
    assert status == 2 and "has no knob 'kk' (did you mean: k" in err


def test_batch_options_say_what_they_count_and_the_old_spelling_still_works(tmp_path):
    status, err, out = cli("analyze", "--run", "r", "--activations", "s", "--batch-size", "512", "--print-config")
    assert status == 0 and err.strip() == ("notice: --batch-size is spelt --batch-rows in `sae analyze` "
                                           "(it counts activation rows)")
    assert yaml.safe_load(out)["batch_rows"] == 512 and "batch_size" not in yaml.safe_load(out)
    status, err, out = cli("collect", "--layers", "1", "--out", tmp_path / "s", "--batch-windows", "3",
                           "--print-config")
    assert status == 0 and err == "" and yaml.safe_load(out)["batch_windows"] == 3
    status, err, out = cli("train", "--variant", "relu", "--out", "o", "--device", "cuda:1", "--print-config")
    assert status == 0 and yaml.safe_load(out)["device"] == "cuda:1"
    status, err, _ = cli("train", "--variant", "relu", "--out", "o", "--device", "gpu7")
    assert status == 2 and "'gpu7' is not a torch device" in err
    from sae.devices import resolve
    from sae.errors import UserError
    with pytest.raises(UserError, match="no mps device is available"):
        if not torch.backends.mps.is_available():
            resolve("mps")
        else:
            raise UserError("no mps device is available (skipped: this machine has one)")


def test_shell_completion_completes_commands_and_variant_knobs(tmp_path):
    import os
    import subprocess
    import sys
    status, _, out = cli("--completion", "bash")
    assert status == 0 and "complete" in out and "sae" in out
    answers = {}
    for line in ("sae tr", "sae train --l1-co"):
        target = tmp_path / "answer"
        env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
               "_ARGCOMPLETE_STDOUT_FILENAME": str(target), "_ARGCOMPLETE_IFS": "\n"}
        subprocess.run([sys.executable, "-m", "sae"], env=env, check=True, timeout=120)
        answers[line] = target.read_text().split()
    assert answers == {"sae tr": ["train"], "sae train --l1-co": ["--l1-coefficient"]}
