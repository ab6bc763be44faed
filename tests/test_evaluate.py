"""``python -m soflow_fast.evaluate`` on a folder of sample batches, with a random-weight Inception (the
conftest fixture): results keyed by the reference batch, stored statistics used, inputs checked first, bad
files one error line each while the rest are scored, latent previews refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from soflow_fast import evaluate
from soflow_fast import sample as sample_cli
from soflow_fast.eval.checks import check_decoded_samples, check_sample_batch
from soflow_fast.models import build_model
from tests.utils import truncated_copy, write_image_batch

# stored statistics: FID = |mu - mu_ref|^2 with equal covariances, no sqrtm of 2048 x 2048 matrices
STATS = {"sigma": np.eye(8), "mu_s": np.zeros(3), "sigma_s": np.eye(3)}


def _ref(path, mu: float) -> None:
    write_image_batch(path, 5, seed=0, mu=np.full(8, mu), **STATS)


def _fids(lines: list[str]) -> list[float]:
    return [float(line.split("FID: ")[1].split(",")[0]) for line in lines]


def test_a_new_reference_batch_scores_the_files_again_and_keeps_the_old_lines(inception_weights, tmp_path, capsys):
    samples = tmp_path / "evals"
    samples.mkdir()
    write_image_batch(samples / "step_10.npz", 5, seed=1, mu=np.ones(8), **STATS)
    results = samples / "eval_results.txt"
    authors = "step_10.npz # IS: 1.0, FID: 1.0, sFID: 1.0, prec: 1.0, recall: 1.0"  # no reference: skips nothing
    results.write_text(authors + "\n")
    _ref(tmp_path / "ref_a.npz", 0.0)
    _ref(tmp_path / "ref_b.npz", 3.0)

    def run(ref: str) -> int:
        args = ["--ref_batch", str(tmp_path / ref), "--sample_batch_dir", str(samples)]
        return evaluate.main(
            [*args, "--inception", str(inception_weights), "--inception_sha256=none", "--device", "cpu"]
        )

    assert run("ref_a.npz") == 0
    id_a = evaluate.reference_id(tmp_path / "ref_a.npz")
    lines = results.read_text().splitlines()
    assert lines[0] == authors and lines[1].endswith(f" # ref: ref_a.npz ({id_a})") and len(lines) == 2
    assert run("ref_a.npz") == 0  # the same reference: skipped
    assert f"1 file(s) already in {results} against ref_a.npz ({id_a}), skipped" in capsys.readouterr().out
    assert run("ref_b.npz") == 0  # another reference: scored again, the old lines kept
    id_b = evaluate.reference_id(tmp_path / "ref_b.npz")
    lines = results.read_text().splitlines()
    assert len(lines) == 3 and lines[2].endswith(f" # ref: ref_b.npz ({id_b})") and id_b != id_a
    assert _fids(lines[1:]) == pytest.approx([8.0, 32.0], abs=1e-9)
    # the same name with other contents is another reference too
    _ref(tmp_path / "ref_a.npz", -2.0)
    capsys.readouterr()
    assert run("ref_a.npz") == 0 and "already in" not in capsys.readouterr().out
    lines = results.read_text().splitlines()
    assert len(lines) == 4 and _fids(lines[3:]) == pytest.approx([72.0], abs=1e-9)
    assert evaluate.reference_id(tmp_path / "ref_a.npz") not in (id_a, id_b)
    assert [line.split(" # ")[1].split(", ")[0].split(": ")[0] for line in lines] == ["IS"] * 4  # authors' fields


def test_a_latent_preview_is_refused_with_one_line(inception_weights, tmp_path, capsys):
    """The audit's case: ``sample --npz`` of a latent model without --vae, then evaluate on its folder."""
    net = build_model("DiT-T/2", input_size=8, in_channels=4, num_classes=3)
    torch.save(net.state_dict(), tmp_path / "latent.pt")
    samples = tmp_path / "samples"
    preview = samples / "latent_1step.npz"
    args = ["--official", str(tmp_path / "latent.pt"), "--model=DiT-T/2", "--input-size=8", "--in-channels=4"]
    args += ["--num-classes=3", "--num=6", "--device=cpu", f"--npz={preview}", f"--out={tmp_path / 'g.png'}"]
    assert sample_cli.main(args) == 0
    with np.load(preview) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (6, 8, 8, 3) and "latents" in z.files
    _ref(tmp_path / "ref.npz", 0.0)
    capsys.readouterr()
    argv = ["--ref_batch", str(tmp_path / "ref.npz"), "--sample_batch_dir", str(samples)]
    assert (
        evaluate.main([*argv, "--inception", str(inception_weights), "--inception_sha256=none", "--device", "cpu"]) == 1
    )
    out, err = capsys.readouterr()
    with pytest.raises(ValueError) as info:
        check_sample_batch(preview)
    message = str(info.value)
    assert message.startswith(f"{preview}: a latent preview, not images") and "sample --vae" in message
    assert [line for line in err.splitlines() if "error" in line] == [f"evaluate: error: {message}"]
    assert "IS:" not in out and "reference batch" not in out and not (samples / "eval_results.txt").exists()
    # the same rule before sampling, for the trainer: a latent model without a VAE
    with pytest.raises(ValueError) as info:
        check_decoded_samples(4, None, "eval.eval_reference")
    assert str(info.value).startswith("eval.eval_reference: the samples of a 4-channel latent model without a VAE: ")
    assert "a latent preview, not images" in str(info.value) and "eval.vae" in str(info.value)
    check_decoded_samples(4, "sd-vae-ft-mse", "eval.eval_reference")
    check_decoded_samples(3, None, "eval.eval_reference")
    check_decoded_samples(1, None, "eval.eval_reference")


def test_a_missing_sample_folder_is_an_error(tmp_path):
    _ref(tmp_path / "ref.npz", 0.0)
    for folder, message in (
        (tmp_path / "nodir", f"evaluate: sample batch folder not found: {tmp_path / 'nodir'}"),
        (tmp_path / "ref.npz", f"evaluate: {tmp_path / 'ref.npz'} is not a folder"),
    ):
        with pytest.raises(SystemExit) as info:
            evaluate.main(["--ref_batch", str(tmp_path / "ref.npz"), "--sample_batch_dir", str(folder)])
        assert info.value.code == message  # a message: the exit status is 1


@pytest.mark.slow  # about a minute on 2 cores: four scipy sqrtm of 2048 x 2048 (FID and sFID of two files)
def test_evaluate_writes_eval_results_for_a_folder(inception_weights, tmp_path, capsys):
    from soflow_fast import evaluate

    ref_path = tmp_path / "ref.npz"
    write_image_batch(ref_path, 12, seed=0)
    samples = tmp_path / "evals"
    samples.mkdir()
    write_image_batch(samples / "step_100.npz", 10, seed=1)
    write_image_batch(samples / "step_20.npz", 10, seed=2)
    args = ["--ref_batch", str(ref_path), "--sample_batch_dir", str(samples), "--inception", str(inception_weights)]
    args += ["--inception_sha256=none"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 10 samples in 2048 dimensions: singular covariances
        assert evaluate.main([*args, "--device", "cpu", "--batch-size", "8"]) == 0
    lines = (samples / "eval_results.txt").read_text().splitlines()
    assert [line.split(" # ")[0] for line in lines] == ["step_20.npz", "step_100.npz"]  # by the number in the name
    for line in lines:
        fields = dict(kv.split(": ") for kv in line.split(" # ")[1].split(", "))
        assert list(fields) == ["IS", "FID", "sFID", "prec", "recall"]
        values = {k: float(v) for k, v in fields.items()}
        assert values["IS"] >= 1 and values["FID"] > 0 and values["sFID"] > 0
        assert 0 <= values["prec"] <= 1 and 0 <= values["recall"] <= 1
    assert lines[0] in capsys.readouterr().out
    # a rerun skips the files that eval_results.txt lists
    assert evaluate.main(args) == 0
    assert (samples / "eval_results.txt").read_text().splitlines() == lines
    assert "2 file(s) already in" in capsys.readouterr().out


def test_evaluate_uses_stored_statistics_when_present(tmp_path):
    from soflow_fast import evaluate

    acts = {"pool": np.random.default_rng(0).normal(size=(6, 8)), "spatial": np.ones((6, 3))}
    write_image_batch(tmp_path / "plain.npz", 2, seed=0)
    stats = evaluate.batch_statistics(tmp_path / "plain.npz", acts, None)
    np.testing.assert_allclose(stats["pool"][1], np.cov(acts["pool"], rowvar=False))
    stored = {"mu": np.full(8, 0.5), "sigma": np.eye(8), "mu_s": np.zeros(3), "sigma_s": 2 * np.eye(3)}
    write_image_batch(tmp_path / "ref.npz", 2, seed=0, **stored)
    stats = evaluate.batch_statistics(tmp_path / "ref.npz", acts, None)
    for got, key in [(stats["pool"], "mu"), (stats["spatial"], "mu_s")]:
        np.testing.assert_array_equal(got[0], stored[key])
        np.testing.assert_array_equal(got[1], stored[key.replace("mu", "sigma")])
    # no spatial features and none stored: sFID is reported as not computed, with the reason
    stats = evaluate.batch_statistics(tmp_path / "plain.npz", {"pool": acts["pool"]}, "no hook")
    assert "spatial" not in stats
    metrics = evaluate.evaluate_batch(
        {"pool": acts["pool"]}, stats, {**acts, "logits": np.zeros((6, 4))}, stats, "no hook", "cpu"
    )
    assert metrics["sFID"] == "not computed (no hook)" and abs(metrics["FID"]) < 1e-6


def test_evaluate_checks_reference_and_weights_before_anything(inception_weights, tmp_path, capsys):
    from soflow_fast import evaluate
    from soflow_fast.eval.checks import check_inception_weights, check_reference_batch

    samples = tmp_path / "evals"
    samples.mkdir()  # nothing to evaluate: the inputs are still checked
    write_image_batch(tmp_path / "ref.npz", 4, seed=0)
    np.savez(tmp_path / "ref3.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    for ref, weights, check, bad in (
        ("ref3.npz", inception_weights, check_reference_batch, tmp_path / "ref3.npz"),
        ("ref.npz", tmp_path / "ref.npz", check_inception_weights, tmp_path / "ref.npz"),
    ):
        args = ["--ref_batch", str(tmp_path / ref), "--sample_batch_dir", str(samples), "--inception", str(weights)]
        args += ["--inception_sha256=none"]
        with pytest.raises(SystemExit) as info:
            evaluate.main(args)
        with pytest.raises(ValueError) as direct:
            check(bad)
        assert info.value.code == f"evaluate: {direct.value}"
        assert capsys.readouterr().out == ""


def test_evaluate_skips_hidden_files_and_scores_the_rest_past_bad_ones(inception_weights, tmp_path, capsys):
    """A truncated npz, float32 images and a 3-image batch get one error line each; a hidden part file
    is not a batch; the good files are scored and written; the exit status is 1."""
    from soflow_fast import evaluate

    stats = {"mu": np.zeros(8), "sigma": np.eye(8), "mu_s": np.zeros(3), "sigma_s": np.eye(3)}  # a quick FID
    write_image_batch(tmp_path / "ref.npz", 5, seed=0, **stats)
    samples = tmp_path / "evals"
    samples.mkdir()
    images = write_image_batch(samples / "step_10.npz", 5, seed=1, **{**stats, "mu": np.ones(8)})
    truncated_copy(samples / "step_10.npz", samples / "step_20.npz")
    np.savez(samples / ".step_30.rank0.npz", **{"arr_0.0": images})
    np.savez(samples / "step_40.npz", arr_0=images.astype(np.float32))
    np.savez(samples / "step_50.npz", arr_0=images[:3])
    write_image_batch(samples / "step_60.npz", 5, seed=2, **{**stats, "mu": np.full(8, 2.0)})
    args = ["--ref_batch", str(tmp_path / "ref.npz"), "--sample_batch_dir", str(samples)]
    args += ["--inception", str(inception_weights), "--inception_sha256=none", "--device", "cpu"]
    assert evaluate.main(args) == 1
    out, err = capsys.readouterr()
    lines = (samples / "eval_results.txt").read_text().splitlines()
    assert [line.split(" # ")[0] for line in lines] == ["step_10.npz", "step_60.npz"]
    fids = [float(line.split("FID: ")[1].split(",")[0]) for line in lines]
    assert fids == pytest.approx([8.0, 32.0], abs=1e-9)  # |mu - 0|^2 with equal covariances
    errors = [line for line in err.splitlines() if line.startswith("evaluate: error: ")]
    assert errors == [
        f"evaluate: error: {samples / 'step_20.npz'}: not a readable npz file (BadZipFile: File is not a zip file)",
        f"evaluate: error: {samples / 'step_40.npz'}: 'arr_0' must be uint8 images (N, H, W, 3) as ADM's batches, "
        "got float32 (5, 16, 16, 3)",
        f"evaluate: error: {samples / 'step_50.npz'}: 3 image(s), but precision and recall (k=3 nearest neighbours) "
        "need at least 4",
    ]
    assert "evaluate: 3 of 5 file(s) not scored: step_20.npz, step_40.npz, step_50.npz" in err
    assert ".step_30" not in out + err and "Traceback" not in err
    # a rerun skips the scored files and tries the others again, without building the network for them
    assert evaluate.main(args) == 1
    out, err = capsys.readouterr()
    assert "2 file(s) already in" in out and "3 of 3 file(s) not scored" in err
    assert "reference batch" not in out
    assert (samples / "eval_results.txt").read_text().splitlines() == lines
