"""sae collect: stored rows equal independent hooks, bookkeeping, shards, resume, norms, bad input, torchrun."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sae.collect.loop as collect_lib
from sae.collect import CollectOptions, collect
from sae.data import PAD_DOC, load_documents, pack_windows
from sae.errors import UserError
from sae.lm import SITES
from sae.store import ActivationStore, is_held_out

FAMILIES = ("llama", "gpt2", "gpt_neox", "bert")
N_DOCS = 48
HAND_PATHS = {  # (blocks, attention output module, MLP output module, MLP hidden module and whether its input)
    "llama": ("model.layers", "self_attn", "mlp", ("mlp.down_proj", "input")),
    "gpt2": ("transformer.h", "attn", "mlp", ("mlp.c_proj", "input")),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", ("mlp.dense_4h_to_h", "input")),
    "bert": ("bert.encoder.layer", "attention.output.dense", "output.dense", ("intermediate", "output")),
}
INPUT_PATHS = {  # modules whose input is (mlp_in, attn_z), by hand
    "llama": ("mlp", "self_attn.o_proj"), "gpt2": ("mlp", "attn.c_proj"),
    "gpt_neox": ("mlp", "attention.dense"), "bert": ("intermediate", "attention.output.dense"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small labelled .jsonl corpus: N_DOCS documents of 4-15 words."""
    from conftest import write_labelled_corpus
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home", "quickly"]
    return write_labelled_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", words, N_DOCS, (4, 16), seed=1)


def run(loaded, out, corpus, **kw):
    kw.setdefault("layers", [0, 2])
    kw.setdefault("site", "resid_post")
    kw.setdefault("context_size", 24)
    kw.setdefault("batch_size", 3)
    options = CollectOptions(model=loaded.name, dataset=str(corpus), out=Path(out), progress=False, **kw)
    return collect(options, loaded=loaded)


def columns(path):
    """Every per-row column and activation of a store, concatenated in store order."""
    store = ActivationStore(path)
    out = {}
    for i in range(len(store.shards)):
        for name in store.tensor_names(i):
            out.setdefault(name, []).append(store.read_shard(i, name))
    return {k: torch.cat(v) for k, v in out.items()}


def reference_sites(loaded, layer, input_ids, attention_mask=None):
    """{site: [B, T, d]} read by hand-written hooks and output_hidden_states (independent of sae.models)."""
    hf = loaded.model
    blocks, attn, mlp, (hidden_path, hidden_kind) = HAND_PATHS[loaded.family]
    block = hf.get_submodule(f"{blocks}.{layer}")
    seen = {}

    def keep(name, use_input=False):
        def hook(module, args, output):
            value = args[0] if use_input else output
            seen[name] = value[0] if isinstance(value, tuple) else value
        return hook
    handles = [block.get_submodule(attn).register_forward_hook(keep("attn_out")),
               block.get_submodule(mlp).register_forward_hook(keep("mlp_out")),
               block.get_submodule(hidden_path).register_forward_hook(keep("mlp_hidden", hidden_kind == "input"))]
    handles += [block.get_submodule(path).register_forward_hook(keep(site, True))
                for site, path in zip(("mlp_in", "attn_z"), INPUT_PATHS[loaded.family])]
    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    seen["resid_pre"], seen["resid_post"] = out.hidden_states[layer], out.hidden_states[layer + 1]
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_rows_equal_an_independent_hook_for_every_site(tiny_lm, corpus, tmp_path, family):
    loaded = tiny_lm(family)
    for site in SITES:
        result = run(loaded, tmp_path / site, corpus, site=site, tokens=150)
        assert result.n_tokens == 150
        store = ActivationStore(tmp_path / site)
        for i in range(len(store.shards)):
            windows = store.read_shard(i, "window_tokens").long()
            w, p = store.read_shard(i, "window_index"), store.read_shard(i, "position").long()
            for layer in (0, 2):
                expected = reference_sites(loaded, layer, windows)[site][w, p]
                stored = store.read_shard(i, f"activations.{layer}")
                torch.testing.assert_close(stored, expected, atol=1e-5, rtol=1e-5, msg=f"{family} {site} {layer}")


def test_bookkeeping_against_the_packing(tiny_lm, corpus, tmp_path):
    loaded = tiny_lm("llama")
    run(loaded, tmp_path / "a", corpus, shard_tokens=200)
    cols = columns(tmp_path / "a")
    store = ActivationStore(tmp_path / "a")
    windows = {w.index: w for w in pack_windows(load_documents(str(corpus))[0], loaded.tokenizer, 24, 1, 2, 3)}
    specials = torch.tensor(sorted(loaded.special_ids))
    expected_rows = sum(int(((w.doc_ids != PAD_DOC) & ~torch.isin(w.input_ids, specials)).sum()) for w in windows.values())
    assert len(store) == expected_rows and store.manifest["complete"] and store.manifest["n_tokens"] == expected_rows
    assert len(store.shards) > 1 and store.manifest["label_names"] == ["red", "green", "blue"]
    seen_windows = []
    for i in range(len(store.shards)):
        window_tokens = store.read_shard(i, "window_tokens")
        window_ids = store.read_shard(i, "window_ids")
        w, p = store.read_shard(i, "window_index"), store.read_shard(i, "position").long()
        assert int(w.max()) < len(window_tokens)  # every row's window lives in its own shard
        assert torch.equal(store.read_shard(i, "token_ids"), window_tokens[w, p])
        for k, wid in enumerate(window_ids.tolist()):
            assert torch.equal(window_tokens[k].long(), windows[wid].input_ids)
            rows = w == k
            assert torch.equal(store.read_shard(i, "doc_id")[rows], windows[wid].doc_ids[p[rows]])
            assert torch.equal(store.read_shard(i, "label")[rows], windows[wid].labels[p[rows]])
        seen_windows += window_ids.tolist()
    assert seen_windows == sorted(windows)  # every window once, in order, none split across shards
    assert not torch.isin(cols["token_ids"].long(), specials).any()  # BOS/EOS not stored by default
    assert cols["token_ids"].dtype == torch.int32 and cols["position"].dtype == torch.int32
    assert cols["doc_id"].dtype == torch.int64 and cols["window_index"].dtype == torch.int64
    # the held-out rule splits by document: the store's split equals the rule on doc_id
    assert torch.equal(store.held_out_mask(), is_held_out(cols["doc_id"]))
    assert 0 < int(store.held_out_mask().sum()) < len(store)

    run(loaded, tmp_path / "b", corpus, keep_special_tokens=True)
    kept = columns(tmp_path / "b")
    assert int((kept["token_ids"] == 1).sum()) == len(windows)  # one BOS per window
    assert (kept["position"][kept["token_ids"] == 1] == 0).all()
    assert int((kept["token_ids"] == 2).sum()) == N_DOCS  # one EOS per document
    assert ActivationStore(tmp_path / "b").manifest["special_tokens_kept"] is True


def test_norm_stats_and_max_norm_ratio(tiny_lm, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(collect_lib, "MEDIAN_TOKENS", 100)
    loaded = tiny_lm("gpt2")
    run(loaded, tmp_path / "all", corpus, layers=[1, 3], tokens=1200)
    everything = columns(tmp_path / "all")
    manifest = ActivationStore(tmp_path / "all").manifest
    norms = {layer: everything[f"activations.{layer}"].norm(dim=-1) for layer in (1, 3)}
    for layer in (1, 3):
        median = float(norms[layer][:100].median())
        assert manifest["norm_median"][str(layer)] == pytest.approx(median, rel=1e-6)
        stats = manifest["norm_stats"][str(layer)]
        assert stats["median"] == pytest.approx(float(norms[layer].double().quantile(0.5)), rel=1e-5)
        assert stats["p99"] == pytest.approx(float(norms[layer].double().quantile(0.99)), rel=1e-5)
        assert stats["p999"] == pytest.approx(float(norms[layer].double().quantile(0.999)), rel=1e-5)
    ratio = 1.05
    run(loaded, tmp_path / "cut", corpus, layers=[1, 3], max_norm_ratio=ratio, tokens=1200)
    cut = columns(tmp_path / "cut")
    keep = torch.ones(len(everything["doc_id"]), dtype=torch.bool)
    for layer in (1, 3):
        keep &= norms[layer] <= ratio * manifest["norm_median"][str(layer)]
    assert 0 < int(keep.sum()) < len(keep)
    n = int(keep.sum())  # both runs stop at 1,200 rows: the cut run's first n rows are the kept ones
    assert len(cut["doc_id"]) >= n
    assert torch.equal(cut["activations.3"][:n], everything["activations.3"][keep])
    assert torch.equal(cut["token_ids"][:n], everything["token_ids"][keep])


class Interrupt:
    """Raises KeyboardInterrupt in the n-th forward of a model (as Ctrl-C would)."""

    def __init__(self, module, n):
        self.count, self.n = 0, n
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.count += 1
        if self.count == self.n:
            raise KeyboardInterrupt


def test_interrupt_then_resume_equals_an_uninterrupted_run(tiny_lm, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(collect_lib, "MEDIAN_TOKENS", 60)
    loaded = tiny_lm("llama")
    kw = dict(tokens=700, shard_tokens=90, max_norm_ratio=1.2)
    straight = run(loaded, tmp_path / "straight", corpus, **kw)
    assert straight.n_tokens == 700
    interrupt = Interrupt(loaded.model.model.layers[0], 6)
    with pytest.raises(KeyboardInterrupt):
        run(loaded, tmp_path / "resumed", corpus, **kw)
    interrupt.handle.remove()
    # a consistent store is left: the manifest lists exactly the shards on disk, no temporary files
    partial = ActivationStore(tmp_path / "resumed")
    assert partial.manifest["complete"] is False and 0 < len(partial) < 700
    on_disk = sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.name.startswith(("shard", ".")))
    assert on_disk == sorted(partial.manifest["shards"])
    with pytest.raises(UserError, match="not empty"):
        run(loaded, tmp_path / "resumed", corpus, **kw)
    with pytest.raises(UserError, match="context_size"):
        run(loaded, tmp_path / "resumed", corpus, resume=True, **{**kw, "context_size": 16})
    run(loaded, tmp_path / "resumed", corpus, resume=True, **kw)
    a, b = columns(tmp_path / "straight"), columns(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert ActivationStore(tmp_path / "resumed").manifest["complete"] is True
    # --force replaces; tokens beyond the dataset give what there is
    big = run(loaded, tmp_path / "resumed", corpus, force=True, tokens=10**6)
    assert big.exhausted and big.n_tokens == len(ActivationStore(tmp_path / "resumed")) < 10**6


def cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "sae", "collect", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]


def test_cli_subprocess_bad_input_and_exhausted_dataset(tiny_llama_dir, corpus, tmp_path):
    """Through a real `python -m sae collect`: one stderr line, exit 2, no traceback; exhaustion is exit 0."""
    common = ["--model", tiny_llama_dir, "--dataset", corpus, "--context-size", 24]
    bad = {
        "unknown model": (["--model", "no-such-owner/nothing-here", "--layers", 0, "--dataset", corpus,
                           "--out", tmp_path / "o1"], "unknown model"),
        "layer range": (common + ["--layers", 4, "--out", tmp_path / "o2"], "layers 0..3"),
    }
    procs = {name: cli(*args) for name, (args, _) in bad.items()}
    big = cli(*common, "--layers", "0,2", "--tokens", 10**6, "--out", tmp_path / "big")
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        lines = error_lines(stderr)
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and bad[name][1] in lines[0], (name, stderr)
        assert "Traceback" not in stderr
    stdout, stderr = big.communicate(timeout=180)
    assert big.returncode == 0, stderr
    assert "warning: the dataset ran out after" in stderr and "Traceback" not in stderr
    assert str(tmp_path / "big") in stdout and "B, 1 shard" in stdout
    store = ActivationStore(tmp_path / "big")
    assert store.layers == [0, 2] and len(store) == store.manifest["n_tokens"] > 0


def test_cli_bad_inputs(tiny_llama_dir, corpus, tmp_path, capsys):
    """The same CLI entry point in-process (cheaper): each bad input is one `error:` line and exit 2."""
    from sae.cli import main
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    common = ["--model", str(tiny_llama_dir), "--dataset", str(corpus), "--context-size", "24", "--layers", "0"]
    cases = [
        (common + ["--site", "resid", "--out", tmp_path / "o3"], "resid_pre, resid_post, attn_out"),
        (["--model", str(tiny_llama_dir), "--dataset", tmp_path / "empty.txt", "--layers", "0",
          "--out", tmp_path / "o4"], "no documents"),
        (common + ["--text-column", "body", "--out", tmp_path / "o5"], "text column 'body'"),
        (common + ["--out", tmp_path / "a_file" / "store"], "--out"),
        (["--model", str(tiny_llama_dir), "--dataset", "no-such-owner/no-data", "--layers", "0",
          "--out", tmp_path / "o6"], "unknown dataset"),
        (common + ["--out", tmp_path / "full"], "not empty"),
        (common + ["--layers", "x", "--out", tmp_path / "o7"], "not a layer index"),
        (common + ["--tokens", "0", "--out", tmp_path / "o8"], "--tokens must be positive"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["collect", *map(str, args)])
        stderr = capsys.readouterr().err
        lines = error_lines(stderr)
        assert exit_info.value.code == 2, (args, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (message, stderr)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"


@pytest.mark.slow
def test_torchrun_two_ranks_store_every_document_once(tiny_llama_dir, corpus, tmp_path):
    args = ["--model", tiny_llama_dir, "--dataset", corpus, "--context-size", 24, "--layers", "1",
            "--batch-size", 2, "--shard-tokens", 150, "--device", "cpu"]
    single = cli(*args, "--out", tmp_path / "single")
    assert single.wait(timeout=120) == 0, single.stderr.read()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                "-m", "sae", "collect", *map(str, args), "--out", str(tmp_path / "dist")]
    done = subprocess.run(launcher, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    store = ActivationStore(tmp_path / "dist")
    assert store.manifest["world_size"] == 2 and store.manifest["complete"]
    assert any(name.startswith("shard_r001_") for name in store.manifest["shards"])
    assert any(name.startswith("shard_r000_") for name in store.manifest["shards"])
    # the ranks packed their own documents (sae.collect.ranks): each document's tokens, once, in the same order
    def by_document(path):
        s, tokens, ranks = ActivationStore(path), {}, {}
        for i, name in enumerate(s.manifest["shards"]):
            for doc, token in zip(s.read_shard(i, "doc_id").tolist(), s.read_shard(i, "token_ids").tolist()):
                tokens.setdefault(doc, []).append(token)
                ranks.setdefault(doc, set()).add(name[:11])
        return tokens, ranks
    (single_tokens, _), (dist_tokens, dist_ranks) = by_document(tmp_path / "single"), by_document(tmp_path / "dist")
    assert dist_tokens == single_tokens and len(dist_tokens) == N_DOCS
    assert all(len(ranks) == 1 for ranks in dist_ranks.values())   # a document lives on one rank


@pytest.mark.slow
def test_real_smollm2_on_bbc(smollm2, tmp_path):
    options = CollectOptions(model="smollm2", dataset="bbc", layers=[3], site="resid_post", out=tmp_path / "s",
                             tokens=2000, context_size=64, batch_size=8, progress=False)
    result = collect(options, loaded=smollm2)
    store = ActivationStore(tmp_path / "s")
    assert result.n_tokens == len(store) == 2000 and store.d_model == 576
    manifest = store.manifest
    assert manifest["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert "Q4_1" in manifest["model_note"] and manifest["norm_stats"]["3"]["median"] > 0
    windows = store.read_shard(0, "window_tokens").long()
    assert (windows[:, 0] == smollm2.bos_id).all()
    w, p = store.read_shard(0, "window_index"), store.read_shard(0, "position").long()
    assert not torch.isin(store.read_shard(0, "token_ids").long(), torch.tensor(sorted(smollm2.special_ids))).any()
    with torch.no_grad():
        hidden = smollm2.model(input_ids=windows[:4], output_hidden_states=True).hidden_states[4]
    rows = w < 4
    torch.testing.assert_close(store.read_shard(0, "activations.3")[rows], hidden[w[rows], p[rows]],
                               atol=1e-4, rtol=1e-4)
    assert set(store.read_shard(0, "label").tolist()) <= {0, 1, 2, 3, 4}
