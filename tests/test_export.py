"""`sae export`: SAELens's layout (checked against an independent implementation of SAELens's forward
pass, and against SAELens itself where it is installed), sparsify's layout, refusals, multi-layer runs."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae import variants
from sae.cli import main
from sae.errors import UserError
from sae.runs import save_run

SAELENS_VARIANTS = ["l1", "topk", "gated", "jumprelu", "batchtopk", "matryoshka"]
EXPECTED_ARCH = {"l1": "standard", "topk": "topk", "gated": "gated", "jumprelu": "jumprelu",
                 "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
D_IN, D_SAE = 16, 64


# ---- an independent SAELens forward pass, written from SAELens's documented semantics ----------
def saelens_reference(folder, x):
    """(codes, x_hat) of the SAE in `folder` as SAELens computes them (cfg.json + sae_weights.safetensors)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    x_c = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (x_c @ w["W_enc"] + w["b_gate"]) > 0
        magnitude = torch.relu(x_c @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
        codes = gate.float() * magnitude
    else:
        pre = x_c @ w["W_enc"] + w["b_enc"]
        if arch == "standard":
            codes = torch.relu(pre)
        elif arch == "topk":
            top = pre.topk(cfg["k"], dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        elif arch == "jumprelu":
            codes = torch.relu(pre) * (pre > w["threshold"]).float()
        else:
            raise AssertionError(arch)
    if "finetuning_scaling_factor" in w:
        return codes, (codes * w["finetuning_scaling_factor"]) @ w["W_dec"] + w["b_dec"]
    return codes, codes @ w["W_dec"] + w["b_dec"]


def need_variant(name):
    if name not in variants.load_all():
        pytest.skip(f"variant {name} is not in the registry yet")


@torch.no_grad()
def random_model(name, seed=0, scale=2.5, **knobs):
    """A variant with every parameter moved off its initialisation and a non-trivial input scale."""
    need_variant(name)
    torch.manual_seed(seed)
    knobs = {"k": 8, **knobs} if "k" in variants.get(name).KNOBS else knobs
    model = variants.create(name, d_in=D_IN, d_sae=D_SAE, **knobs)
    for pname, param in model.named_parameters():
        if "threshold" in pname:
            continue
        param.add_(torch.randn_like(param) * (0.3 if param.ndim else 0.05))
    for bname, buf in model.named_buffers():
        if "threshold" in bname and buf.is_floating_point():
            buf.copy_((0.05 + 0.3 * torch.rand_like(buf)) if "log" not in bname else (0.05 + 0.3 * torch.rand_like(buf)).log())
    for pname, param in model.named_parameters():
        if "log_threshold" in pname:
            param.copy_((0.05 + 0.3 * torch.rand_like(param)).log())
        elif "threshold" in pname:
            param.copy_(0.05 + 0.3 * torch.rand_like(param))
    model.input_scale.fill_(scale)
    return model.eval()


def make_run(tmp_path, name, folder="run", **kw):
    model = random_model(name, **kw)
    save_run(model, tmp_path / folder, {"layer": 3, "site": "resid_post", "model": "smollm2", "store": None})
    return model, tmp_path / folder


def raw_inputs(n=200, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, D_IN) * 3.0 + 1.0   # raw units, far from the scaled ones


@pytest.mark.parametrize("name", SAELENS_VARIANTS)
def test_saelens_export_matches_saelens_semantics_and_reloads(tmp_path, name):
    model, run = make_run(tmp_path, name)
    with pytest.raises(SystemExit) as done:
        main(["export", str(run), "--format", "saelens", str(tmp_path / "out")])
    assert done.value.code == 0
    out = tmp_path / "out"
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == EXPECTED_ARCH[name]
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (D_IN, D_SAE, "none")
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    weights = load_file(str(out / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (D_IN, D_SAE) and weights["W_dec"].shape == (D_SAE, D_IN)
    if cfg["architecture"] == "jumprelu":
        assert weights["threshold"].shape == (D_SAE,)
    x = raw_inputs()
    with torch.no_grad():
        codes, x_hat = model.encode(x), model.decode(model.encode(x))
        ref_codes, ref_x_hat = saelens_reference(out, x)
        assert (codes > 0).float().mean() > 0.01  # the comparison is not between two zero codes
        torch.testing.assert_close(ref_codes, codes, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ref_x_hat, x_hat, rtol=1e-4, atol=1e-4)
        loaded = sae.load(out)
        assert isinstance(loaded, variants.SAE) and loaded.d_in == D_IN and loaded.d_sae == D_SAE
        torch.testing.assert_close(loaded.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.W_dec, model.W_dec_raw, rtol=1e-6, atol=1e-6)
    assert loaded.run_config["layer"] == 3 and loaded.run_config["site"] == "resid_post"
    assert loaded.run_config["model"] == "smollm2"


@pytest.mark.parametrize("name", SAELENS_VARIANTS)
def test_saelens_itself_loads_the_export(tmp_path, name):
    sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed (it is not a dependency)")
    model, run = make_run(tmp_path, name)
    from sae.export import export
    out = export(run, tmp_path / "out", "saelens")
    loader = getattr(sae_lens.SAE, "load_from_disk", None) or sae_lens.SAE.load_from_pretrained
    theirs = loader(str(out), device="cpu")
    x = raw_inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), model.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), model.decode(model.encode(x)), rtol=1e-4, atol=1e-4)


def test_sparsity_file_from_analysis_density(tmp_path):
    import pandas as pd
    model, run = make_run(tmp_path, "l1")
    (run / "analysis").mkdir()
    density = torch.rand(D_SAE).double() * 0.1
    density[5] = 0.0  # a dead latent: log10(0 + 1e-10) = -10
    pd.DataFrame({"feature": list(range(D_SAE))[::-1], "density": density.flip(0).tolist(),
                  "max_activation": [1.0] * D_SAE}).to_parquet(run / "analysis" / "features.parquet")
    from sae.export import export
    out = export(run, tmp_path / "out", "saelens")
    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (D_SAE,)
    assert sparsity[5].item() == pytest.approx(-10.0)
    expected = [math.log10(d + 1e-10) for d in density.tolist()]
    assert sparsity.tolist() == pytest.approx(expected, rel=1e-5)


def test_no_analysis_means_no_sparsity_file(tmp_path):
    _, run = make_run(tmp_path, "l1")
    from sae.export import export
    out = export(run, tmp_path / "out", "saelens")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_export_refuses_non_empty_output_and_unknown_variants(tmp_path, capsys):
    _, run = make_run(tmp_path, "l1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit) as done:
        main(["export", str(run), "--format", "saelens", str(out)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(SystemExit) as done:       # --force never replaces a folder holding anything else
        main(["export", str(run), "--format", "saelens", str(out), "--force"])
    assert done.value.code == 2 and "holds other files" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    exported = tmp_path / "exported"
    for _ in range(2):                            # ... but replaces its own export of that format
        with pytest.raises(SystemExit) as done:
            main(["export", str(run), "--format", "saelens", str(exported), "--force"])
        assert done.value.code == 0 and (exported / "cfg.json").is_file()
    with pytest.raises(SystemExit) as done:       # an export of another format is not this one's to replace
        main(["export", str(run), "--format", "html", str(exported), "--force"])
    assert done.value.code == 2 and (exported / "cfg.json").is_file()
    with pytest.raises(SystemExit) as done:       # nor a folder that contains the run
        main(["export", str(run), "--format", "saelens", str(tmp_path), "--force"])
    assert done.value.code == 2 and (run / "sae.safetensors").is_file()
    need_variant("linear")
    linear = variants.create("linear", d_in=D_IN, d_sae=4)
    save_run(linear, tmp_path / "lin", {"layer": 0, "site": "resid_post"})
    with pytest.raises(UserError, match="no SAELens equivalent"):
        from sae.export import export
        export(tmp_path / "lin", tmp_path / "lin_out", "saelens")
    assert not (tmp_path / "lin_out").exists()  # nothing half-written


def test_multi_layer_run_exports_a_release_layout(tmp_path):
    need_variant("topk")
    models = {}
    for layer in (2, 5):
        models[layer] = random_model("topk", seed=layer)
        save_run(models[layer], tmp_path / "run" / f"layer_{layer}", {"layer": layer, "site": "mlp_out"})
    from sae.export import export
    out = export(tmp_path / "run", tmp_path / "out", "saelens")
    assert sorted(p.name for p in out.iterdir()) == ["blocks.2.hook_mlp_out", "blocks.5.hook_mlp_out"]
    x = raw_inputs()
    for layer, model in models.items():
        loaded = sae.load(out, subfolder=f"blocks.{layer}.hook_mlp_out")
        assert loaded.run_config["layer"] == layer and loaded.run_config["site"] == "mlp_out"
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=1e-5, atol=1e-5)


def test_sparsify_export_round_trip(tmp_path):
    model, run = make_run(tmp_path, "topk")
    from sae.export import export
    out = export(run, tmp_path / "out", "sparsify")
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (D_IN, D_SAE, 8, "topk")
    w = load_file(str(out / "sae.safetensors"))
    x = raw_inputs()
    # sparsify's own forward: topk of relu((x - b_dec) @ encoder.weight.T + encoder.bias)
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(cfg["k"], dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    with torch.no_grad():
        torch.testing.assert_close(codes, model.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(codes @ w["W_dec"] + w["b_dec"], model.decode(model.encode(x)), rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="TopK SAEs only"):
        _, l1_run = make_run(tmp_path, "l1", folder="l1run")
        export(l1_run, tmp_path / "l1out", "sparsify")


def test_html_export_needs_analysis(tmp_path):
    _, run = make_run(tmp_path, "l1")
    with pytest.raises(UserError, match="sae analyze"):
        from sae.export import export
        export(run, tmp_path / "html", "html")


def test_html_export_writes_static_pages(tmp_path):
    from sae.analyze.pipeline import analyze
    from sae.store import ActivationStore
    _, run = make_run(tmp_path, "topk")
    torch.manual_seed(0)
    store = ActivationStore.from_tensors(tmp_path / "store", torch.randn(2000, D_IN) * 3, layer=3,
                                         site="resid_post")
    analyze(run, store, log=lambda *a, **k: None)
    with pytest.raises(SystemExit) as done:
        main(["export", str(run), "--format", "html", str(tmp_path / "html")])
    assert done.value.code == 0
    pages = sorted(p.relative_to(tmp_path / "html") for p in (tmp_path / "html").rglob("*.html"))
    assert any(p.name == "index.html" for p in pages) and len(pages) > 1
    assert not list(tmp_path.glob(".html.tmp*"))  # the staging folder was renamed into place
