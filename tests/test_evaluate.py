"""``python -m soflow_fast.evaluate`` results keyed by the reference batch, latent previews refused,
and a missing folder as an error (a random-weight Inception, the conftest fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soflow_fast import evaluate
from soflow_fast import sample as sample_cli
from soflow_fast.eval.checks import check_decoded_samples, check_sample_batch
from soflow_fast.models import build_model
from tests.utils import write_image_batch

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
        return evaluate.main([*args, "--inception", str(inception_weights), "--device", "cpu"])

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
