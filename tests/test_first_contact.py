"""First contact (issue 20): what a new user meets, from the commands' messages to the dashboard's pages.

Each test names the defect it guards against; the dashboard's own pages are in tests/test_dashboard.py
and, in a real browser, tests/test_dashboard_browser.py."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sae import variants
from sae.runs import save_run

ROOT = Path(__file__).resolve().parents[1]


def identity_run(path: Path, d: int) -> None:
    """A ReLU SAE whose codes are relu(x): the test knows every code without encoding."""
    model = variants.create("relu", d_in=d, d_sae=d)
    with torch.no_grad():
        model.W_enc.copy_(torch.eye(d))
        model.W_dec.copy_(torch.eye(d))
        model.b_enc.zero_()
        model.b_dec.zero_()
        model.input_scale.fill_(1.0)
    save_run(model, path, {"layer": 0, "site": "resid_post"})


# ---- interval samples: every band of a frequent feature's full distribution ----------------------
def test_interval_bands_cover_a_frequent_features_tail(tmp_path):
    from sae.analyze.bands import per_bin_for, sampling_edges
    from sae.analyze.pipeline import AnalyzeOptions, analyze
    from sae.store import ActivationStore

    gen = torch.Generator().manual_seed(0)
    n, per_band, n_bands = 30_000, 5, 5
    x = torch.zeros(n, 3)
    x[:, 0] = torch.empty(n).exponential_(1.0, generator=gen)          # fires on every token, long tail
    x[::50, 1] = torch.rand(n // 50, generator=gen) * 3                 # rare, flat
    store = ActivationStore.from_tensors(tmp_path / "store", x)
    identity_run(tmp_path / "run", 3)
    options = AnalyzeOptions(n_top=5, n_bands=n_bands, per_band=per_band, reservoir=64, batch_size=997,
                             with_model=False, n_nearest=2)
    analyze(tmp_path / "run", store, options=options, log=None)
    interval = pd.read_parquet(tmp_path / "run" / "analysis" / "interval_examples.parquet")

    values = x[:, 0].double()
    top = float(values.max())
    band_of = ((values / top) * n_bands).floor().clamp(max=n_bands - 1).long()
    in_band = torch.bincount(band_of, minlength=n_bands)
    # the defect: a 64-entry uniform sample misses the top band (expected count far below one)
    assert 64 * int(in_band[-1]) / n < 0.1
    got = interval[interval.feature == 0]
    edges = sampling_edges()
    bin_of = torch.bucketize(values, edges, right=True) - 1
    for band in range(n_bands):
        rows = got[got.band == band]
        lo, hi = band * top / n_bands, (band + 1) * top / n_bands
        whole = [b for b in torch.unique(bin_of).tolist() if edges[b] >= lo and edges[b + 1] <= hi]
        guaranteed = sum(min(per_bin_for(per_band), int((bin_of == b).sum())) for b in whole)
        assert min(per_band, guaranteed) <= len(rows) <= min(per_band, int(in_band[band])), band
        assert len(rows) >= 1, f"band {band} ({int(in_band[band])} tokens) is empty"
        for _, example in rows.iterrows():   # each example is a real token of that band
            assert example.activation == pytest.approx(float(x[int(example.row), 0]), rel=1e-3)
            assert lo - 1e-3 <= example.activation <= hi + 1e-3
    # the band samples are spread over the band, not its top: band 0's mean is near the band's own mean
    low = values[band_of == 0]
    assert abs(got[got.band == 0].activation.mean() - float(low.mean())) < 0.8 * float(low.std())


# ---- sae/analyze/render: tokens shown on their own -----------------------------------------------
def test_token_labels_make_whitespace_visible():
    from sae.analyze.render import token_label
    from dashboard.render import chips, token_list
    assert token_label(" the") == "\u2423the" and token_label("the") == "the"
    assert token_label("\n") == "\u21b5" and token_label("") == "\u2205"
    assert token_label("<b>") == "&lt;b&gt;"
    html = chips([" a", "\n"], [1.5, -0.25])
    assert "\u2423a" in html and "+1.5" in html and "-0.25" in html     # values without hovering
    assert token_list(json.dumps([" the", "<b>"])) == "\u2423the \u00b7 <b>"     # text, not a JSON string


# ---- commands -------------------------------------------------------------------------------------
def cli(*argv):
    """`sae ...` in-process: (exit status, stderr)."""
    import contextlib
    import io
    from sae.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, err.getvalue()


def test_a_txt_file_without_blank_lines_is_one_document_per_line_and_trains(tmp_path, tiny_lm):
    from sae.collect import CollectOptions, collect
    from sae.data import load_documents
    from sae.store import ActivationStore, is_held_out
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=8)) for _ in range(240)]
    corpus = tmp_path / "sentences.txt"
    corpus.write_text("\n".join(lines) + "\n")
    docs, _ = load_documents(str(corpus))
    assert [d.text for d in docs] == lines                       # one document a line, in order
    loaded = tiny_lm("llama")
    collect(CollectOptions(model=loaded.name, dataset=str(corpus), out=tmp_path / "store", layers=[1],
                           site="resid_post", context_size=32, batch_size=8, progress=False), loaded=loaded)
    store = ActivationStore(tmp_path / "store")
    doc_id = store.column("doc_id")
    held = is_held_out(doc_id)
    assert 0 < int(held.sum()) < len(doc_id) // 2                # some held out, most left to train on
    status, err = cli("train", "--activations", tmp_path / "store", "--variant", "relu", "--out", tmp_path / "run",
                      "--tokens", 512, "--batch-size", 128, "--device", "cpu", "--expansion", 2)
    assert status == 0, err
    assert (tmp_path / "run" / "sae.safetensors").is_file()


def test_shards_and_weights_are_readable_by_others(tmp_path):
    from sae.store import ActivationStore
    old = os.umask(0o022)
    try:
        ActivationStore.from_tensors(tmp_path / "store", torch.randn(64, 4))
        identity_run(tmp_path / "run", 4)
        status, err = cli("export", tmp_path / "run", "--format", "saelens", tmp_path / "out")
    finally:
        os.umask(old)
    assert status == 0, err
    written = [*(tmp_path / "store").glob("*.safetensors"), tmp_path / "run" / "sae.safetensors",
               *(tmp_path / "out").rglob("*.safetensors")]
    assert len(written) >= 3
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_sweep_help_shows_the_default_budget():
    from sae.evaluate import DEFAULT_TOKENS
    from sae.evaluate.sweep import DEFAULT_TOKENS as used
    out = subprocess.run([sys.executable, "-m", "sae", "sweep", "--help"], capture_output=True, text=True).stdout
    assert f"(default {DEFAULT_TOKENS:,})" in " ".join(out.split()) and used == DEFAULT_TOKENS
    assert "DEFAULT_TOKENS" not in out


def test_the_pipeline_outputs_are_git_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for folder in ("/store/", "/runs/", "/sweep/", "/demo/"):
        assert folder in ignored


def test_readme_python_snippet_defines_every_name():
    import pyflakes.api
    import pyflakes.reporter
    import io
    import re
    text = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert snippets
    for snippet in snippets:
        out = io.StringIO()
        pyflakes.api.check(snippet, "README.md", pyflakes.reporter.Reporter(out, out))
        assert "undefined name" not in out.getvalue(), out.getvalue()


def sae_process(*args, env=None, timeout=600):
    """A real `python -m sae ...` process: (exit status, stdout, stderr, seconds)."""
    import time
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sae", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - started


def closed_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]          # nothing listens there once the socket is closed


@pytest.mark.parametrize("name", ["smollm", "gpt2"])
def test_an_unreachable_hub_is_named_at_once_with_a_close_name(tmp_path, name):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\nd e f\n")
    args = ("collect", "--model", name, "--layers", 1, "--site", "resid_post", "--dataset", corpus,
            "--tokens", 64, "--out", tmp_path / "store")
    base = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    # the hub switched off
    status, _, err, seconds = sae_process(*args, env={**base, "HF_HUB_OFFLINE": "1"})
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "HF_HUB_OFFLINE" in err and "Retrying" not in err and "Traceback" not in err
    # the hub's host refuses connections (an offline laptop): one line, at once, no retries
    env = {**base, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    status, _, err, seconds = sae_process(*args, env=env)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    # no retries: the time is a plain start of the command (+ the 3 s connection check at most), however busy
    # the machine is; the retries took 26 s
    *_, start_only = sae_process("collect", "--help")
    assert "could not be reached" in err and "Retrying" not in err and seconds < start_only + 15
    assert ("did you mean 'smollm2'" in err) == (name == "smollm")
    assert not (tmp_path / "store").exists()


def test_hub_errors_map_to_one_line():
    from huggingface_hub.errors import OfflineModeIsEnabled
    from sae.lm.hub import hub_problem, suggestion
    assert "switched off" in str(hub_problem("gpt2", OfflineModeIsEnabled("x")))
    wrapped = OSError("wrapper")
    wrapped.__cause__ = OfflineModeIsEnabled("x")
    assert "switched off" in str(hub_problem("gpt2", wrapped))
    assert suggestion("SmolLM2") and suggestion("smolm2") and not suggestion("gpt2")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("first_contact")
    corpus = root / "docs.txt"
    rng = np.random.default_rng(1)
    corpus.write_text("\n".join(" ".join(rng.choice(list("abcdefgh"), size=12)) for _ in range(120)) + "\n")
    return root, corpus, tiny_llama_dir


def collect_args(model_dir, corpus, out, *extra, layers=1):
    return ("collect", "--model", model_dir, "--layers", layers, "--site", "resid_post", "--dataset", corpus,
            "--tokens", 600, "--context-size", 16, "--out", out, "--device", "cpu", *extra)


def test_layer_check_comes_before_loading_and_a_failed_collect_leaves_no_folder(tiny_setup, monkeypatch):
    import sae.collect.loop as loop
    root, corpus, model_dir = tiny_setup

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the layer check")
    monkeypatch.setattr(loop, "load_model", no_loading)
    status, err = cli(*collect_args(model_dir, corpus, root / "bad_layer", layers=99))
    assert status == 2 and "layer 99 is out of range" in err, err
    assert not (root / "bad_layer").exists()
    monkeypatch.undo()
    # a failure after the folder was made (the dataset is missing): the folder goes too
    status, err = cli(*collect_args(model_dir, root / "missing.txt", root / "no_data"))
    assert status == 2 and "missing.txt" in err, err
    assert not (root / "no_data").exists()


def test_resuming_finished_work_says_already_complete(tiny_setup, capsys, monkeypatch):
    import sae.collect.loop as loop
    root, corpus, model_dir = tiny_setup
    store = root / "store"
    status, err = cli(*collect_args(model_dir, corpus, store))
    assert status == 0, err
    written = sorted(p.name for p in store.iterdir())
    capsys.readouterr()
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    status, err = cli(*collect_args(model_dir, corpus, store, "--resume"))
    out = capsys.readouterr().out
    assert status == 0, err
    assert "already complete: 600 rows" in out and "wrote" not in out
    assert sorted(p.name for p in store.iterdir()) == written
    monkeypatch.undo()
    run = root / "run"
    train = ("train", "--activations", store, "--variant", "relu", "--out", run, "--tokens", 1024,
             "--batch-size", 128, "--device", "cpu", "--expansion", 2, "--eval-rows", 64)
    status, err = cli(*train)
    assert status == 0, err
    assert "tokens/s" in capsys.readouterr().out
    status, err = cli(*train, "--resume")
    out = capsys.readouterr().out
    assert status == 0, err
    assert "already complete" in out and "tokens/s" not in out, out


def test_screenshot_helper_refuses_a_folder_that_is_not_a_run(tmp_path):
    import time
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    for target, needle in ((tmp_path / "notes", "not a run folder"), (tmp_path / "nowhere", "does not exist")):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "dashboard_snapshot.py"), str(target),
                               "--out", str(tmp_path / "shot.png"), "--port", "1"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and needle in done.stderr, done.stderr
        assert time.perf_counter() - started < 30 and not (tmp_path / "shot.png").exists()


def test_dashboard_on_a_run_never_analysed_warns_and_names_its_store(tmp_path):
    from dashboard.runs import DataProblem, Run, read_meta
    from sae.commands.dashboard import unanalysed
    from sae.files import read_json
    model = variants.create("relu", d_in=4, d_sae=8)
    save_run(model, tmp_path / "run", {"layer": 0, "site": "resid_post", "store": "/data/my_store"})
    warnings = unanalysed([tmp_path / "run"])
    assert len(warnings) == 1 and "--activations /data/my_store" in warnings[0]
    run = Run(path=tmp_path / "run", name="run", config=read_json(tmp_path / "run" / "config.json"))
    with pytest.raises(DataProblem, match="--activations /data/my_store"):
        read_meta(run)
    (tmp_path / "run" / "analysis").mkdir()
    (tmp_path / "run" / "analysis" / "meta.json").write_text("{}")
    assert unanalysed([tmp_path]) == []            # a folder of runs: each checked


def test_progress_is_logged_as_lines_without_a_terminal(tiny_setup):
    import io
    from sae.progress import progress_bar
    log = io.StringIO()                                       # not a terminal
    with progress_bar(total=5, desc="work", file=log, mininterval=0, delay=0) as bar:
        for _ in range(5):
            bar.update(1)
    assert "\r" not in log.getvalue() and "5/5" in log.getvalue()
    # a real collect with stderr into a pipe: lines, not silence
    root, corpus, model_dir = tiny_setup
    status, out, err, _ = sae_process(*collect_args(model_dir, corpus, root / "piped"),
                                      env={"SAE_PROGRESS_EVERY": "0"})
    assert status == 0, err
    lines = [line for line in err.splitlines() if line.startswith("collect") and "tok" in line]
    assert len(lines) >= 2 and "\r" not in err, err


# ---- threading policy (sae.threads; figures: scripts/bench_threads.py) ---------------------------
def test_thread_policy_by_command_and_load():
    from sae.threads import policy
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert policy("dashboard", environ={}, load=0.0, cores=2) == passive          # interactive: never spins
    assert policy("train", environ={}, load=0.1, cores=2) == {}                   # a machine of its own
    assert policy("train", environ={}, load=6.0, cores=2) == passive              # a busy machine
    assert policy("dashboard", environ={"OMP_WAIT_POLICY": "ACTIVE"}, load=0, cores=2) == {}   # the user's own
    assert policy("dashboard", environ={"SAE_THREADS": "default"}, load=9, cores=2) == {}
    assert policy("collect", environ={"SAE_THREADS": "passive"}, load=0, cores=2) == passive


def test_the_policy_is_set_before_torch_loads():
    code = ("import os, sys\nfrom sae.threads import apply\nsettings = apply(['dashboard', 'RUN'])\n"
            "import torch\nprint(settings, os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SAE_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    assert out.split() == ["{'OMP_WAIT_POLICY':", "'PASSIVE'}", "PASSIVE", "True"]


def test_the_sae_command_applies_the_policy_before_torch_loads():
    """Through the real entry point (`python -m sae`): a command sees OMP_WAIT_POLICY as sae.threads set it."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SAE_THREADS")}
    probe = ("import os, sys\nimport sae.cli\nsys.argv = ['sae', 'dashboard', 'RUN']\n"
             "sae.cli.main = lambda: print('POLICY', os.environ.get('OMP_WAIT_POLICY'), flush=True)\n"
             "sae.cli.entry()\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout
    assert "POLICY PASSIVE" in out, out
