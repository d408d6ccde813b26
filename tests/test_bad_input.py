"""Every command, fed what a careless or unlucky user feeds it, refuses in one line and changes nothing.

One table of cases, one line each: bad option values for every command, corrupted stores and run folders,
mismatched run/store pairs, unfinished work, outputs that would overwrite inputs. Each case runs through the
CLI in this process and is classified the way the data-safety issue counted them:

    refused     exit 2, exactly one stderr line starting "error: ", no traceback
    traceback   an exception escaped, or a traceback was printed
    wrong       exit 0 where the input is bad (a silently wrong result)
    lost        a file of the project (store, run, analysis) changed or disappeared
    hang        no answer within the time limit
    unclear     another exit status, or more than one line (notices and warnings aside)

The test asserts "refused" for each case. `python tests/test_bad_input.py` prints the counts per category
(the table quoted in the data-safety notes)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_safety import RUN_DAMAGE, STORE_DAMAGE, _edit_json, digest  # noqa: E402

TIME_LIMIT_S = 120

# placeholders in a case's argv: P the project (store, run), M a tiny Llama folder, C a text corpus,
# O a fresh output path outside the project, F an existing plain file outside the project
TRAIN = ["train", "--activations", "P/store", "--variant", "topk", "--k", 4, "--d-sae", 32, "--tokens", 1024,
         "--batch-size", 256, "--out", "O", "--device", "cpu"]
COLLECT = ["collect", "--model", "M", "--dataset", "C", "--layers", 0, "--context-size", 16, "--tokens", 64,
           "--out", "O"]
EVAL = ["eval", "--run", "P/run", "--activations", "P/store", "--no-model"]
ANALYZE = ["analyze", "--run", "P/run", "--activations", "P/store", "--no-model", "--out", "O"]
SWEEP = ["sweep", "--activations", "P/store", "--out", "O", "--no-model", "--tokens", 1024, "--variants", "topk"]
EXPORT = ["export", "P/run", "--format", "saelens", "O"]


def setting(base: list, option: str, value=None) -> list:
    """base with option set to value (replaced where base has it, appended otherwise; a flag when value is None)."""
    argv = list(base)
    if option in argv:
        at = argv.index(option)
        if value is None:
            return argv
        argv[at + 1] = value
        return argv
    return argv + ([option] if value is None else [option, value])


def bad_values(base: list, option: str, *values) -> list[tuple]:
    return [(f"{base[0]} {option} {value}", setting(base, option, value), None) for value in values]


CASES: list[tuple] = []          # (name, argv, damage: None or (what, callable) applied to a copy of the project)

# ---- bad option values -------------------------------------------------------------------------------------
for option, values in {
        "--tokens": (0, -5, "abc", "nan"), "--batch-size": (0, -1, "abc"), "--lr": (0, -1, "nan", "inf", "abc"),
        "--k": (0, -1, 33, "abc"), "--d-sae": (0, -3, "abc", 2_000_000_000_000), "--expansion": (0, -1, "nan"),
        "--checkpoint-every": (-1,), "--keep-checkpoints": (-1,), "--log-every": (0, -1),
        "--dead-after-tokens": (-1,), "--lr-warmup": (-0.1, 1.5, "nan"), "--lr-decay": (-0.1, 1.5),
        "--sparsity-warmup": (-1, 2), "--grad-clip": (0, -1, "nan"), "--eval-rows": (-1,),
        "--noise-std": (-1, "nan"), "--mask-prob": (-0.1, 1.5), "--variant": ("bogus",), "--layer": (5, "abc"),
        "--seed": ("abc",), "--device": ("tpu9",), "--activations": ("P/missing", "F", "P/run"),
        "--out": ("F", "P/store"), "--auxk-coefficient": (-1,)}.items():
    CASES += bad_values(TRAIN, option, *values)
CASES += [
    ("train a knob of another variant", setting(TRAIN, "--l1-coefficient", 0.1), None),
    ("train l1 with a negative coefficient", setting(setting(TRAIN, "--variant", "l1"), "--l1-coefficient", -1),
     None),
    ("train --resume --force", setting(setting(TRAIN, "--resume"), "--force"), None),
    ("train over the run without --force", setting(TRAIN, "--out", "P/run"), None),
    ("train over the store with --force", setting(setting(TRAIN, "--out", "P/store"), "--force"), None),
    ("train over the project with --force", setting(setting(TRAIN, "--out", "P"), "--force"), None),
    ("train live --model-batch 0", ["train", "--model", "M", "--dataset", "C", "--layers", 0, "--variant", "topk",
                                    "--out", "O", "--model-batch", 0], None),
    ("train live with a layer the model lacks", ["train", "--model", "M", "--dataset", "C", "--layers", 99,
                                                 "--variant", "topk", "--out", "O"], None),
    ("train live with a store and a model", setting(TRAIN, "--model", "M"), None),
    ("train with neither store nor model", ["train", "--variant", "topk", "--out", "O"], None),
]
UNSIZED = TRAIN[:TRAIN.index("--k")] + TRAIN[TRAIN.index("--k") + 2:]   # TRAIN without topk's --k 4
CASES += [   # issue 22's knobs
    ("train jumprelu --target-l0 0", setting(setting(UNSIZED, "--variant", "jumprelu"), "--target-l0", 0), None),
    ("train jumprelu --target-l0 above d_sae", setting(setting(UNSIZED, "--variant", "jumprelu"), "--target-l0", 33),
     None),
    ("train vae --kl-warmup 1.5", setting(setting(UNSIZED, "--variant", "vae"), "--kl-warmup", 1.5), None),
    ("train vae --kl-warmup -0.1", setting(setting(UNSIZED, "--variant", "vae"), "--kl-warmup", -0.1), None),
    ("train l1 --init-from a topk run", setting(setting(UNSIZED, "--variant", "l1"), "--init-from", "P/run"), None),
    ("train --init-from a run of another d_in", setting(setting(TRAIN, "--activations", "P/store_d8"), "--init-from",
                                                        "P/run"), None),
    ("train --init-from a file", setting(TRAIN, "--init-from", "F"), None),
]

for option, values in {
        "--layers": (99, -1, "abc", ""), "--site": ("bogus",), "--context-size": (0, -1, 100000, "abc"),
        "--tokens": (0, -1, "abc"), "--shard-tokens": (0, -1), "--dtype": ("bogus",),
        "--dataset": ("P/missing.txt", "P/store"), "--model": ("P/missing_model", "F", "P/store"),
        "--batch-size": (0, -1), "--max-norm-ratio": (0, -1), "--model-dtype": ("bogus",), "--out": ("F",),
        "--device": ("tpu9",)}.items():
    CASES += bad_values(COLLECT, option, *values)
CASES += [
    ("collect over the run with --force", setting(setting(COLLECT, "--out", "P/run"), "--force"), None),
    ("collect over the store without --force", setting(COLLECT, "--out", "P/store"), None),
    ("collect --resume --force", setting(setting(COLLECT, "--resume"), "--force"), None),
    ("collect an empty dataset", setting(COLLECT, "--dataset", "E"), None),
]

for option, values in {
        "--run": ("P/missing", "F", "P/store"), "--activations": ("P/missing", "F", "P/run"), "--layer": (3, "abc"),
        "--batch-size": (0, -1), "--probe-rows": (-5,), "--windows": (-1,), "--lm-batch-size": (0,),
        "--device": ("tpu9",), "--seed": ("abc",)}.items():
    CASES += bad_values(EVAL, option, *values)

for option, values in {
        "--top-k": (0, -1), "--context": (-1,), "--bands": (0, -1), "--per-band": (-1,), "--reservoir": (-1,),
        "--nearest": (-1,), "--logits": (-1,), "--batch-size": (0, -1), "--out": ("F",), "--layer": (2,),
        "--run": ("P/missing", "F", "P/store"), "--activations": ("P/missing", "P/run")}.items():
    CASES += bad_values(ANALYZE, option, *values)
CASES += [
    (f"analyze --force into {where}", setting(setting(ANALYZE, "--out", where), "--force"), None)
    for where in ("P/store", "P/run", "P", "F")] + [
    ("analyze into an existing analysis without --force", setting(ANALYZE, "--out", "P/run/analysis"), None)]

for option, values in {
        "--lr": (0, -1, "nan"), "--batch-size": (0, -1), "--tokens": (0, -1), "--expansion": (0, -1),
        "--variants": ("bogus", "topk:k=abc", ""), "--out": ("F",), "--windows": (-1,), "--probe-rows": (-1,),
        "--layer": (3,), "--activations": ("P/missing", "P/run")}.items():
    CASES += bad_values(SWEEP, option, *values)
CASES += [("sweep --force into the store", setting(setting(SWEEP, "--out", "P/store"), "--force"), None),
          ("sweep --resume --force", setting(setting(SWEEP, "--resume"), "--force"), None)]

CASES += [
    ("export in a bogus format", setting(EXPORT, "--format", "bogus"), None),
    ("export a missing run", ["export", "P/missing", "--format", "saelens", "O"], None),
    ("export a store", ["export", "P/store", "--format", "saelens", "O"], None),
    ("export a file", ["export", "F", "--format", "saelens", "O"], None),
    ("export into the run", ["export", "P/run", "--format", "saelens", "P/run/exported"], None),
    ("export --force into the project", ["export", "P/run", "--format", "saelens", "P", "--force"], None),
    ("export --force into the store", ["export", "P/run", "--format", "sparsify", "P/store", "--force"], None),
    ("export html --force into the store", ["export", "P/run", "--format", "html", "P/store", "--force"], None),
    ("export over a file", ["export", "P/run", "--format", "saelens", "F"], None),
    ("dashboard on a file", ["dashboard", "F"], None),
    ("dashboard on a missing folder", ["dashboard", "P/missing"], None),
    ("dashboard on a store", ["dashboard", "P/store"], None),
    ("dashboard --port -1", ["dashboard", "P/run", "--port", -1], None),
    ("dashboard --port 70000", ["dashboard", "P/run", "--port", 70000], None),
    ("dashboard --port abc", ["dashboard", "P/run", "--port", "abc"], None),
    ("an unknown command", ["bogus"], None),
]

# ---- mismatched run/store pairs (the project holds stores that differ from the run's in one respect) ---------
for other in ("store_layer1", "store_d8", "store_other_model", "store_other_site"):
    CASES += [(f"eval on {other}", setting(EVAL, "--activations", f"P/{other}"), None),
              (f"analyze on {other}", setting(ANALYZE, "--activations", f"P/{other}"), None)]
CASES += [("eval --layer 1 on the layer-0 run", setting(setting(EVAL, "--activations", "P/store_layer1"),
                                                       "--layer", 1), None)]

# ---- damaged files we wrote ---------------------------------------------------------------------------------
def _unfinished_run(run: Path):
    _edit_json(run / "config.json", lambda c: c["training"].update(complete=False))


def _unfinished_store(store: Path):
    _edit_json(store / "manifest.json", lambda m: m.update(complete=False))


def _garbage_in_shard(store: Path):
    shard = store / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + size])["activations.0"]["data_offsets"]
    for at in range(8 + size + begin, 8 + size + end - 4096, 16384):
        data[at:at + 4096] = b"\xff" * 4096
    shard.write_bytes(bytes(data))


def _stale_weights(run: Path):
    from safetensors.torch import load_file, save_file
    weights = load_file(str(run / "sae.safetensors"))
    weights["W_dec"] = weights["W_dec"] * 2
    save_file(weights, str(run / "sae.safetensors"))


STORE_READERS = {"train": setting(TRAIN, "--out", "O"), "eval": EVAL, "analyze": ANALYZE,
                 "sweep": SWEEP}
RUN_READERS = {"eval": EVAL, "analyze": ANALYZE, "export saelens": EXPORT,
               "export sparsify": setting(EXPORT, "--format", "sparsify"),
               "export html": setting(EXPORT, "--format", "html")}
STORE_HARM = dict(STORE_DAMAGE, **{"unfinished store": _unfinished_store, "garbage in a shard": _garbage_in_shard})
RUN_HARM = dict(RUN_DAMAGE, **{"unfinished run": _unfinished_run})
for what, damage in STORE_HARM.items():
    CASES += [(f"{command} with {what}", argv, ("store", damage)) for command, argv in STORE_READERS.items()]
for what, damage in RUN_HARM.items():
    CASES += [(f"{command} with {what}", argv, ("run", damage)) for command, argv in RUN_READERS.items()]
CASES += [(f"{command} of an analysis older than the weights", argv, ("run", _stale_weights))
          for command, argv in (("export html", RUN_READERS["export html"]),
                                ("export saelens", EXPORT))]


# ---- the project and the classifier ---------------------------------------------------------------------------
def build_project(root: Path, tiny_llama_dir: Path) -> dict[str, Path]:
    """root/p: a store, a trained and analysed run, stores that mismatch the run; root/x: the other inputs."""
    from tiny_variants import synthetic

    from sae.cli import main
    from sae.store import from_tensors
    project = root / "p"
    x = synthetic(n=3000, d_in=16)
    from_tensors(project / "store", x, layer=0, model="synthetic", site="resid_post")
    from_tensors(project / "store_layer1", x, layer=1, model="synthetic", site="resid_post")
    from_tensors(project / "store_d8", x[:, :8].contiguous(), layer=0, model="synthetic", site="resid_post")
    from_tensors(project / "store_other_model", x, layer=0, model="other", site="resid_post")
    from_tensors(project / "store_other_site", x, layer=0, model="synthetic", site="mlp_out")
    quiet = io.StringIO()
    for argv in (["train", "--activations", project / "store", "--variant", "topk", "--k", 4, "--d-sae", 32,
                  "--tokens", 2048, "--batch-size", 256, "--out", project / "run", "--device", "cpu"],
                 ["eval", "--run", project / "run", "--activations", project / "store", "--no-model"],
                 ["analyze", "--run", project / "run", "--activations", project / "store", "--no-model"]):
        with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
            try:
                main([str(a) for a in argv])
            except SystemExit as done:
                assert not done.code, quiet.getvalue()
    extra = root / "x"
    extra.mkdir()
    (extra / "file.txt").write_text("not a run, not a store\n")
    (extra / "empty.txt").write_text("")
    (extra / "corpus.txt").write_text("the cat sat on the mat.\n\n" * 60)
    return {"P": project, "M": Path(tiny_llama_dir), "C": extra / "corpus.txt", "F": extra / "file.txt",
            "E": extra / "empty.txt"}


class _Hang(Exception):
    pass


class _Served(Exception):
    """A dashboard case got as far as starting the server (os.execv): it accepted bad input."""


def _serve(*args):
    raise _Served()


def _alarm(signum, frame):
    raise _Hang()


def expand(argv: list, places: dict[str, Path], out: Path) -> list[str]:
    result = []
    for item in argv:
        text = str(item)
        head, _, tail = text.partition("/")
        if text == "O":
            text = str(out)
        elif head in places and (tail or text == head):
            text = str(places[head] / tail) if tail else str(places[head])
        result.append(text)
    return result


def run_case(argv: list, damage, places: dict[str, Path], scratch: Path) -> tuple[str, str]:
    """Run one case on a copy of the project when it damages one: (category, stderr)."""
    from sae.cli import main
    scratch.mkdir(parents=True, exist_ok=True)
    places = dict(places)
    if damage is not None:
        copy = scratch / "p"
        shutil.copytree(places["P"], copy)
        damage[1](copy / damage[0])
        places["P"] = copy
    before = digest(places["P"])
    err, out = io.StringIO(), io.StringIO()
    category = None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    execv, os.execv = os.execv, _serve
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main(expand(argv, places, scratch / "out"))
        code = 0
    except SystemExit as done:
        code = done.code or 0
    except _Hang:
        category, code = "hang", None
    except _Served:
        code = 0
    except BaseException:                               # noqa: BLE001 -- any escape is what we count
        category, code = "traceback", None
        err.write(traceback.format_exc())
    finally:
        os.execv = execv
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    text = err.getvalue()
    lines = [line for line in text.strip().splitlines() if not line.startswith(("notice: ", "warning: "))]
    if category is None:
        if "Traceback" in text:
            category = "traceback"
        elif digest(places["P"]) != before:
            category = "lost"
        elif code == 0:
            category = "wrong"
        elif code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
            category = "refused"
        else:
            category = "unclear"
    elif digest(places["P"]) != before:
        category = "lost"
    return category, text


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_llama_dir):
    return build_project(tmp_path_factory.mktemp("bad_input"), tiny_llama_dir)


@pytest.mark.parametrize("name, argv, damage", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(places, tmp_path, name, argv, damage):
    category, err = run_case(argv, damage, places, tmp_path)
    assert category == "refused", f"{name}: {category}\n{err}"


def test_the_table_covers_the_data_safety_issue():
    assert len(CASES) >= 209
    assert len({case[0] for case in CASES}) == len(CASES)       # each case named once


if __name__ == "__main__":                                 # the counts, for the notes
    import collections
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import build_tiny_lm  # noqa: E402

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = build_tiny_lm("llama")
        loaded.model.save_pretrained(str(tmp / "llama"))
        loaded.tokenizer.save_pretrained(str(tmp / "llama"))
        places_ = build_project(tmp / "project", tmp / "llama")
        counts, odd = collections.Counter(), []
        for i, (name, argv, damage) in enumerate(CASES):
            category, err = run_case(argv, damage, places_, tmp / f"case{i}")
            shutil.rmtree(tmp / f"case{i}", ignore_errors=True)
            counts[category] += 1
            if category == "lost" and damage is None:      # the shared project itself was changed: rebuild it
                places_ = build_project(tmp / f"project{i}", tmp / "llama")
            if category != "refused":
                odd.append(f"{category:9s} {name}: {err.strip().splitlines()[-1:] if err.strip() else ''}")
        print("\n".join(odd))
        print(f"{len(CASES)} cases: " + ", ".join(f"{k} {counts[k]}" for k in
                                                  ("refused", "traceback", "wrong", "lost", "hang", "unclear")))
