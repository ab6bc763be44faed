"""soflow_fast.eval.adm against plain NumPy transcriptions of ADM's evaluator formulas and closed forms;
the Inception features and ``python -m soflow_fast.evaluate`` with a random-weight Inception-v3."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from soflow_fast.eval import adm
from tests.utils import write_image_batch

# ---------------------------------------------------------------------------------------------
# Plain transcriptions of evaluations/evaluator.py (NumPy, float16 distances as TF computes them)
# ---------------------------------------------------------------------------------------------


def ref_fid(acts1: np.ndarray, acts2: np.ndarray, eps: float = 1e-6) -> float:
    mu1, sigma1 = np.mean(acts1, axis=0), np.cov(acts1, rowvar=False)
    mu2, sigma2 = np.mean(acts2, axis=0), np.cov(acts2, rowvar=False)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def ref_inception_score(preds: np.ndarray, split_size: int) -> float:
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def ref_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """max(|u|^2 - 2 u.v + |v|^2, 0) on float16 copies (sums accumulated in float32), float32 if that overflows."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is what the check below catches
        nu = np.square(u16).astype(np.float32).sum(1).astype(np.float16).reshape(-1, 1)
        nv = np.square(v16).astype(np.float32).sum(1).astype(np.float16).reshape(1, -1)
        mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = nu - np.float16(2) * mm + nv
    if not np.isfinite(d).all():
        u32, v32 = u.astype(np.float32), v.astype(np.float32)
        d = np.square(u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + np.square(v32).sum(1)[None, :]
    return np.maximum(d, 0).astype(np.float32)


def ref_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(x):
        d = ref_distances(x, x)
        return np.partition(d, np.arange(k + 1), axis=1)[:, k]

    r_ref, r_sample = radii(ref), radii(sample)
    d = ref_distances(ref, sample)  # (n_ref, n_sample)
    precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
    recall = np.mean(np.any(d <= r_sample[None, :], axis=1))
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_fid_statistics_and_distance_equal_the_transcription():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24)).astype(np.float32)
    b = (rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.5).astype(np.float32)
    mu, sigma = adm.fid_statistics(a)
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), rtol=1e-12)
    fid = adm.fid_from_stats(*adm.fid_statistics(a), *adm.fid_statistics(b))
    np.testing.assert_allclose(fid, ref_fid(a, b), rtol=1e-6)
    assert abs(adm.fid_from_stats(mu, sigma, mu, sigma)) < 1e-8
    torch_stats = adm.fid_statistics(torch.from_numpy(a))
    np.testing.assert_allclose(torch_stats[1], sigma)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    # diagonal covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2.0, size=6), rng.uniform(0.5, 2.0, size=6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(adm.fid_from_stats(m1, np.diag(a), m2, np.diag(b)), expected, rtol=1e-10)
    # S2 = c^2 S1 for a full SPD S1: |m1 - m2|^2 + (1 - c)^2 tr(S1)
    q = rng.normal(size=(6, 6))
    s1 = q @ q.T + 0.1 * np.eye(6)
    expected = np.sum((m1 - m2) ** 2) + (1 - 3.0) ** 2 * np.trace(s1)
    np.testing.assert_allclose(adm.fid_from_stats(m1, s1, m2, 9.0 * s1), expected, rtol=1e-9)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with scalars, as np.atleast_1d/2d make of them
    np.testing.assert_allclose(adm.fid_from_stats(1.0, 4.0, -1.0, 1.0), 4.0 + 1.0, rtol=1e-12)


def test_frechet_distance_singular_fallback_and_imaginary_check(monkeypatch):
    rng = np.random.default_rng(2)
    q = rng.normal(size=(5, 5))
    s1, s2 = q @ q.T, np.diag(rng.uniform(1, 2, size=5))
    real_sqrtm = adm._sqrtm
    calls = []

    def first_not_finite(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(adm, "_sqrtm", first_not_finite)
    with pytest.warns(RuntimeWarning, match="adding 0.001 to the diagonal"):
        got = adm.fid_from_stats(np.zeros(5), s1, np.zeros(5), s2, eps=1e-3)
    # the retry took sqrtm of the product of the offset covariances, the traces stay unshifted
    np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(5)) @ (s2 + 1e-3 * np.eye(5)))
    covmean = real_sqrtm(calls[1]).real
    np.testing.assert_allclose(got, np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), rtol=1e-12)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="imaginary component"):
        adm.fid_from_stats(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="different lengths"):
        adm.fid_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_transcription_and_known_values():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(53, 11)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for split in (5000, 7):  # one split, and uneven splits (the last holds 4 rows)
        np.testing.assert_allclose(adm.inception_score(probs, split), ref_inception_score(probs, split), rtol=1e-12)
    np.testing.assert_allclose(adm.inception_score(np.eye(10)), 10.0, rtol=1e-12)  # confident and diverse
    np.testing.assert_allclose(adm.inception_score(np.full((8, 4), 0.25)), 1.0, rtol=1e-12)  # uninformative


# ---------------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------------


def test_precision_recall_equals_the_transcription_and_ignores_block_shape():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(90, 32)).astype(np.float32)
    sample = (rng.normal(size=(70, 32)) * 1.3 + 0.4).astype(np.float32)
    expected = ref_precision_recall(ref, sample)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where both numbers are informative
    assert adm.precision_recall(ref, sample) == expected
    assert adm.precision_recall(ref, sample, row_batch_size=16, col_batch_size=9) == expected
    assert adm.precision_recall(torch.from_numpy(ref), torch.from_numpy(sample)) == expected
    # the radii are the k-th neighbour distances, self excluded: identical sets are inside each other
    assert adm.precision_recall(ref, ref) == (1.0, 1.0)
    k5 = ref_precision_recall(ref, sample, k=5)
    assert adm.precision_recall(ref, sample, k=5) == k5 and k5 != expected


def test_precision_recall_float16_overflow_falls_back_to_float32():
    rng = np.random.default_rng(5)
    ref = (rng.normal(size=(40, 16)) * 80).astype(np.float32)  # squared norms ~1e5 > float16's 65504
    sample = (rng.normal(size=(30, 16)) * 80 + 20).astype(np.float32)
    u = torch.from_numpy(ref)
    assert not torch.isfinite(adm._sq_dists_half(u, u)).all()
    d = adm.pairwise_sq_distances(u, u)
    np.testing.assert_allclose(d.numpy(), ref_distances(ref, ref), rtol=1e-6, atol=0.1)  # float32 cancellation
    assert adm.precision_recall(ref, sample) == ref_precision_recall(ref, sample)
    # a small-valued block stays float16: its distances are float16 numbers
    small = torch.from_numpy(ref[:5] / 100)
    assert torch.equal(adm.pairwise_sq_distances(small, small), adm.pairwise_sq_distances(small, small).half().float())


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="more than 3"):
        adm.precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        adm.precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))


# ---------------------------------------------------------------------------------------------
# Inception features and the evaluate command, with a random-weight Inception-v3
# ---------------------------------------------------------------------------------------------


def test_inception_features_shapes_spatial_order_and_streaming(inception_weights, tmp_path):
    from soflow_fast.eval.inception import InceptionFeatures, iter_npz_images, npz_image_count

    net = InceptionFeatures(inception_weights)
    assert net.spatial_reason is None
    images = write_image_batch(tmp_path / "b.npz", 5, seed=1)
    out = net(images)
    assert out["pool"].shape == (5, 2048) and out["logits"].shape == (5, 1008) and out["spatial"].shape == (5, 2023)
    assert out["pool"].std() > 0 and torch.isfinite(out["spatial"]).all()
    # spatial: Mixed_6d.branch1x1's first 7 channels in TF's (H, W, C) order
    seen = {}
    hook = net.model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("o", o.clone()))
    net(images[:2])
    hook.remove()
    torch.testing.assert_close(out["spatial"][:2], seen["o"][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    # streamed batches of the npz give the same features as the whole array
    assert npz_image_count(tmp_path / "b.npz") == 5
    acts = net.activations(iter_npz_images(tmp_path / "b.npz", batch_size=2), total=5)
    np.testing.assert_allclose(acts["pool"], out["pool"].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"uint8 images \(N, H, W, 3\)"):
        np.savez(tmp_path / "chw.npz", arr_0=images.transpose(0, 3, 1, 2))
        npz_image_count(tmp_path / "chw.npz")
    with pytest.raises(FileNotFoundError, match="--inception"):
        InceptionFeatures(tmp_path / "missing.pth")


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


# ---------------------------------------------------------------------------------------------
# Input checks (soflow_fast.eval.checks, shared with the trainer) and bad files in a folder
# ---------------------------------------------------------------------------------------------


def _truncated_copy(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # an interrupted write


def test_batch_checks_name_the_file_and_the_reason(tmp_path):
    from soflow_fast.eval.checks import MIN_BATCH_IMAGES, check_reference_batch, check_sample_batch, check_sample_count

    assert MIN_BATCH_IMAGES == 4
    images = write_image_batch(tmp_path / "ok.npz", 4, seed=0)
    assert check_reference_batch(tmp_path / "ok.npz") == 4 and check_sample_batch(tmp_path / "ok.npz") == 4
    _truncated_copy(tmp_path / "ok.npz", tmp_path / "cut.npz")
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    np.savez(tmp_path / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "three.npz", arr_0=images[:3])
    np.savez(tmp_path / "part.npz", **{"arr_0.0": images})  # the trainer's per-rank part file
    cases = {
        "cut.npz": "not a readable npz file (BadZipFile: ",
        "float.npz": "'arr_0' must be uint8 images (N, H, W, 3) as ADM's batches, got float32 (4, 16, 16, 3)",
        "nchw.npz": "'arr_0' must be uint8 images (N, H, W, 3) as ADM's batches, got uint8 (4, 3, 16, 16)",
        "three.npz": "3 image(s), but precision and recall (k=3 nearest neighbours) need at least 4",
        "part.npz": "no 'arr_0' array in the npz (found ['arr_0.0.npy'])",
    }
    for name, reason in cases.items():
        for check in (check_reference_batch, check_sample_batch):
            with pytest.raises(ValueError) as info:
                check(tmp_path / name)
            assert str(info.value).startswith(f"{tmp_path / name}: ") and reason in str(info.value), info.value
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        check_reference_batch(tmp_path / "missing.npz")
    check_sample_count(4, "eval.eval_num_samples")
    with pytest.raises(ValueError, match=r"^eval\.eval_num_samples: 3 image\(s\), but precision and recall"):
        check_sample_count(3, "eval.eval_num_samples")


def test_inception_weights_check_needs_no_network_and_matches_the_loader(inception_weights, tmp_path):
    import argparse

    from soflow_fast.eval.checks import check_inception_weights
    from soflow_fast.eval.inception import InceptionFeatures

    assert check_inception_weights(inception_weights) == inception_weights
    write_image_batch(tmp_path / "ref.npz", 4, seed=0)
    torchvision_like = dict(torch.load(inception_weights, weights_only=True))
    torchvision_like["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(torchvision_like, tmp_path / "torchvision.pth")
    del torchvision_like["Mixed_6d.branch1x1.conv.weight"]
    torch.save(torchvision_like, tmp_path / "no_mixed6.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save(argparse.Namespace(a=1), tmp_path / "pickle.pth")  # refused by the weights-only loader
    cases = {
        "ref.npz": "(RuntimeError: ",
        "torchvision.pth": "('fc.weight' is (1000, 2048), expected (1008, 2048))",
        "no_mixed6.pth": "(no tensor 'Mixed_6d.branch1x1.conv.weight')",
        "list.pth": "(a list, not a state dict)",
        "pickle.pth": "(UnpicklingError: ",
    }
    for name, reason in cases.items():
        with pytest.raises(ValueError) as info:
            check_inception_weights(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: not torch-fidelity's Inception-v3 weights {reason}")
        with pytest.raises(ValueError) as built:  # the network's loader says the same
            InceptionFeatures(tmp_path / name)
        assert str(built.value) == str(info.value)
    with pytest.raises(FileNotFoundError, match="--inception"):
        check_inception_weights(tmp_path / "missing.pth")


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
    _truncated_copy(samples / "step_10.npz", samples / "step_20.npz")
    np.savez(samples / ".step_30.rank0.npz", **{"arr_0.0": images})
    np.savez(samples / "step_40.npz", arr_0=images.astype(np.float32))
    np.savez(samples / "step_50.npz", arr_0=images[:3])
    write_image_batch(samples / "step_60.npz", 5, seed=2, **{**stats, "mu": np.full(8, 2.0)})
    args = ["--ref_batch", str(tmp_path / "ref.npz"), "--sample_batch_dir", str(samples)]
    args += ["--inception", str(inception_weights), "--device", "cpu"]
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
