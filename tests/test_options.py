"""Options are checked where they are defined: Python callers of train, collect, live training and analysis
get the same one-line refusals as the command line; live training's options are the command's options."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sae
from sae.errors import UserError
from tiny_variants import synthetic


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "--batch-size must be positive"),
    (dict(tokens=100, batch_size=256), "less than one batch"),
    (dict(lr=-1.0), "--lr must be in"),
    (dict(mask_prob=1.0), "--mask-prob"),
    (dict(lr_warmup=2.0), "--lr-warmup"),
    (dict(log_every=0), "--log-every must be positive"),
    (dict(dead_after_tokens=0), "--dead-after-tokens must be positive"),
])
def test_train_options_refuse_bad_values(kwargs, message):
    from sae.train import TrainOptions
    with pytest.raises(UserError, match=message):
        TrainOptions(**kwargs)


def test_the_dead_latent_rule_is_one_rule():
    from sae.train import TrainOptions
    assert TrainOptions(tokens=10_000, batch_size=100).dead_after == 1_000
    assert TrainOptions(tokens=10_000, batch_size=4_000).dead_after == 4_000      # at least one batch
    assert TrainOptions(tokens=10**9, batch_size=100).dead_after == 10_000_000     # at most 10M
    assert TrainOptions(dead_after_tokens=123).dead_after == 123


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers="3,3"), "more than once"),
    (dict(layers="x"), "not a layer index"),
    (dict(layers=""), "names no layer"),
    (dict(context_size=1), "--context-size"),
    (dict(resume=True, force=True), "contradict"),
    (dict(dtype="int8"), "--dtype"),
    (dict(tokens=0), "--tokens must be positive"),
    (dict(max_norm_ratio=-1.0), "--max-norm-ratio"),
])
def test_collect_options_refuse_bad_values(tmp_path, kwargs, message):
    from sae.collect import CollectOptions
    base = dict(model="m", layers="1", site="resid_post", dataset="bbc", out=tmp_path / "store")
    with pytest.raises(UserError, match=message):
        CollectOptions(**{**base, **kwargs})
    assert not (tmp_path / "store").exists()          # refused before anything is written


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers="2,2"), "more than once"),
    (dict(model_batch=0), "--model-batch must be positive"),
    (dict(buffer_size="lots"), "--buffer-size"),
    (dict(context_size=1), "--context-size"),
])
def test_live_options_refuse_bad_values(kwargs, message):
    from sae.train.live import LiveOptions
    with pytest.raises(UserError, match=message) as error:
        LiveOptions(**{"model": "m", "layers": "1", **kwargs})
    assert "--model-batch-size" not in str(error.value)       # a flag that does not exist


def test_analyze_options_refuse_bad_values():
    from sae.analyze import AnalyzeOptions
    with pytest.raises(UserError, match="--top-k must be at least 1"):
        AnalyzeOptions(n_top=0)
    with pytest.raises(UserError, match="--context must be >= 0"):
        AnalyzeOptions(context_radius=-1)


def test_live_training_takes_the_collection_options():
    """One definition of the model-side options: what `sae collect` takes, live `sae train` takes too."""
    from sae.cli import build_parser
    from sae.train.live import LiveOptions
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--dataset", "d.jsonl", "--layers", "1,2", "--site",
                              "mlp_out", "--split", "validation", "--text-column", "body", "--context-size", "64",
                              "--keep-special-tokens", "--max-norm-ratio", "9", "--variant", "topk", "--out", "r"])
    collect_args = parser.parse_args(["collect", "--layers", "1", "--out", "s"])
    shared = ("dataset", "site", "split", "text_column", "context_size", "keep_special_tokens", "max_norm_ratio")
    assert all(hasattr(collect_args, name) for name in shared)
    source = LiveOptions(model=args.model, layers=args.layers, site=args.site, dataset=args.dataset,
                         text_column=args.text_column, split=args.split, context_size=args.context_size,
                         max_norm_ratio=args.max_norm_ratio, keep_special_tokens=args.keep_special_tokens)
    assert (source.layers, source.split, source.text_column, source.keep_special_tokens) == \
        ([1, 2], "validation", "body", True)
    # defaults are the same for both commands
    live_defaults = parser.parse_args(["train", "--model", "m", "--layers", "1", "--variant", "topk", "--out", "r"])
    assert all(getattr(live_defaults, name) == getattr(collect_args, name) for name in shared)


def test_version_and_help_text():
    done = subprocess.run([sys.executable, "-m", "sae", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"sae {sae.__version__}"
    from sae.cli import build_parser
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {action.dest: action.help for action in train._actions}
    assert helps["seed"] and helps["batch_size"]


def test_a_device_that_is_not_there_is_one_line():
    from sae.devices import resolve
    with pytest.raises(UserError, match="not a device"):
        resolve("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve("cuda:1")
    assert resolve("cpu") == torch.device("cpu")


def test_training_summary_and_eval_are_the_same_scorer(tmp_path):
    """Held-out FVU, L0 and dead fraction in train_summary.json equal eval.json's, special-token rows left out
    of both (the store lists token 0 as special; an independent brute-force FVU checks the figure)."""
    from sae.evaluate import evaluate
    from sae.files import read_json, write_json
    from sae.store import ActivationStore, from_tensors, is_held_out
    from sae.train import TrainOptions, train_on_store
    x = synthetic(n=6000, d_in=16)
    doc_id = torch.arange(6000) // 20
    token_ids = (torch.arange(6000) % 7).to(torch.int32)                 # token 0 on every 7th row
    path = from_tensors(tmp_path / "s", x, layer=0, model="synthetic", doc_id=doc_id, token_ids=token_ids).path
    manifest = read_json(path / "manifest.json")
    write_json(path / "manifest.json", {**manifest, "special_ids": [0]})
    store = ActivationStore(path)
    options = TrainOptions(tokens=256 * 20, batch_size=256, device="cpu", checkpoint_every=0, eval_rows=10**6,
                           init_rows=1024)
    summary = train_on_store(store, "topk", tmp_path / "run", options, knobs={"k": 4}, d_sae=64, progress=False)
    result = evaluate(tmp_path / "run", store, with_model=False, probe=False, write=False, progress=False)
    held = summary["held_out"]
    kept = is_held_out(doc_id) & (token_ids != 0)
    assert held["rows"] == result["n_tokens"] == int(kept.sum()) < int(is_held_out(doc_id).sum())
    assert held["fvu"] == pytest.approx(result["fvu"], rel=1e-9)
    assert held["l0"] == pytest.approx(result["l0"]) and held["dead_fraction"] == result["dead_fraction"]
    model = sae.load(tmp_path / "run")
    rows = x[kept]
    with torch.no_grad():
        x_hat = model.decode(model.encode(rows))
    brute = float(((rows - x_hat) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum())
    assert held["fvu"] == pytest.approx(brute, rel=1e-4)
