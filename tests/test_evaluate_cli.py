"""``python -m soflow_fast.evaluate`` results keyed by the reference batch, latent previews refused,
and a missing folder as an error (the random-weight Inception of test_adm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soflow_fast import evaluate
from soflow_fast import sample as sample_cli
from soflow_fast.eval.checks import check_decoded_samples, check_sample_batch
from soflow_fast.models import build_model
from tests.test_adm import _write_batch, inception_weights  # noqa: F401 (fixture: a random Inception-v3 file)

# stored statistics: FID = |mu - mu_ref|^2 with equal covariances, no sqrtm of 2048 x 2048 matrices
STATS = {"sigma": np.eye(8), "mu_s": np.zeros(3), "sigma_s": np.eye(3)}


def _ref(path, mu: float) -> None:
    _write_batch(path, 5, seed=0, mu=np.full(8, mu), **STATS)


def test_a_latent_preview_is_refused_with_one_line(inception_weights, tmp_path, capsys):  # noqa: F811
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
    assert evaluate.main([*argv, "--inception", str(inception_weights), "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    with pytest.raises(ValueError) as info:
        check_sample_batch(preview)
    message = str(info.value)
    assert message.startswith(f"{preview}: a latent preview, not images") and "sample --vae" in message
    assert [line for line in err.splitlines() if "error" in line] == [f"evaluate: error: {message}"]
    assert "IS:" not in out and "reference batch" not in out and not (samples / "eval_results.txt").exists()
    # the same rule before sampling, for the trainer: a latent model without a VAE
    with pytest.raises(ValueError) as info:
        check_decoded_samples(4, None, "run.eval_reference")
    assert str(info.value).startswith("run.eval_reference: the samples of a 4-channel latent model without a VAE: ")
    assert "a latent preview, not images" in str(info.value) and "run.vae" in str(info.value)
    check_decoded_samples(4, "sd-vae-ft-mse", "run.eval_reference")
    check_decoded_samples(3, None, "run.eval_reference")
    check_decoded_samples(1, None, "run.eval_reference")
