"""Issue 22: JumpReLU's target L0, VAE annealing and active units, fvu_sparse, --init-from, absorption and TPP.

Every figure is checked against an independent computation (brute force over the codes) or a planted structure.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae import variants
from sae.errors import UserError
from sae.store import ActivationStore
from sae.train.options import TrainOptions
from sae.train.trainer import Trainer


def fit(model, x: torch.Tensor, steps: int, batch: int = 256, lr: float = 1e-2, **options) -> Trainer:
    trainer = Trainer(model, TrainOptions(tokens=steps * batch, batch_size=batch, checkpoint_every=0, device="cpu",
                                          lr=lr, **options), None)
    trainer.init_from_sample(x[:2048])
    for i in range(steps):
        rows = torch.arange(i * batch, (i + 1) * batch) % len(x)
        trainer.step(x[rows])
    model.eval()
    return trainer


def sparse_data(n: int = 8192, d_in: int = 32, n_features: int = 128, per_token: int = 6, seed: int = 0):
    """Tokens that are sums of a few of many random unit directions (with random magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
    picks = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :per_token]            # [n, per_token]
    magnitudes = 1 + torch.rand(n, per_token, generator=g)
    return (magnitudes[:, :, None] * directions[picks]).sum(dim=1)                          # [n, d_in]


# ---- jumprelu ----------------------------------------------------------------------------------------
def test_target_l0_is_refused_outside_its_range():
    for bad in (0.0, -3.0, 65.0):
        with pytest.raises(UserError, match="--target-l0 must be in"):
            variants.create("jumprelu", d_in=16, d_sae=64, target_l0=bad)
    with pytest.raises(UserError, match="--sparsity-penalty"):
        variants.create("jumprelu", d_in=16, d_sae=64, sparsity_penalty="l2")
    variants.create("jumprelu", d_in=16, d_sae=64, target_l0=64.0)   # the edge is allowed


@pytest.mark.parametrize("penalty", ["l0", "tanh"])
def test_target_l0_holds_the_mean_l0_near_the_target(penalty):
    """(with tanh, the penalty is not used in target mode; the pre-activation loss is on in both)"""
    x = sparse_data()
    torch.manual_seed(0)
    model = variants.create("jumprelu", d_in=32, d_sae=128, target_l0=4.0, sparsity_penalty=penalty,
                            pre_act_coefficient=1e-3)
    fit(model, x, steps=240, lr=3e-3)
    with torch.no_grad():
        codes = model.encode(x[-2048:])
    l0 = float((codes != 0).sum(dim=1).float().mean())          # brute force over the codes
    assert abs(l0 - 4.0) < 0.8, l0


# ---- vae ---------------------------------------------------------------------------------------------
def test_kl_warmup_is_refused_outside_0_1():
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="--kl-warmup must be in"):
            variants.create("vae", d_in=8, d_sae=8, kl_warmup=bad)


def test_vae_collapses_without_countermeasures_and_not_with_them():
    """A heavy KL weight (β = 50) on data with four latent factors: with neither free bits nor KL annealing the
    posterior collapses to the prior (no active unit); with both, the factors stay encoded."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(4, 16, generator=g)
    x = (torch.randn(256 * 100, 4, generator=g) * torch.tensor([1.0, 0.6, 0.35, 0.2])) @ mixing
    x = x + 0.1 * torch.randn(x.shape, generator=g)

    def active(free_bits, warmup):
        torch.manual_seed(0)
        model = variants.create("vae", d_in=16, d_sae=8, beta=50.0, free_bits=free_bits, kl_warmup=warmup)
        fit(model, x, steps=100)
        with torch.no_grad():
            mu = model.encode(x[:4096]).double()                                        # [n, 8]
        brute = int(sum(float(((mu[:, j] - mu[:, j].mean()) ** 2).sum() / (len(mu) - 1)) > 0.01
                        for j in range(mu.shape[1])))
        reported = model.extra_metrics(x[:4096] * model.input_scale)["active_units"]
        assert reported == brute
        return reported

    assert active(0.0, 0.0) <= 1
    assert active(0.5, 0.5) >= 4


# ---- fvu_sparse ----------------------------------------------------------------------------------------
def test_kl_reports_the_fvu_of_its_thresholded_codes():
    from sae.evaluate.scores import score
    x = sparse_data(n=2048)
    torch.manual_seed(0)
    model = variants.create("kl", d_in=32, d_sae=64)
    fit(model, x, steps=20)
    result = score(model, [x[:1000], x[1000:]])
    with torch.no_grad():
        codes = model.encode(x)
        x_sparse = model.decode(codes * (codes > 0.5)).double()
    x64 = x.double()
    expected = float((x64 - x_sparse).pow(2).sum() / (x64 - x64.mean(dim=0)).pow(2).sum())
    assert result["fvu_sparse"] == pytest.approx(expected, rel=1e-6)
    assert result["fvu_sparse"] != pytest.approx(result["fvu"], rel=1e-3)
    assert "fvu_sparse" not in score(variants.create("topk", d_in=32, d_sae=64, k=4), [x])   # exact zeros


# ---- --init-from -------------------------------------------------------------------------------------
def _fvu(model, x):
    with torch.no_grad():
        x_hat = model.decode(model.encode(x)).double()
    x = x.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())


@pytest.mark.parametrize("variant,knobs", [("topk", {"k": 4}), ("jumprelu", {}), ("gated", {}), ("l1", {})])
def test_init_from_keeps_the_source_function_at_step_0(tmp_path, variant, knobs):
    from sae.runs import save_run
    from sae.train.finetune import start_from
    x = sparse_data(n=4096)
    torch.manual_seed(0)
    source = variants.create(variant, d_in=32, d_sae=64, **knobs)
    fit(source, x, steps=10)
    save_run(source, tmp_path / "source", {})
    other = ActivationStore.from_tensors(tmp_path / "store", 7.0 * sparse_data(n=4096, seed=1))   # another scale
    model = start_from(tmp_path / "source", variants.get(variant), other)
    assert float(model.input_scale) == pytest.approx(float(source.input_scale) / 7.0, rel=0.05)   # rescaled
    held = other.rows(None, torch.arange(4096)[-1024:])
    assert _fvu(model, held) == pytest.approx(_fvu(source, held), rel=1e-4, abs=1e-6)


def test_init_from_through_training_and_bad_sources(tmp_path):
    from sae.runs import save_run
    from sae.train.trainer import train_on_store
    x = sparse_data(n=4096)
    torch.manual_seed(0)
    source = variants.create("topk", d_in=32, d_sae=64, k=4)
    fit(source, x, steps=10)
    save_run(source, tmp_path / "source", {})
    store = ActivationStore.from_tensors(tmp_path / "store", sparse_data(n=4096, seed=2))
    summary = train_on_store(store, "batchtopk", tmp_path / "run", TrainOptions(tokens=512, batch_size=256,
                             checkpoint_every=0, device="cpu", eval_rows=0), init_from=tmp_path / "source",
                             progress=False)
    assert summary["steps"] == 2
    from sae.files import read_json
    assert read_json(tmp_path / "run" / "config.json")["init_from"] == str(tmp_path / "source")
    with pytest.raises(UserError, match=r"topk SAE \(topk family\).*--variant is l1 \(relu family\)"):
        train_on_store(store, "l1", tmp_path / "bad1", TrainOptions(tokens=512, batch_size=256, device="cpu"),
                       init_from=tmp_path / "source", progress=False)
    wide = ActivationStore.from_tensors(tmp_path / "wide", torch.randn(1024, 48))
    with pytest.raises(UserError, match="has d_in 32, but the store's activations have d_model 48"):
        train_on_store(wide, "topk", tmp_path / "bad2", TrainOptions(tokens=512, batch_size=256, device="cpu"),
                       init_from=tmp_path / "source", progress=False)


# ---- absorption (planted) ----------------------------------------------------------------------------
LETTERS = "satm"


def _planted_vocabulary(seed=0):
    """80 words starting with s, 20 each with a, t, m; rows are e_letter + e_word + noise, 12 rows a word."""
    rng = np.random.default_rng(seed)
    words = [(letter, letter + "".join(rng.choice(list("bcdefghijklnopqruvwxyz"), 5)))
             for letter in LETTERS for _ in range(80 if letter == "s" else 20)]
    vocab = ["<bos>"] + [" " + w for _, w in words]
    d_in = 256
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=torch.Generator().manual_seed(seed)))[0].T
    letter_dir = {letter: basis[i] for i, letter in enumerate(LETTERS)}
    word_dir = basis[len(LETTERS):len(LETTERS) + len(words)]                              # [words, d_in]
    token_ids = torch.arange(1, len(words) + 1).repeat_interleave(12)                    # [n]
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.stack([letter_dir[words[t - 1][0]] + word_dir[t - 1] for t in token_ids.tolist()])
    rows = rows + 0.02 * torch.randn(rows.shape, generator=g)
    doc_ids = torch.arange(len(rows))                   # each row its own document: a fine probe split
    return vocab, words, letter_dir, word_dir, rows, token_ids, doc_ids


def _planted_sae(words, letter_dir, word_dir, absorbed_letter: str | None, kept: int = 4):
    """A relu SAE with one latent per letter and one per word. Absorbed: the letter latent fires on only `kept`
    of its words; every other word's latent carries the letter direction in its decoder instead."""
    d_in = word_dir.shape[1]
    model = variants.create("relu", d_in=d_in, d_sae=len(LETTERS) + len(words))
    enc = torch.zeros(d_in, model.d_sae)
    dec = torch.zeros(model.d_sae, d_in)
    bias = torch.full((model.d_sae,), -0.5)
    for i, letter in enumerate(LETTERS):
        enc[:, i], dec[i] = letter_dir[letter], letter_dir[letter]
    seen = 0
    for w, (letter, _) in enumerate(words):
        j = len(LETTERS) + w
        enc[:, j], dec[j] = word_dir[w], word_dir[w]
        if letter == absorbed_letter:
            if seen < kept:        # the letter latent still fires on these: e_letter + e_word passes 1.5
                enc[:, LETTERS.index(letter)] += word_dir[w]
            else:
                dec[j] = torch.nn.functional.normalize(letter_dir[letter] + word_dir[w], dim=0)
            seen += 1
    if absorbed_letter is not None:
        bias[LETTERS.index(absorbed_letter)] = -1.5
    with torch.no_grad():
        model.W_enc.copy_(enc)
        model.b_enc.copy_(bias)
        model.W_dec.copy_(dec)
        model.b_dec.zero_()
    return model.eval()


def counting(monkeypatch, module, name: str) -> list:
    """Wrap module.name to record its calls, with the process's probe cache emptied (sae.evaluate.probing)."""
    from sae.evaluate import probing
    monkeypatch.setattr(probing, "_FITTED", {})
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_absorption_scores_a_planted_absorbed_latent_high_and_a_clean_one_low(monkeypatch):
    from sae.evaluate import absorption
    from sae.evaluate.absorption import absorption_score
    fits = counting(monkeypatch, absorption, "_letter_probe")
    vocab, words, letter_dir, word_dir, rows, token_ids, doc_ids = _planted_vocabulary()
    clean = absorption_score(_planted_sae(words, letter_dir, word_dir, None), rows, token_ids, doc_ids, vocab)
    absorbed = absorption_score(_planted_sae(words, letter_dir, word_dir, "s"), rows, token_ids, doc_ids, vocab)
    assert clean["absorption_probe_accuracy"] > 0.95
    assert clean["absorption"] < 0.05 and clean["absorption_per_letter"]["s"]["absorption"] < 0.05
    assert absorbed["absorption_per_letter"]["s"]["absorption"] >= 0.9
    assert absorbed["absorption_per_letter"]["s"]["full_rate"] >= 0.9
    assert absorbed["absorption_per_letter"]["s"]["main_latents"] == [LETTERS.index("s")]
    for letter in "atm":       # the other letters stay clean
        assert absorbed["absorption_per_letter"][letter]["absorption"] < 0.05
    assert absorbed["absorption"] == pytest.approx(
        np.mean([absorbed["absorption_per_letter"][k]["absorption"] for k in LETTERS]))
    assert len(fits) == 1             # the letter probe reads the activations, not the SAE: fitted once for both


def test_mean_gaps_equal_the_per_group_means():
    from sae.evaluate.absorption import mean_gaps
    rng = np.random.default_rng(0)
    codes = rng.random((300, 40)).astype(np.float32)
    groups = rng.choice(list("abc"), 300)
    got = mean_gaps(codes, groups, ["a", "b", "c"])
    for row, name in enumerate("abc"):
        want = codes[groups == name].mean(axis=0) - codes[groups != name].mean(axis=0)
        np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-5)


# ---- TPP (planted) -----------------------------------------------------------------------------------
def test_tpp_with_label_latents_scores_high_and_without_them_low(monkeypatch):
    from sae.evaluate import tpp
    from sae.evaluate.tpp import tpp_score
    fits = counting(monkeypatch, tpp, "balanced_probe")
    g = torch.Generator().manual_seed(0)
    d_in, n_labels, n_docs = 24, 4, 400
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0].T
    labels = torch.arange(n_docs) % n_labels
    raw = 2.0 * basis[labels] + 0.3 * torch.randn(n_docs, d_in, generator=g)             # [docs, d_in]
    doc_ids = np.arange(n_docs)
    # codes: one latent per label (decoder = its direction) and the rest of the space as other latents
    W_dec = basis                                                                          # [d_sae = d_in, d_in]
    codes = raw @ basis.T                                                                  # exact: raw = codes W_dec
    labelled = tpp_score(doc_ids, labels.numpy(), codes.numpy(), raw.numpy(), W_dec, n_latents=1)
    assert labelled["tpp"] >= 0.9 and labelled["tpp_targeted_drop"] > 0.4
    # an SAE whose latents mix every label direction: ablating any one touches every probe alike
    mixing = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0]
    W_mixed = mixing.T @ basis
    mixed = tpp_score(doc_ids, labels.numpy(), (raw @ W_mixed.T).numpy(), raw.numpy(), W_mixed, n_latents=1)
    assert mixed["tpp"] < labelled["tpp"] - 0.5
    assert math.isfinite(mixed["tpp_raw"])
    assert len(fits) == n_labels      # one probe per label on the raw activations, shared by both SAEs


def test_gated_p_annealing_knob_and_its_penalty():
    with pytest.raises(UserError, match="--p-end must be in"):
        variants.create("gated", d_in=8, d_sae=16, p_end=0.0)
    from sae.variants.base import StepContext
    torch.manual_seed(0)
    model = variants.create("gated", d_in=8, d_sae=16, p_end=0.5, l1_coefficient=1.0)
    x = torch.randn(32, 8)
    gate = torch.relu(model.paths(x)[0])
    halfway = model.training_loss(x, x, StepContext(progress=0.5))
    expected = gate.detach().pow(0.75).sum(dim=1).mean()          # p = 1 + (0.5 − 1) · 0.5
    assert float(halfway.terms["l1"]) == pytest.approx(float(expected), rel=1e-5)
