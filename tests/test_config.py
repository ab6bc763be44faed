"""Training config: presets, YAML files (flat and nested), overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch
import yaml

from soflow_fast.config import SECTIONS, load_yaml, merge, parse_overrides
from soflow_fast.config_fields import coerce, field_types
from soflow_fast.presets import PRESETS, build_config
from tests.utils import raises_naming

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    cfg = PRESETS[name]()
    assert cfg.soflow.total_steps == cfg.run.total_steps
    assert cfg.to_dict()["model"]["model"].startswith("DiT-") or cfg.model.model == "UNet"


def test_our_flat_yaml_files_load():
    cfg = load_yaml(REPO / "configs" / "imagenet.yaml")
    assert cfg.model.model == "DiT-B/4" and cfg.model.num_classes == 1000
    assert cfg.ema.ema_decays == (0.9999,) and cfg.run.total_steps == 400_000
    assert cfg.soflow.total_steps == 400_000 and cfg.soflow.time_mean == (-0.2, -1.0, 0.2)
    assert cfg.optim.betas == (0.9, 0.99)
    cifar = load_yaml(REPO / "configs" / "cifar.yaml")
    assert cifar.optim.optimizer == "RAdam" and cifar.soflow.velocity_loss_ratio == 0.0
    assert cifar.soflow.l_end_ratio == 0.0003125 and cifar.model.num_classes == 0
    assert (cifar.model.model, cifar.data.augment, cifar.ema.ema_every, cifar.ema.ema_fp64) == ("UNet", "edm", 16, True)
    # the file spells out the cifar10 preset's recipe: on top of the preset it changes nothing
    assert build_config("cifar10", str(REPO / "configs" / "cifar.yaml")) == PRESETS["cifar10"]()


def test_nested_yaml_and_roundtrip(tmp_path):
    cfg = merge(PRESETS["digits"](), {"run": {"seed": 7}, "soflow": {"p": 0.5}, "lr": 3e-4})
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    back = load_yaml(path)
    assert back == cfg and back.run.seed == 7 and back.soflow.p == 0.5 and back.optim.lr == 3e-4


def test_unknown_and_ambiguous_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learnin_rate: 0.1\n")
    with raises_naming(ValueError, "'learnin_rate'"):
        load_yaml(bad)
    with raises_naming(ValueError, "'run.bogus'"):
        merge(PRESETS["digits"](), {"run.bogus": 1})
    with raises_naming(ValueError, "'nope'", "'nope.x'"):
        merge(PRESETS["digits"](), {"nope.x": 1})
    with raises_naming(FileNotFoundError, str(tmp_path / "missing.yaml")):
        load_yaml(tmp_path / "missing.yaml")


def test_overrides_and_validation():
    assert parse_overrides(["--run.seed", "3", "--time-mean=[0, 1, 2]"]) == {"run.seed": 3, "time_mean": [0, 1, 2]}
    cfg = build_config("digits", None, ["--total_steps=10", "--cfg_scale=1.5", "--lr=1e-3", "--time_std=[1e-1, 1, 2]"])
    assert cfg.run.total_steps == 10 and cfg.soflow.total_steps == 10 and cfg.soflow.cfg_scale == 1.5
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.soflow.time_std == (0.1, 1.0, 2.0)
    with raises_naming(ValueError, "run.batch_size", "0"):
        build_config("digits", None, ["--batch_size=0"])
    with raises_naming(ValueError, "data.data_path", "'npz'"):
        build_config("digits", None, ["--dataset=npz"])
    with raises_naming(ValueError, "preset 'nope'", "digits"):  # and the presets there are
        build_config("nope")
    with raises_naming(ValueError, "model 'DiT-Z/9'", "DiT-T/2"):  # and the sizes there are
        build_config("digits", None, ["--model=DiT-Z/9"])
    with raises_naming(ValueError, "optim.optimizer", "AdamW", "'SGD'"):
        build_config("digits", None, ["--optimizer=SGD"])
    with raises_naming(ValueError, "parallel.compile_scope", "blocks, loss", "'graph'"):
        build_config("digits", None, ["--compile_scope=graph"])
    with raises_naming(ValueError, "parallel.compile_scope=blocks", "run.objective=meanflow"):
        build_config("digits", None, ["--objective=meanflow", "--compile_scope=blocks"])
    with raises_naming(ValueError, "parallel.fused_ops", "all, layer_norms, losses", "'ln'"):
        build_config("digits", None, ["--use_fused_kernels=true", "--fused_ops=ln"])
    assert build_config("digits", None, ["--fused_ops=losses"]).parallel.fused_ops == "losses"


def test_flat_keys_shared_with_meanflow_go_to_soflow():
    cfg = merge(PRESETS["digits"](), {"p": 0.5, "meanflow.p": 0.25, "objective": "meanflow"})
    assert cfg.soflow.p == 0.5 and cfg.meanflow.p == 0.25 and cfg.run.objective == "meanflow"


def test_a_named_size_drops_the_base_presets_size_overrides():
    """--model=DiT-XL/2 on the digits preset (which shrinks DiT-T/2 by field overrides) is XL/2."""
    kw = build_config("digits", None, ["--model=DiT-XL/2"]).model.build_kwargs()
    assert (kw["patch_size"], kw["hidden_size"], kw["depth"], kw["num_heads"]) == (2, 1152, 28, 16)
    kw = build_config("digits", None, ["--model=DiT-XL/2", "--depth=3"]).model.build_kwargs()
    assert (kw["hidden_size"], kw["depth"]) == (1152, 3)  # overrides given with the size still apply
    kw = build_config("digits", None, ["--hidden_size=64"]).model.build_kwargs()
    assert (kw["hidden_size"], kw["depth"]) == (64, 4)  # no new size: the preset's overrides stay
    kw = build_config("imagenet-b2", str(REPO / "configs" / "imagenet.yaml")).model.build_kwargs()
    assert (kw["patch_size"], kw["hidden_size"], kw["depth"]) == (4, 768, 12)  # the file's DiT-B-4


def test_guidance_without_a_null_label_is_one_clear_error():
    with raises_naming(ValueError, "soflow.cfg_scale=2", "model.class_dropout_prob=0", "soflow.cfg_scale=1"):
        build_config("digits", None, ["--class_dropout_prob=0"])
    assert build_config("digits", None, ["--class_dropout_prob=0", "--cfg_scale=1"]).model.class_dropout_prob == 0
    with raises_naming(ValueError, "meanflow.cfg_drop_rate", "model.class_dropout_prob=0"):
        build_config("digits", None, ["--class_dropout_prob=0", "--objective=meanflow"])
    build_config("cifar10")  # unconditional: no null label needed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--batch_size=abc", "run.batch_size must be an integer, got 'abc'"),
        ("--log_steps=0.5", "run.log_steps must be an integer, got 0.5"),
        ("--lr=abc", "optim.lr must be a number, got 'abc'"),
        ("--betas=0.9", "optim.betas must be a list of 2 numbers"),
        ("--time_mean=[1, 2]", "soflow.time_mean must be a list of 3 numbers"),
        ("--fsdp=maybe", "parallel.fsdp must be true or false, got 'maybe'"),
        ("--working_dir=", "run.working_dir needs a value"),
        ("--lr=[1", "--lr: '[1' is not a valid value"),
    ],
)
def test_values_of_the_wrong_type_are_one_clear_error(override, message):
    with pytest.raises(ValueError) as info:
        build_config("digits", None, [override])
    assert message in str(info.value)


def test_values_convert_to_their_field_types(tmp_path):
    overrides = ["--batch_size=16.0", "--total_steps=1e5", "--working_dir=2024", "--compile=null"]
    cfg = build_config("digits", None, overrides)
    assert cfg.run.batch_size == 16 and isinstance(cfg.run.batch_size, int)
    assert cfg.run.total_steps == 100_000 and cfg.run.working_dir == "2024" and cfg.parallel.compile is None
    assert build_config("digits", None, ["--working_dir=~/somewhere"]).run.working_dir == str(
        Path("~/somewhere").expanduser()
    )
    afile = tmp_path / "afile"
    afile.write_text("x")
    with raises_naming(ValueError, f"run.working_dir={afile}", "not a directory"):
        build_config("digits", None, [f"--working_dir={afile}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError) as info:  # the YAML parser's message spans lines (the line, a caret)
        build_config("digits", str(bad))
    assert str(info.value).startswith(f"{bad} is not valid YAML: ")


def test_reader_options_reach_their_dataset_and_nowhere_else():
    npz = ["--dataset=npz", "--data_path=d.npz"]
    cfg = build_config("digits", None, [*npz, "--layout=NHWC", "--x_key=images", "--y_key=targets"])
    assert cfg.data.reader_kwargs() == {"layout": "NHWC", "x_key": "images", "y_key": "targets"}
    assert build_config("digits", None, npz).data.reader_kwargs() == {}  # unset: the readers' own defaults
    cfg = build_config(
        "imagenet-b2", None, ["--second_half=logvar", "--scale_factor=0.13025", "--x_key=m", "--in_memory=true"]
    )
    assert cfg.data.reader_kwargs() == {
        "moments_key": "m",
        "in_memory": True,
        "second_half": "logvar",
        "scale_factor": 0.13025,
    }
    folder = ["--dataset=image_folder", "--data_path=imgs", "--image_size=32"]
    assert build_config("digits", None, [*folder, "--channels=1"]).data.reader_kwargs() == {"channels": 1}
    for override, names in [  # the key, the datasets it applies to, and the one of this config
        ("--layout=NHWC", ("data.layout", "npz", "data.dataset=digits")),
        ("--scale_factor=0.2", ("data.scale_factor", "latents_h5", "data.dataset=digits")),
        ("--in_memory=true", ("data.in_memory", "image_folder and latents_h5", "data.dataset=digits")),
    ]:
        with raises_naming(ValueError, *names):
            build_config("digits", None, [override])
    for override, names in [  # the key, the values it takes, and the one given
        ("--layout=HWC", ("data.layout", "auto, NCHW, NHWC", "'HWC'")),
        ("--channels=2", ("data.channels", "1, 3", "got 2")),
    ]:
        with raises_naming(ValueError, *names):
            build_config("digits", None, [*npz, override] if "layout" in override else [*folder, override])
    with raises_naming(ValueError, "data.second_half", "std, logvar", "'var'"):
        build_config("imagenet-b2", None, ["--second_half=var"])
    with raises_naming(ValueError, "data.scale_factor", "> 0", "0.0"):
        build_config("imagenet-b2", None, ["--scale_factor=0"])


# Configs that between them give every field of every section a value other than None.
SAMPLES = {
    "digits": [],
    "npz": ["--dataset=npz", "--data_path=d.npz", "--layout=NHWC", "--x_key=images", "--y_key=targets"],
    "image_folder": ["--dataset=image_folder", "--data_path=imgs", "--image_size=32", "--channels=1"]
    + ["--skip_bad_files=true"],
    "latents": ["--dataset=latents_h5", "--data_path=l.h5", "--second_half=logvar", "--scale_factor=0.13025"],
    "run": ["--in_memory=true", "--compile=false", "--compile_scope=loss", "--fsdp=true", "--max_steps_this_run=7"],
}
SAMPLES["latents"] += ["--in_memory=false", "--x_key=m", "--y_key=y"]
SAMPLES["run"] = ["--dataset=image_folder", "--data_path=i", *SAMPLES["run"], "--draw_groups=4", "--num_workers=2"]
SAMPLES["run"] += ["--vae=sd-vae", "--eval_reference=ref.npz", "--inception=inc.pth", "--eval_steps=5"]
SAMPLES["run"] += ["--eval_batch_size=25", "--prefetch_factor=3", "--cuda_graphs=step"]
SAMPLES["run"] += ["--teacher=teacher_run", "--init_from=init.safetensors"]
SAMPLES["unet"] = ["--model=UNet", "--num_classes=0", "--model_channels=16", "--channel_mult=[1, 2]", "--num_blocks=1"]
SAMPLES["unet"] += ["--attn_resolutions=[4]", "--dropout=0.1", "--augment_dim=6", "--dataset=cifar10", "--data_path=c"]
SAMPLES["unet"] += ["--augment=edm", "--eval_demo_shape=[2, 3]"]


def _texts(value):
    """The ways a user writes ``value`` on the command line: its str() and its YAML form."""
    value = list(value) if isinstance(value, tuple) else value
    return {str(value), yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()}


def _same_types(a, b):
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same_types, a, b))
    return type(a) is type(b)


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_every_field_round_trips_through_an_override_of_its_own_text(sample):
    """``--sec.name=<str(value) or YAML of value>`` gives back the value, of the field's own type."""
    cfg = build_config("digits", None, SAMPLES[sample])
    for sec in SECTIONS:
        for name in field_types(type(getattr(cfg, sec))):  # the section's kind (model, data set) included
            value = getattr(getattr(cfg, sec), name)
            for text in _texts(value):
                back = getattr(getattr(merge(cfg, parse_overrides([f"--{sec}.{name}={text}"])), sec), name)
                assert back == value and _same_types(back, value), f"--{sec}.{name}={text} gave {back!r}"


def _optional_fields(cfg=None) -> list[tuple[str, str]]:
    """Every optional field of every section and kind, or of the sections of ``cfg`` as they are."""
    classes = {sec: type(getattr(cfg, sec)) for sec in SECTIONS} if cfg is not None else None
    return [
        (sec, name)
        for sec, cls in SECTIONS.items()
        for name, hint in (field_types(classes[sec]) if classes else cls.all_field_types()).items()
        if type(None) in typing.get_args(hint)
    ]


def test_the_samples_give_every_optional_field_a_value():
    configs = [build_config("digits", None, overrides) for overrides in SAMPLES.values()]
    unset = [
        f"{sec}.{name}"
        for sec, name in _optional_fields()
        if all(getattr(getattr(c, sec), name, None) is None for c in configs)
    ]
    assert len(_optional_fields()) >= 15 and not unset, f"no sample sets {unset}"


@pytest.mark.parametrize("text", ["none", "None", "NONE", "null", "~"])
@pytest.mark.parametrize("sample", ["run", "latents", "unet"])
def test_optional_fields_take_none_in_each_spelling(text, sample):
    cfg = build_config("digits", None, SAMPLES[sample])
    for sec, name in _optional_fields(cfg):
        # the readers need their path, the eval reference its Inception weights, a U-Net's augmentation-label
        # layer its augmentation
        if (sec, name) not in (("data", "data_path"), ("eval", "inception"), ("data", "augment")):
            back = merge(cfg, parse_overrides([f"--{sec}.{name}={text}"]))
            assert getattr(getattr(back, sec), name) is None, f"--{sec}.{name}={text}"


def test_a_float_or_none_field_takes_none_null_and_numbers():
    latents = ["--dataset=latents_h5", "--data_path=l.h5"]
    for text, expected in [("none", None), ("null", None), ("0.5", 0.5), ("1e-1", 0.1), ("2", 2.0)]:
        value = build_config("digits", None, [*latents, f"--scale_factor={text}"]).data.scale_factor
        assert value == expected and type(value) is type(expected), text
    with raises_naming(ValueError, "data.scale_factor", "number", "'half'"):
        build_config("digits", None, [*latents, "--scale_factor=half"])
    with raises_naming(ValueError, "data.scale_factor", "number", "True"):
        build_config("digits", None, [*latents, "--scale_factor=true"])


def test_an_int_field_is_exact_and_refuses_what_is_not_an_integer():
    big = 12345678901234567891  # above 2**53: a float would round it
    assert build_config("digits", None, [f"--seed={big}"]).run.seed == big
    assert build_config("digits", None, [f"--seed='{big}'"]).run.seed == big  # a quoted YAML string
    for text, got in [("true", "True"), ("1.5e0", "'1.5e0'"), ("[1]", "[1]"), ("inf", "'inf'"), (".nan", "nan")]:
        with raises_naming(ValueError, "run.seed", "integer", f"got {got}"):
            build_config("digits", None, [f"--seed={text}"])


def test_tuple_fields_take_lists_and_name_a_bad_item():
    cfg = build_config("digits", None, ["--ema_decays=[0.9, '0.99', 1e-1]", "--betas=[0, 0.5]"])
    assert cfg.ema.ema_decays == (0.9, 0.99, 0.1) and cfg.optim.betas == (0.0, 0.5)
    assert all(type(v) is float for v in (*cfg.ema.ema_decays, *cfg.optim.betas))
    assert build_config("digits", None, ["--ema_decay=0.999"]).ema.ema_decays == (0.999,)  # the authors' key
    for override, message in [
        ("--betas=[0.9, x]", "optim.betas[1] must be a number, got 'x'"),
        ("--betas=[0.9, null]", "optim.betas[1] needs a value"),
        ("--ema_decays=fast", "ema.ema_decays must be a number, got 'fast'"),
        ("--ema_decays={a: 1}", "ema.ema_decays must be a number, got {'a': 1}"),
        ("--time_std=[1, 2, 3, 4]", "soflow.time_std must be a list of 3 numbers, e.g. --time_std=[...]"),
    ]:
        with pytest.raises(ValueError) as info:
            build_config("digits", None, [override])
        assert message in str(info.value)


def test_a_field_of_a_type_coerce_cannot_convert_is_an_error_up_front():
    @dataclasses.dataclass
    class Odd:
        sizes: list[int] = dataclasses.field(default_factory=list)

    with raises_naming(TypeError, "Odd.sizes", "list[int]"):
        field_types(Odd)
    assert coerce("k", "3", int | None) == 3 and coerce("k", ["1", 2], tuple[int, str]) == (1, "2")


def test_unet_and_augment_fields_are_checked():
    with raises_naming(ValueError, "model.patch_size", "DiT", "model.model=UNet"):
        build_config("cifar10", None, ["--patch_size=2"])
    with raises_naming(ValueError, "model.model_channels", "UNet", "model.model=DiT-T/2"):
        build_config("digits", None, ["--model_channels=8"])
    with raises_naming(ValueError, "model.num_classes", "model.model=UNet", "got 10"):
        build_config("digits", None, ["--model=UNet"])
    with raises_naming(ValueError, "data.augment=edm", "data.random_flip=false"):
        build_config("cifar10", None, ["--random_flip=true"])
    with raises_naming(ValueError, "data.augment", "edm", "'ada'"):
        build_config("cifar10", None, ["--augment=ada"])
    # the augmentation-label layer without augmentation would never train
    with raises_naming(ValueError, "model.augment_dim=6", "model.augment_dim=0", "data.augment=edm"):
        build_config("cifar10", None, ["--augment=null"])
    assert build_config("cifar10", None, ["--augment=null", "--augment_dim=0"]).model.augment_dim == 0
    # a named network brings its own sizes: switching to a DiT drops the U-Net's overrides
    unet = build_config("cifar10", None, ["--model_channels=16"])
    cfg = merge(unet, {"model": "DiT-S/2", "augment": None})
    assert not hasattr(cfg.model, "model_channels") and cfg.model.model == "DiT-S/2"


def test_cuda_graphs_routes_and_what_each_needs():
    from soflow_fast.step import StepPlan

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graphed = ["--cuda_graphs=loss", "--compile=true", "--compile_scope=loss", "--fsdp=false"]
    loss = build_config("digits", None, graphed)
    plan = StepPlan.resolve(loss, cuda, 1)
    assert plan.cuda_graphs == "loss" and plan.compile_loss
    step = build_config("digits", None, ["--cuda_graphs=step", "--fsdp=false", "--warmup_steps=0"])
    assert StepPlan.resolve(step, cuda, 1).cuda_graphs == "step"
    assert StepPlan.resolve(build_config("digits"), cuda, 1).cuda_graphs is None  # off unless asked for
    refused = [  # what each route needs, named by the setting that provides it
        (loss, cpu, ("parallel.cuda_graphs=loss", "CUDA", "cpu")),
        (merge(loss, {"compile_scope": "blocks"}), cuda, ("parallel.cuda_graphs=loss", "parallel.compile_scope=loss")),
        (merge(step, {"fsdp": True}), cuda, ("parallel.cuda_graphs=step", "parallel.fsdp=false")),
        (merge(step, {"warmup_steps": 100}), cuda, ("parallel.cuda_graphs=step", "optim.warmup_steps=0")),
        (merge(step, {"compile": True, "compile_scope": "loss"}), cuda, ("use parallel.cuda_graphs=loss",)),
    ]
    for cfg, device, names in refused:
        with raises_naming(ValueError, *names):
            StepPlan.resolve(cfg, device, 1)
    with raises_naming(ValueError, "parallel.cuda_graphs", "loss, step", "'always'"):
        build_config("digits", None, ["--cuda_graphs=always"])


def test_train_help_lists_every_config_key(capsys):
    from soflow_fast.config import SECTIONS
    from soflow_fast.train import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--key=value" in text and "--print_config" in text
    for sec, cls in SECTIONS.items():
        listed = text.split(f" {sec}: ", 1)[1]
        for name in cls.all_field_types():
            assert f" {name}," in f" {listed}" or f" {name} " in f" {listed} ", (sec, name)
