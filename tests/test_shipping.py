"""The packaged sampler (``soflow-export RUN OUT.pt2|OUT.onnx``, soflow_fast/shipping.py) run as a user runs it:
in a fresh Python process whose PYTHONPATH does not hold the repository and where importing soflow_fast fails.

For a tiny DiT, U-Net and MLP head (random weights, so the network moves every output) and for a real 2-step
training run exported by the command line (``--nfe 2 --vae`` included): the outputs equal ``sample``'s for the
same noise, labels or observations and re-noising noise within 1e-4, at batch sizes other than the exported
one; a bad input fails with the error each runtime raises (docs/shipping.md), and the process does not crash.
AOTInductor compiles C++ (~20 s a package here), so every package is made once, two at a time, by the
module's fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the ONNX runtime is in the dev extra")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript (the dev extra)")
diffusers = pytest.importorskip("diffusers")

from soflow_fast import export  # noqa: E402
from soflow_fast.models import ModelConfig  # noqa: E402
from soflow_fast.objective import SoFlowConfig, SoFlowObjective  # noqa: E402
from soflow_fast.sampling import sample  # noqa: E402
from soflow_fast.shipping import PackagedSampler, build_sampler, export_program, write_onnx, write_pt2  # noqa: E402
from tests.utils import child_env, launch  # noqa: E402

TOL = 1e-4  # fp32: the packaged graph against the eager sampler
BATCHES = (1, 3, 7)  # the graphs are traced at batch 2
TINY_KINDS = {  # kind -> (model config, nfe, mode): between them, both modes and re-noising in both formats
    "dit": (dict(model="DiT-T/2", input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2),
            1, "renoise"),
    "unet": (dict(model="UNet", input_size=8, in_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[4], dropout=0.0), 1, "renoise"),
    "mlp": (dict(model="MLP", obs_size=5, action_dim=2, action_horizon=4, hidden_size=32, num_layers=2), 2, "renoise"),
}  # fmt: skip
# ONNX files: the MLP's takes the chained sampler (no renoise input), the others as above
ONNX_MODE = {"mlp": "chained"}
RUN_ARGS = ["--total_steps=2", "--ckpt_saving_steps=2"]  # after tests/test_train.py's TINY

# What the fresh process runs: the loaders of docs/shipping.md and nothing of this project. Inputs come from
# an npz ("good/<case>/<input>", "bad/<case>/<input>"); outputs go to an npz, errors and metadata to a json.
CHILD = r"""
import json, sys

class NoSoflow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "soflow_fast":
            raise ImportError("a shipped sampler must run without soflow_fast")

sys.meta_path.insert(0, NoSoflow())
import numpy as np

package, feeds_path, out_path = sys.argv[1:4]
feeds = {}
with np.load(feeds_path) as data:
    for key in data.files:
        group, case, name = key.split("/")
        feeds.setdefault(group, {}).setdefault(case, {})[name] = data[key]
if package.endswith(".pt2"):
    import torch

    sampler = torch._inductor.aoti_load_package(package)
    run = lambda feed: sampler(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    metadata = sampler.get_metadata()
else:
    import onnxruntime as ort

    session = ort.InferenceSession(package, providers=["CPUExecutionProvider"])
    run = lambda feed: session.run(["samples"], feed)[0]
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    metadata["onnx.inputs"] = ",".join(i.name for i in session.get_inputs())
outputs = {case: run(feed) for case, feed in feeds.get("good", {}).items()}
errors = {}
for case, feed in feeds.get("bad", {}).items():
    try:
        outputs["bad_" + case] = run(feed)
        errors[case] = None
    except Exception as e:
        errors[case] = [type(e).__name__, str(e)]
np.savez(out_path, **outputs)
leaked = sorted(m for m in sys.modules if m.partition(".")[0] == "soflow_fast")
with open(out_path + ".json", "w") as f:
    json.dump({"errors": errors, "metadata": metadata, "soflow_fast": leaked, "torch": "torch" in sys.modules}, f)
"""


# ----------------------------------------------------------------------------------------------
# Models, packages and references
# ----------------------------------------------------------------------------------------------


def tiny_model(kind: str) -> tuple[torch.nn.Module, ModelConfig]:
    """The kind's tiny network with every weight perturbed (zero-initialised read-outs included), the same in
    every process."""
    cfg = ModelConfig.from_dict(TINY_KINDS[kind][0])
    torch.manual_seed(0)
    model = cfg.build().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, cfg


def package_tiny(kind: str, folder: str) -> None:
    """``<kind>.pt2`` and ``<kind>.onnx`` of the tiny network in ``folder`` (run in a child by the fixture)."""
    programs = {}  # one trace for both files where the sampler is the same
    for fmt, write in ((".pt2", write_pt2), (".onnx", write_onnx)):
        sampler = tiny_sampler(kind, fmt)[2]
        if sampler.mode not in programs:
            programs[sampler.mode] = export_program(sampler)
        write(programs[sampler.mode], Path(folder) / f"{kind}{fmt}", sampler.describe(), force=False)


def _run(cmd: list[str], **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env(), **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A random AutoencoderKL (downsampling 2) for the run's 1-channel 8x8 latents, saved like a hub folder."""
    torch.manual_seed(0)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae = diffusers.AutoencoderKL(**blocks, block_out_channels=(8, 16), layers_per_block=1, latent_channels=1,
                                  norm_num_groups=4, sample_size=16)  # fmt: skip
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tiny_vae) -> dict[str, Path]:
    """Every package of this module, made two at a time: the tiny kinds' (in child processes) and the command
    line's from a 2-step digits run: ``run.pt2`` (1 step) and ``run.onnx`` (2 steps, decoded by the VAE)."""
    out = tmp_path_factory.mktemp("shipped")
    work = out / "run"
    paths = {k: out / k for k in ("run.pt2", "run.onnx")} | {"run": work, "vae": tiny_vae}
    cli = [sys.executable, "-m", "soflow_fast.export", str(work)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: the compiles are single-threaded
        trained = pool.submit(launch, work, 1, *RUN_ARGS)

        def after_training(*args: str) -> None:
            trained.result()
            _run([*cli, *args])

        def tiny(kind: str) -> None:
            code = f"from tests.test_shipping import package_tiny; package_tiny({kind!r}, {str(out)!r})"
            _run([sys.executable, "-c", code])

        # the U-Net's compile is the longest: it starts beside the training run, the rest fill in
        jobs = [trained, pool.submit(tiny, "unet"), pool.submit(after_training, str(paths["run.pt2"]))]
        jobs += [pool.submit(tiny, "dit"), pool.submit(tiny, "mlp")]
        jobs.append(pool.submit(after_training, str(paths["run.onnx"]), "--nfe", "2", "--vae", str(tiny_vae)))
        for job in jobs:
            job.result()
    for kind in TINY_KINDS:
        paths[f"{kind}.pt2"], paths[f"{kind}.onnx"] = out / f"{kind}.pt2", out / f"{kind}.onnx"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    return paths


def run_fresh(package_path: Path, feeds: dict[str, dict[str, dict[str, np.ndarray]]], checks: bool = True):
    """Run ``package_path`` on ``feeds`` in a fresh process (cwd outside the repository, no PYTHONPATH);
    ``checks``: AOTI_RUNTIME_CHECK_INPUTS=1, as docs/shipping.md loads a .pt2. Returns (outputs, report)."""
    folder = package_path.parent / f"fresh-{package_path.name}-{int(checks)}"
    folder.mkdir()
    flat = {f"{group}/{case}/{name}": v for group, cases in feeds.items() for case, f in cases.items()
            for name, v in f.items()}  # fmt: skip
    np.savez(folder / "feeds.npz", **flat)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AOTI_RUNTIME_CHECK_INPUTS")}
    env.update(OMP_NUM_THREADS="1", **({"AOTI_RUNTIME_CHECK_INPUTS": "1"} if checks else {}))
    out = folder / "out.npz"
    cmd = [sys.executable, "-c", CHILD, str(package_path), str(folder / "feeds.npz"), str(out)]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the fresh process failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["soflow_fast"] == [], f"the fresh process imported {report['soflow_fast']}"
    assert not report["torch"] or package_path.suffix == ".pt2", "onnxruntime alone runs an .onnx file"
    with np.load(out) as data:
        return {k: data[k] for k in data.files}, report


def good_feeds(sampler: PackagedSampler) -> dict[str, dict[str, np.ndarray]]:
    """Inputs at each of BATCHES, with distinct labels per row."""
    g = torch.Generator().manual_seed(5)
    feeds = {}
    for b in BATCHES:
        feed = {"noise": torch.randn(b, *sampler.sample_shape, generator=g)}
        if sampler.condition_name == "labels":
            feed["labels"] = torch.randperm(sampler.label_count, generator=g)[:b].sort().values
        elif sampler.condition_name == "obs":
            feed["obs"] = torch.randn(b, sampler.condition_size, generator=g)
        if sampler.takes_renoise:
            feed["renoise"] = torch.randn(b, sampler.nfe - 1, *sampler.sample_shape, generator=g)
        feeds[f"b{b}"] = {k: v.numpy() for k, v in feed.items()}
    return feeds


def reference(model, cfg: ModelConfig, soflow: SoFlowConfig, sampler: PackagedSampler, feed: dict) -> torch.Tensor:
    """``sample``'s output (the project's eager sampler) for a feed."""
    objective = SoFlowObjective(soflow, num_classes=cfg.num_classes or None)
    f = {k: torch.from_numpy(v) for k, v in feed.items()}
    y = f.get("labels", f.get("obs"))
    renoise = [f["renoise"][:, i] for i in range(sampler.nfe - 1)] if "renoise" in f else None
    return sample(model, objective, f["noise"], y, steps=sampler.nfe, mode=sampler.mode, renoise=renoise)


def assert_close(actual: np.ndarray, expected: torch.Tensor, what: str) -> None:
    err = float(np.abs(actual - expected.numpy()).max())
    assert actual.shape == tuple(expected.shape) and err <= TOL, f"{what}: max error {err:.2e} > {TOL:g}"


def tiny_sampler(kind: str, fmt: str) -> tuple[torch.nn.Module, ModelConfig, PackagedSampler]:
    model, cfg = tiny_model(kind)
    _, nfe, mode = TINY_KINDS[kind]
    mode = ONNX_MODE.get(kind, mode) if fmt == ".onnx" else mode
    return model, cfg, build_sampler(model, cfg, SoFlowConfig(), nfe=nfe, mode=mode)


@pytest.fixture(scope="module")
def fresh(shipped):
    """``fresh(kind, fmt)``: the outputs and report of one fresh process that ran the tiny kind's file on
    good_feeds (as "good") and bad_feeds (as "bad"), run once per file."""
    done = {}

    def run(kind: str, fmt: str):
        if kind + fmt not in done:
            sampler = tiny_sampler(kind, fmt)[2]
            feeds = {"good": good_feeds(sampler), "bad": {c: f for c, (_, f) in bad_feeds(sampler).items()}}
            done[kind + fmt] = run_fresh(shipped[kind + fmt], feeds)
        return done[kind + fmt]

    return run


# ----------------------------------------------------------------------------------------------
# Parity, any batch, and the network's inputs all matter
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [".pt2", ".onnx"])
@pytest.mark.parametrize("kind", list(TINY_KINDS))
def test_the_packaged_sampler_equals_sample_at_any_batch(fresh, kind, fmt):
    model, cfg, sampler = tiny_sampler(kind, fmt)
    feeds = good_feeds(sampler)
    outputs, report = fresh(kind, fmt)
    for case, feed in feeds.items():
        expected = reference(model, cfg, SoFlowConfig(), sampler, feed)
        assert_close(outputs[case], expected, f"{kind}{fmt} {case}")
        # the comparison can fail: each input moves the samples far more than the tolerance
        assert np.abs(expected.numpy() - feed["noise"]).max() > 100 * TOL
        for name in feed.keys() - {"noise"}:
            changed = dict(feed, **{name: np.roll(feed[name], 1, axis=0) if name == "labels" else feed[name] + 1})
            if name != "labels" or len(feed[name]) > 1:
                moved = np.abs(reference(model, cfg, SoFlowConfig(), sampler, changed).numpy() - expected.numpy())
                assert moved.max() > 100 * TOL, f"{name} barely moves the samples"
    names = report["metadata"]["soflow.inputs"].split(",")
    assert names == list(feeds["b1"]), names
    if fmt == ".onnx":
        assert report["metadata"]["onnx.inputs"] == ",".join(names)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def bad_feeds(sampler: PackagedSampler) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """case -> (the input it spoils, the feed), around a good batch of 3: ``<input>_shape`` (one more in the
    last dimension; labels get a second dimension), ``<input>_dtype`` (float64, labels int32),
    ``<input>_batch`` (a batch of 1 beside noise's 3), labels out of range."""
    good = good_feeds(sampler)["b3"]
    cases = {}
    for name, value in good.items():
        wrong = np.concatenate([value, value[..., -1:]], axis=-1) if name != "labels" else value[:, None]
        cases[f"{name}_shape"] = (name, dict(good, **{name: wrong}))
        other = np.int32 if name == "labels" else np.float64
        cases[f"{name}_dtype"] = (name, dict(good, **{name: value.astype(other)}))
        if name != "noise":
            cases[f"{name}_batch"] = (name, dict(good, **{name: value[:1]}))
    if "labels" in good:
        cases["label_high"] = ("labels", dict(good, labels=np.array([0, sampler.label_count, 1])))
        cases["label_negative"] = ("labels", dict(good, labels=np.array([0, -1, 1])))
    return cases


@pytest.mark.parametrize("kind", list(TINY_KINDS))
def test_aoti_refuses_a_bad_input_and_the_graph_checks_labels(fresh, kind):
    model, cfg, sampler = tiny_sampler(kind, ".pt2")
    cases = bad_feeds(sampler)
    _, report = fresh(kind, ".pt2")
    meta = report["metadata"]
    for case, (name, feed) in cases.items():
        error = report["errors"][case]
        assert error is not None and error[0] == "RuntimeError", (case, error)
        message = error[1].strip()
        position = meta["soflow.inputs"].split(",").index(name)
        assert meta[f"input_handles[{position}]"] == name  # the file says which input a position is
        if case.startswith("label_"):  # the graph's own check
            assert message.startswith(sampler.label_message()) and "labels must be in [0, 10]" in message, error
        elif case == "labels_shape":  # a wrong rank: AOTInductor names no input
            assert message.startswith("expected ndim 1 but got 2"), error
        elif case.endswith("_batch"):  # batches that disagree: neither
            assert message.startswith("expected size 1==3"), error
        elif case.endswith("_dtype"):  # AOTI_RUNTIME_CHECK_INPUTS=1 names the input by its position
            assert message.startswith(f"input_handles[{position}]: unmatched dtype"), error
        else:
            last = feed[name].ndim - 1
            assert message.startswith(f"input_handles[{position}]: unmatched dim value at {last}"), error


def test_aoti_refuses_a_label_out_of_range_without_the_input_checks(shipped):
    _, _, sampler = tiny_sampler("dit", ".pt2")
    cases = {c: f for c, (_, f) in bad_feeds(sampler).items() if c.startswith("label_")}
    _, report = run_fresh(shipped["dit.pt2"], {"bad": cases}, checks=False)
    for case in cases:
        assert report["errors"][case][1].strip().startswith("labels must be in [0, 10] (10 is the null label"), case


@pytest.mark.parametrize("kind", list(TINY_KINDS))
def test_onnxruntime_refuses_a_bad_input_and_the_graph_checks_batches_and_labels(fresh, kind):
    sampler = tiny_sampler(kind, ".onnx")[2]
    cases = bad_feeds(sampler)
    report = fresh(kind, ".onnx")[1]
    for case, (name, _) in cases.items():
        error = report["errors"][case]
        if case.endswith("_shape"):  # onnxruntime names the input
            assert error[0] == "InvalidArgument" and f"input: {name}" in error[1], (case, error)
        elif case.endswith("_dtype"):  # ... but not for a dtype: it gives the two types
            expected = "tensor(int64)" if name == "labels" else "tensor(float)"
            assert error[0] == "InvalidArgument" and "Unexpected input data type" in error[1], (case, error)
            assert f"expected: ({expected})" in error[1], error
        elif case.endswith("_batch"):  # the graph's check in front: its node's name says what failed
            assert error[0] == "Fail" and f"Name:'{name}_batch_must_equal_noise_batch'" in error[1], (case, error)
        else:  # a label out of range, above or below (ONNX's gather would count -1 from the end)
            assert case in ("label_high", "label_negative"), case
            assert error[0] == "Fail" and "Name:'labels_must_be_in_0_10'" in error[1], (case, error)
    if "labels" in sampler.input_names():  # what the caller must check is in the file
        assert "labels must be in [0, 10]" in report["metadata"]["soflow.input.labels"]


# ----------------------------------------------------------------------------------------------
# The command line on a real run
# ----------------------------------------------------------------------------------------------


def test_export_to_pt2_from_a_run_equals_sample_with_its_ema_weights(shipped):
    model, info = export.load_run_weights(shipped["run"])
    cfg = info["config"]
    sampler = build_sampler(model, cfg.model, cfg.soflow)
    feeds = good_feeds(sampler)
    outputs, report = run_fresh(shipped["run.pt2"], {"good": feeds})
    for case, feed in feeds.items():
        assert_close(outputs[case], reference(model, cfg.model, cfg.soflow, sampler, feed), f"run.pt2 {case}")
    meta = report["metadata"]
    assert (meta["soflow.step"], meta["soflow.decay"], meta["soflow.nfe"]) == ("2", "0.9", "1")


def test_export_to_onnx_with_two_steps_and_the_vae_gives_the_decoded_images(shipped):
    from soflow_fast.vae import decode, load_vae

    model, info = export.load_run_weights(shipped["run"])
    cfg = info["config"]
    vae = load_vae(shipped["vae"], latent_channels=1)
    sampler = build_sampler(model, cfg.model, cfg.soflow, nfe=2, vae=vae)
    feeds = good_feeds(sampler)
    outputs, report = run_fresh(shipped["run.onnx"], {"good": feeds})
    for case, feed in feeds.items():
        images = decode(vae, reference(model, cfg.model, cfg.soflow, sampler, feed))  # (B, 3, 16, 16) in [-1, 1]
        levels = ((images + 1) * 127.5).permute(0, 2, 3, 1).numpy()  # before rounding to uint8
        got = outputs[case]
        assert got.dtype == np.uint8 and got.shape == (len(feed["noise"]), 16, 16, 3), (got.dtype, got.shape)
        # TOL on the [-1, 1] scale: a level may round the other way only when it is that close to a half
        near_half = np.abs(levels - np.floor(levels) - 0.5) <= TOL * 127.5
        off = got.astype(np.int16) != np.round(levels).astype(np.int16)
        assert not (off & ~near_half).any() and np.abs(got - levels).max() <= 0.5 + TOL * 127.5, case
    assert report["metadata"]["soflow.inputs"] == "noise,labels,renoise"
    assert report["metadata"]["soflow.batch"] == "1..63"


def test_export_flags_belong_to_the_packaged_formats(tmp_path, capsys):
    for argv in (["w", "o.safetensors", "--nfe", "2"], ["w", "o.safetensors", "--vae", "v"],
                 ["w", "o.onnx", "--device", "cpu"], ["w", "o.pt2", "--nfe", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as done:
            export.parse_args(argv)
        assert done.value.code == 2
    a = export.parse_args(["w", "o.pt2", "--nfe=3", "--mode", "chained", "--vae=v"])
    assert (a.nfe, a.mode, a.vae) == (3, "chained", "v")
    (tmp_path / "o.pt2").write_bytes(b"old")  # refused before the run is read
    assert export.main([str(tmp_path / "no-run"), str(tmp_path / "o.pt2")]) == 1
    assert "exists; pass --force" in capsys.readouterr().err and (tmp_path / "o.pt2").read_bytes() == b"old"


def test_an_mlp_head_has_no_images_for_a_vae():
    model, cfg = tiny_model("mlp")
    with pytest.raises(ValueError, match="no images"):
        PackagedSampler(model, SoFlowObjective(), cfg, vae=object())
