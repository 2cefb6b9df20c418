"""Conditional generation: declared conditions, one null per condition, guidance per condition, refusals, control
check, and a tiny conditional run on demo data through the bundle's commands."""

from __future__ import annotations

import json
import math

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from scripts import text
from scripts.conditioning import (
    ConditionedUNet,
    ConditionEncoder,
    Conditions,
    condition_samples,
    fit_conditions,
    read_condition_table,
)
from scripts.evaluation.control import ControlCheck, control_summary
from scripts.sampling import LatentDiffusionPipeline, guidance_coefficients
from tests.helpers import COMMON, overrides_for, run_bundle

DECLARED = {
    "lesion_count": {"field": "params.lesion_count", "kind": "continuous"},
    "sex": {"field": "sex", "kind": "categorical"},
    "ventricles": {"field": "params.ventricle_volume_ml"},
    "prompt": {"kind": "text", "template": "head MRI, {lesion_count} lesions, {ventricles:size} ventricles"},
}
ITEMS = [{"image": f"im{i}.nii.gz", "sex": "FM"[i % 2],
          "params": {"lesion_count": i % 4, "ventricle_volume_ml": 5.0 + i}} for i in range(12)]


def fitted(cond_drop_prob=0.1) -> Conditions:
    return fit_conditions(DECLARED, ITEMS, cond_drop_prob)


def tiny_conditioned_unet(conditions: Conditions, seed: int = 0) -> ConditionedUNet:
    torch.manual_seed(seed)
    unet = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 8),
                              attention_levels=(False, True), num_res_blocks=1, norm_num_groups=4, num_head_channels=8,
                              with_conditioning=True, cross_attention_dim=16)
    with torch.no_grad():  # MONAI zero-initialises the output and attention projections: make them count
        for p in unet.parameters():
            if not p.any():
                p.normal_(std=0.3)
    return ConditionedUNet(unet, ConditionEncoder(conditions, dim=16, text_layers=1, text_heads=2)).eval()


def guided(net, conditions, guidance_scale) -> LatentDiffusionPipeline:
    """A pipeline for the denoiser alone (no decoder)."""
    return LatentDiffusionPipeline(net, DDIMScheduler(20), None, 1.0, 2, guidance_scale=guidance_scale,
                                   conditions=conditions)


def test_statistics_and_vocabularies_are_fitted_and_survive_the_record():
    conditions = fitted()
    lesion, sex, vent, prompt = conditions.specs
    assert (lesion["mean"], lesion["min"], lesion["max"], lesion["integer"]) == (1.5, 0.0, 3.0, True)
    assert sex["vocabulary"] == ["F", "M"] and vent["min"] == 5.0 and vent["max"] == 16.0
    assert prompt["vocabulary"][:2] == [text.PAD, text.UNK] and {"large", "lesions", "0", "3"} <= set(
        prompt["vocabulary"])
    assert prompt["max_tokens"] == 6 and conditions.width == 3 + 6
    # the record holds plain JSON; conditions read back from it encode identically
    reread = Conditions.from_record(json.loads(json.dumps({"conditions": conditions.to_record()})))
    request = [{"lesion_count": 2, "sex": "M", "prompt": "head MRI, 2 lesions, large ventricles"}, {"ventricles": 7}]
    torch.testing.assert_close(reread.rows(request), conditions.rows(request), equal_nan=True)
    row = conditions.attach(ITEMS[:1])[0]
    assert "params" not in row and row["condition"].shape == (9,)
    assert conditions.describe_row(row["condition"]) == {"lesion_count": 0.0, "sex": "F", "ventricles": 5.0,
                                                         "prompt": "head mri 0 lesions small ventricles"}
    with pytest.raises(ValueError, match="declares no conditions: these weights are unconditional"):
        Conditions.from_record({})


def test_each_null_is_used_at_its_configured_rate_independently():
    conditions = fitted({"lesion_count": 0.1, "sex": 0.5, "ventricles": 0.0, "prompt": 0.3})
    rows = conditions.rows([{"lesion_count": 1, "sex": "F", "ventricles": 6, "prompt": "head mri"}] * 20000)
    dropped = ~conditions.present(conditions.drop(rows, torch.Generator().manual_seed(0)))
    rates = dropped.float().mean(0)
    torch.testing.assert_close(rates, torch.tensor([0.1, 0.5, 0.0, 0.3]), atol=0.012, rtol=0)
    both = (dropped[:, 0] & dropped[:, 1]).float().mean()
    assert abs(float(both) - 0.05) < 0.008, "conditions are dropped independently"


def test_guidance_one_is_the_conditional_and_zero_the_unconditional_prediction_per_condition():
    conditions = fitted()
    net = tiny_conditioned_unet(conditions)
    x, t = torch.randn(1, 2, 4, 4, 4), torch.tensor([7])
    full = {"lesion_count": 2, "sex": "M", "ventricles": 9.0, "prompt": "head MRI, 2 lesions, large ventricles"}
    with torch.no_grad():
        null = net(x, t, conditions.rows([{}]))
        for name in conditions.names:
            assert not torch.allclose(net(x, t, conditions.rows([{name: full[name]}])), null), name
        for name in conditions.names:
            alone = conditions.rows([{name: full[name]}])
            for w, expected in ((1.0, net(x, t, alone)), (0.0, null)):
                torch.testing.assert_close(guided(net, conditions, {name: w}).denoiser(alone)(x, t), expected,
                                           msg=f"{name} at {w}")
            torch.testing.assert_close(guided(net, conditions, {name: 3.0}).denoiser(alone)(x, t),
                                       null + 3.0 * (net(x, t, alone) - null), atol=1e-4, rtol=1e-4)
        rows = conditions.rows([full])
        plain = net(x, t, rows)
        for w, expected, calls in ((1.0, plain, 1), (0.0, null, 1), (2.5, null + 2.5 * (plain - null), 2)):
            pipe = guided(net, conditions, w)
            torch.testing.assert_close(pipe.denoiser(rows)(x, t), expected, atol=1e-4, rtol=1e-4)
            assert pipe.network_calls_per_step(rows) == calls
        # mixed scales: the chain rule over the given conditions, in declaration order
        scales = {"lesion_count": 4.0, "sex": 1.0, "ventricles": 0.0, "prompt": 2.0}
        pipe = guided(net, conditions, scales)
        prefixes = [net(x, t, conditions.rows([{k: full[k] for k in conditions.names[:k]}])) for k in range(5)]
        w = list(scales.values())
        expected = prefixes[0] + sum(w[k] * (prefixes[k + 1] - prefixes[k]) for k in range(4))
        torch.testing.assert_close(pipe.denoiser(rows)(x, t), expected, atol=1e-4, rtol=1e-4)
        assert pipe.network_calls_per_step(rows) == 5
    assert guidance_coefficients(torch.tensor([[True, False, True]]), [2.0, 9.0, 2.0]).tolist() == [[-1, 0, 2, 0]]


def test_a_conditional_model_samples_unconditionally_and_with_any_subset():
    conditions = fitted()
    net = tiny_conditioned_unet(conditions)
    pipe = guided(net, conditions, 2.0)
    noise = torch.randn(2, 2, 4, 4, 4)
    with torch.no_grad():
        unconditional = pipe.sample(noise, progress=False)
        all_null = pipe.sample(noise, condition=conditions.rows([{}, {}]), progress=False)
        subset = pipe.sample(noise, condition=conditions.rows([{"sex": "F"}, {"lesion_count": 3}]), progress=False)
    torch.testing.assert_close(unconditional, all_null)
    assert unconditional.shape == subset.shape and not torch.allclose(unconditional, subset)
    assert pipe.network_calls_per_step() == 1


def test_prompts_tokenise_and_round_trip():
    vocab = text.vocabulary(["Head MRI, 2 lesions, large ventricles", "head MRI, 0 lesions"])
    ids = text.encode("head MRI, 2 lesions, large ventricles", vocab, 8)
    assert len(ids) == 8 and ids[-2:] == [0, 0]
    assert text.decode(ids, vocab) == "head mri 2 lesions large ventricles"
    assert text.tokenize("Head-MRI: 2.5 ml!") == ["head", "mri", "2.5", "ml"]
    assert text.encode("head tumour", vocab, 4, strict=False) == [vocab.index("head"), 1, 0, 0]
    assert text.fill_template("{n} lesions, {v:size} ventricles", {"n": 2.0, "v": 30.0}, {"v": [5, 10]}) == (
        "2 lesions, large ventricles")
    assert text.fill_template("{n} lesions", {"n": None}, {}) is None
    with pytest.raises(ValueError, match=r"prompt: the word\(s\) \['tumour'\] of 'head tumour' are not in the"):
        text.encode("head tumour", vocab, 4)
    with pytest.raises(ValueError, match="has 6 words, more than the 4 the model was trained with"):
        text.encode("head MRI, 2 lesions, large ventricles", vocab, 4)


def test_every_bad_request_is_refused_with_one_line(tmp_path):
    conditions = fitted()
    bad = {
        "unknown condition\\(s\\) \\['age'\\]; the weights were trained with": {"age": 40},
        "'X' is not a category of condition 'sex' \\(the training split has \\['F', 'M'\\]\\)": {"sex": "X"},
        "lesion_count=9 is outside the training range \\[0, 3\\] by more than the margin \\(0.1 of the range: "
        "\\[-0.3, 3.3\\]\\)": {"lesion_count": 9},
        "condition 'ventricles' is continuous; 'big' is not a number": {"ventricles": "big"},
        "the word\\(s\\) \\['tumour'\\]": {"prompt": "head tumour"},
    }
    for message, request in bad.items():
        with pytest.raises(ValueError, match=message) as e:
            condition_samples(conditions, 2, condition=request)
        assert "\n" not in str(e.value)
    assert condition_samples(conditions, 1, condition={"lesion_count": 3.3})[0]["condition"] == {"lesion_count": 3.3}
    with pytest.raises(ValueError, match="guidance_scale names \\['age'\\], which are not conditions"):
        guided(None, conditions, {"age": 2})
    table = tmp_path / "rows.csv"
    table.write_text("lesion_count,sex,age\n1,F,40\n")
    with pytest.raises(ValueError, match="condition_table .*rows.csv, sample 0: unknown condition\\(s\\) \\['age'\\]"):
        condition_samples(conditions, 2, condition_table=str(table))
    with pytest.raises(ValueError, match="condition_table 'missing.csv' does not exist"):
        read_condition_table("missing.csv")
    with pytest.raises(ValueError, match="condition_fields#size: no training item has the field 'params.size'"):
        fit_conditions({"size": {"field": "params.size"}}, ITEMS)
    with pytest.raises(ValueError, match="cond_drop_prob names \\['age'\\]"):
        fit_conditions(DECLARED, ITEMS, {"age": 0.5})
    with pytest.raises(ValueError, match="condition_fields#sex: field 'sex' holds non-numeric values"):
        fit_conditions({"sex": {"kind": "continuous"}}, ITEMS)
    with pytest.raises(ValueError, match="the template names 'age', which is not a declared covariate"):
        fit_conditions({"prompt": {"kind": "text", "template": "{age} years"}}, ITEMS)


def test_condition_tables_give_one_sample_per_row_and_empty_cells_are_null(tmp_path):
    conditions = fitted()
    csv_table, json_table = tmp_path / "rows.csv", tmp_path / "rows.json"
    csv_table.write_text("lesion_count,sex\n1,F\n,M\n3,\n")
    json_table.write_text(json.dumps([{"lesion_count": 1, "sex": "F"}, {"sex": "M"}, {"lesion_count": 3}]))
    for table in (csv_table, json_table):
        samples = condition_samples(conditions, 99, seed=5, condition={"ventricles": 8}, condition_table=str(table))
        assert [s["index"] for s in samples] == [0, 1, 2] and {s["seed"] for s in samples} == {5}
        present = conditions.present(conditions.rows([s["condition"] for s in samples]))
        assert present[:, :3].tolist() == [[True, True, True], [False, True, True], [True, False, True]]


def test_control_summary_gives_mae_per_condition_and_exact_match_for_counts():
    samples = [{"condition": {"lesion_count": 2, "v": 10.0}, "measured": {"lesion_count": 2.0, "v": 12.0}},
               {"condition": {"lesion_count": 1}, "measured": {"lesion_count": 3.0, "v": 9.0}}]
    summary = control_summary(samples, {"v": (0.0, 20.0)})
    assert summary["lesion_count"] == {"n": 2, "mae": 1.0, "exact_match": 0.5}
    assert summary["v"]["n"] == 1 and summary["v"]["mae"] == 2.0 and summary["v"]["mae_percent_of_range"] == 10.0
    check = ControlCheck(lambda volume, spacing: {"count": float(volume.sum())}, {"lesion_count": "count"})
    assert check(torch.ones(1, 2, 2, 2).numpy(), (1.0, 1.0, 1.0)) == {"lesion_count": 8.0}
    with pytest.raises(ValueError, match="control_quantities names \\['volume'\\], which the control measure"):
        ControlCheck(lambda volume, spacing: {"count": 0.0}, {"v": "volume"})(torch.ones(2, 2, 2).numpy(), (1,) * 3)


# ---- a tiny conditional run on demo data, through the README's commands -----------------------------------------

STAGE2_CONDITIONAL = [COMMON, "configs/train_diffusion.json", "configs/train_diffusion_conditional.json"]
GENERATE_CONDITIONAL = [COMMON, "configs/inference.json", "configs/inference_conditional.json"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conditional")
    run_bundle([COMMON, "configs/train_autoencoder.json"], overrides_for(tmp, max_epochs=1, val_interval=5))
    run_bundle(STAGE2_CONDITIONAL, overrides_for(tmp, stage2=True, max_epochs=1, val_interval=5, train_batch_size=3,
                                                 lr_warmup_iterations=1, condition_dim=16))
    return tmp


def _generate(tmp, check=True, **extra):
    ov = overrides_for(tmp, generate=True, num_inference_steps=2, condition_dim=16, **extra)
    return run_bundle(GENERATE_CONDITIONAL, ov, check=check)


def _manifest(tmp) -> dict:
    return json.loads((max((tmp / "outputs").glob("generated_*")) / "manifest.json").read_text())


def test_conditional_training_stores_the_conditions_and_the_encoder_with_the_weights(conditional_run):
    tmp = conditional_run
    record = json.loads((tmp / "models" / "model_record.json").read_text())
    names = [s["name"] for s in record["conditions"]]
    assert names == ["lesion_count", "ventricle_volume_ml", "head_volume_ml", "prompt"]
    assert record["condition_name"] == "condition" and record["conditions"][0]["field"] == "params.lesion_count"
    checkpoint = torch.load(tmp / "models" / "checkpoint_diffusion.pt", weights_only=True)
    assert checkpoint["record"]["conditions"] == record["conditions"]
    for name in ("model.pt", "model_ema.pt"):
        weights = torch.load(tmp / "models" / name, weights_only=True)
        assert {"encoder.nulls.0", "encoder.nulls.3", "encoder.embeds.3.words.weight"} <= set(weights), name
        assert any(k.startswith("unet.") for k in weights)
    assert any(k.startswith("encoder.") for k in checkpoint["ema"]) and any(
        k.startswith("encoder.") for k in checkpoint["diffusion"])


def test_conditional_generation_from_a_table_writes_requests_measurements_and_control(conditional_run, tmp_path):
    tmp = conditional_run
    table = tmp_path / "conditions.csv"
    table.write_text("lesion_count,prompt\n2,\"head MRI, 2 lesions, large ventricles\"\n0,\n")
    _generate(tmp, condition_table=str(table), condition={"ventricle_volume_ml": 1.2},
              guidance_scale={"lesion_count": 2.0})
    manifest = _manifest(tmp)
    first, second = manifest["samples"]
    assert first["condition"] == {"lesion_count": 2.0, "ventricle_volume_ml": 1.2,
                                  "prompt": "head mri 2 lesions large ventricles"}
    assert second["condition"] == {"lesion_count": 0.0, "ventricle_volume_ml": 1.2}
    assert first["network_calls_per_step"] == 3 and second["network_calls_per_step"] == 3
    assert manifest["network_calls_per_step"] == 3 and manifest["guidance_scale"]["lesion_count"] == 2.0
    assert set(first["measured"]) == {"lesion_count", "ventricle_volume_ml", "head_volume_ml"}
    assert manifest["control"]["lesion_count"]["n"] == 2 and "exact_match" in manifest["control"]["lesion_count"]
    assert "mae_percent_of_range" in manifest["control"]["ventricle_volume_ml"]
    assert "head_volume_ml" not in manifest["control"], "only requested conditions are summarised"


def test_the_conditional_weights_sample_unconditionally_and_refuse_bad_requests(conditional_run):
    tmp = conditional_run
    _generate(tmp, num_samples=1, guidance_scale=3.0)
    manifest = _manifest(tmp)
    assert manifest["network_calls_per_step"] == 1 and manifest["samples"][0]["condition"] == {}
    assert "control" in manifest and manifest["control"] == {}
    proc = _generate(tmp, check=False, condition={"lesion_count": 40})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ValueError: condition: lesion_count=40 is outside the training range"), last
    assert not math.isnan(manifest["seconds_total"])
    proc = run_bundle([COMMON, "configs/inference.json"], overrides_for(tmp, generate=True, num_samples=1), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ValueError: the diffusion weights were trained with the conditions "
                           "['lesion_count',"), last
    assert "add configs/inference_conditional.json to --config_file" in last
