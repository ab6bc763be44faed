"""Teacher mode (soflow_fast.teacher): the loss against a per-sample reference written from SPEC.md with the
teacher's velocities, the loss without a teacher bit for bit as before, the calls it makes, and the
flow-model sources (a SiT checkpoint's time convention, init_from)."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from soflow_fast import ops
from soflow_fast.draws import Draws
from soflow_fast.ema import EMA
from soflow_fast.models import DiT, DiTConfig
from soflow_fast.models.dit import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
)
from soflow_fast.models.sit import reverse_time
from soflow_fast.network_calls import call, cat_rows, dropout_active, rows_of, same_masks_after
from soflow_fast.objective import SoFlowConfig, SoFlowObjective, _bcast
from soflow_fast.presets import build_config
from soflow_fast.teacher import init_from, load_teacher, read_flow_model
from tests.utils import assert_rel_close

NCLS = 10
SIZES = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=NCLS)


def randomised(m: nn.Module, seed: int, dtype=torch.float64) -> nn.Module:
    """Every weight drawn (adaLN-Zero would make F identically 0), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.to(dtype)


def tiny_dit(seed: int, dtype=torch.float64) -> DiT:
    return randomised(DiT(**SIZES), seed, dtype)


# ----------------------------------------------------------------------------------------------
# The loss against a per-sample reference (SPEC.md, the teacher's velocity in place of v_t)
# ----------------------------------------------------------------------------------------------


# The scalar functions of time are evaluated on the drawn float32 times with float32 arithmetic, as the
# engine evaluates them (its draws are float32), so that the comparison can be held to float64's precision.


def _alpha_beta(noising: str, t: torch.Tensor):
    """(alpha, beta, alpha', beta') of SPEC's noising at time t."""
    if noising == "Linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = math.pi / 2
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def _coefficients(coef: str, t: torch.Tensor, s: torch.Tensor):
    """(a, b) of f = a x + b F, and (da/ds, db/ds) at s = t."""
    if coef == "Euler":
        return torch.ones_like(t), s - t, torch.zeros_like(t), torch.ones_like(t)
    h = math.pi / 2
    return torch.cos(h * (s - t)), torch.sin(h * (s - t)), torch.zeros_like(t), torch.full_like(t, h)


def _decay(cfg: SoFlowConfig, t: torch.Tensor) -> torch.Tensor:
    """SPEC's g(t), in the precision of the drawn t (float32) as the engine computes it."""
    if cfg.cfg_decay_time >= 1 or t <= cfg.cfg_decay_time:
        return torch.ones_like(t)
    d = ((1 - t) / (1 - cfg.cfg_decay_time)).clamp(0, 1 - 1e-6)
    return 1 - torch.exp(-0.025 * d / (1 - d))


def reference_loss(cfg: SoFlowConfig, model, teacher, x0, y, d: Draws, guided: bool):
    """The teacher-mode loss, one sample and one network call at a time."""
    B, n_fm, null = x0.shape[0], d.n_fm, torch.tensor([NCLS])
    one = lambda v: v.reshape(1)  # noqa: E731

    def student(x, t, s, label):  # F(x, t, s | label), one row
        return model(x[None], one(t), one(s), label)[0]

    def v_teacher(x, t, label):
        return teacher(x[None], one(t), one(t), label)[0]

    def field(x, t, i):  # the velocity of the teacher's ODE for sample i (guided without the mix)
        if not guided:
            return v_teacher(x, t, y[i : i + 1] if y is not None else None)
        v_u = v_teacher(x, t, null)
        if d.cfg_mask[i]:
            return v_u
        v_c = v_teacher(x, t, y[i : i + 1])
        return v_c + _decay(cfg, t) * (cfg.cfg_scale - 1) * (v_c - v_u)

    total = x0.new_zeros(())
    for i in range(B):
        t, s, l = d.t[i], d.s[i], d.l[i]
        al, be, _, _ = _alpha_beta(cfg.noising_type, t)
        x_t = al * x0[i] + be * d.noise[i]
        label = (null if d.cfg_mask[i] else y[i : i + 1]) if guided else (None if y is None else y[i : i + 1])
        if i < n_fm:
            _, _, dads, dbds = _coefficients(cfg.coefficient_type, t, t)
            v_pred = dads * x_t + dbds * student(x_t, t, t, label)
            with torch.no_grad():
                if guided and not d.cfg_mask[i]:
                    v_c, v_u = v_teacher(x_t, t, y[i : i + 1]), v_teacher(x_t, t, null)
                    v_g = v_c + _decay(cfg, t) * (cfg.cfg_scale - 1) * (v_c - v_u)
                    target = cfg.mix_ratio * v_g + (1 - cfg.mix_ratio) * v_pred.detach()
                else:
                    target = v_teacher(x_t, t, label)
            mse = ((v_pred - target) ** 2).mean()
            w = 1.0 / (dbds.abs() * (mse.detach() + cfg.eps) ** cfg.p)
            total = total + w * mse / B
            continue
        with torch.no_grad():
            if cfg.teacher_steps:  # Heun from t to l in K uniform steps (their times as the integrator spaces them)
                x, K = x_t, cfg.teacher_steps
                for k in range(K):
                    a, b = torch.lerp(t, l, k / K), torch.lerp(t, l, (k + 1) / K)
                    v1 = field(x, a, i)
                    v2 = field(x + (b - a) * v1, b, i)
                    x = x + (b - a) * (v1 + v2) / 2
                x_l = x
            else:  # one Euler step of SPEC's u with the teacher's velocities, mixed with the student's own
                if guided and not d.cfg_mask[i]:
                    v_c, v_u = v_teacher(x_t, t, y[i : i + 1]), v_teacher(x_t, t, null)
                    u = v_c + _decay(cfg, t) * (cfg.cfg_scale - 1) * (v_c - v_u)
                    if cfg.mix_ratio != 1:
                        _, _, dads, dbds = _coefficients(cfg.coefficient_type, t, t)
                        v_mix = dads * x_t + dbds * student(x_t, t, t, y[i : i + 1])
                        u = cfg.mix_ratio * u + (1 - cfg.mix_ratio) * v_mix
                else:
                    u = v_teacher(x_t, t, label)
                x_l = x_t + u * (l - t)
            a_l, b_l, _, _ = _coefficients(cfg.coefficient_type, l, s)
            f_l = a_l * x_l + b_l * student(x_l, l, s, label)
        a_t, b_t, _, _ = _coefficients(cfg.coefficient_type, t, s)
        nn_t = student(x_t, t, s, label)
        dq = ((a_t * x_t + b_t * nn_t.detach() - f_l) / (t - l)).detach()
        w = 1.0 / ((dq**2).mean() + cfg.eps) ** cfg.p
        total = total + torch.sign(b_t) * (nn_t * dq * w).mean() / B
    return total


TEACHER_CONFIGS = {
    "guided-mix-K0": dict(),
    "guided-nomix-K0": dict(mix_ratio=1.0),
    "guided-K3": dict(teacher_steps=3, cfg_decay_time=0.5),
    "guided-allscm-K2": dict(teacher_steps=2, velocity_loss_ratio=0.0),
    "unguided-K0": dict(cfg_scale=1.0, p=0.75, eps=0.001),
    "unguided-trig-K2": dict(cfg_scale=1.0, teacher_steps=2, noising_type="Trig", coefficient_type="Trig"),
}


@pytest.mark.parametrize("name", list(TEACHER_CONFIGS))
def test_teacher_loss_equals_the_per_sample_reference(name):
    cfg = SoFlowConfig(total_steps=100, cfg_drop_rate=0.3, l_init_ratio=0.5, **TEACHER_CONFIGS[name])
    model, teacher = tiny_dit(0), tiny_dit(1)
    x0 = torch.randn(7, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.arange(7) % NCLS
    obj = SoFlowObjective(cfg, num_classes=NCLS, teacher=teacher)
    d = obj.draw(x0, y, step=40, generator=torch.Generator().manual_seed(3))
    guided = obj.guided(y)
    if guided:
        assert d.cfg_mask.any() and not d.cfg_mask.all(), "pick a seed that masks some but not all rows"
    loss, _ = obj.loss_from_draws(model, x0, y, d)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = reference_loss(cfg, model, teacher, x0, y, d, guided)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert_rel_close(loss, ref, 1e-10, "loss")
    for (pname, _), g1, g2 in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert_rel_close(g1, g2, 1e-9, f"grad {pname}")
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_the_teacher_changes_the_loss_and_takes_no_gradient():
    cfg = SoFlowConfig(total_steps=100, cfg_drop_rate=0.3, teacher_steps=2)
    model, x0, y = tiny_dit(0), torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.arange(6)
    d = SoFlowObjective(cfg, num_classes=NCLS, teacher=tiny_dit(1)).draw(x0, y, generator=torch.Generator())
    a = SoFlowObjective(cfg, num_classes=NCLS, teacher=tiny_dit(1)).loss_from_draws(model, x0, y, d)[0]
    b = SoFlowObjective(cfg, num_classes=NCLS, teacher=tiny_dit(4)).loss_from_draws(model, x0, y, d)[0]
    assert torch.isfinite(a) and not torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Without a teacher: the loss of the code before teacher mode, bit for bit
# ----------------------------------------------------------------------------------------------


def loss_before_teacher_mode(obj: SoFlowObjective, model, x0, y, d: Draws, kw=None):
    """``SoFlowObjective.loss_from_draws`` as it was before teacher mode (commit d1bccc4), verbatim but for
    ``self`` -> ``obj``: the no-teacher path must run exactly these operations."""
    cfg = obj.config
    B, n_fm = x0.shape[0], d.n_fm
    n_scm = B - n_fm
    sl = slice(n_fm, B)
    x_t, v_t = obj.interpolate(x0, d.noise, d.t)
    guided = obj.guided(y)
    y_in = obj.mask_labels(y, d.cfg_mask) if guided else y
    mix_scm = guided and cfg.mix_ratio != 1 and n_scm > 0
    with torch.no_grad():
        if guided:
            xs, ts, ys, kws = [x_t], [d.t], [obj.null_labels(B, x0.device)], [kw]
            if mix_scm:
                xs.append(x_t[sl])
                ts.append(d.t[sl])
                ys.append(y[sl])
                kws.append(rows_of(kw, sl))
            x_g, t_g = torch.cat(xs), torch.cat(ts)
            v_g = obj.velocity_from_network(x_g, t_g, call(model, x_g, t_g, t_g, torch.cat(ys), cat_rows(kws)))
            v_uncond = v_g[:B]
        if n_scm:
            if guided:
                v_mix = v_g[B:] if mix_scm else None
                u = obj.guided_velocity(v_t[sl], d.t[sl], v_uncond[sl], v_mix, d.cfg_mask[sl])
            else:
                u = v_t[sl]
            x_l = x_t[sl] + u * _bcast(d.l[sl] - d.t[sl], u)
    same_masks = n_scm > 0 and dropout_active(model)
    if n_scm:
        with same_masks_after(same_masks, x0.device), torch.no_grad():
            if same_masks and n_fm:
                x_in, t_in = torch.cat([x_t[:n_fm], x_l]), torch.cat([d.t[:n_fm], d.l[sl]])
                nn_l = call(model, x_in, t_in, d.s, y_in, kw)[sl]
            else:
                nn_l = call(model, x_l, d.l[sl], d.s[sl], None if y_in is None else y_in[sl], rows_of(kw, sl))
    net = call(model, x_t, d.t, d.s, y_in, kw)
    total = x0.new_zeros(())
    logs = {}
    if n_fm:
        fm = slice(0, n_fm)
        v_pred = obj.velocity_from_network(x_t[fm], d.t[fm], net[fm])
        if guided:
            target = obj.guided_velocity(v_t[fm], d.t[fm], v_uncond[fm], v_pred.detach(), d.cfg_mask[fm])
        else:
            target = v_t[fm]
        fm_loss, fm_mse, fm_w = ops.adaptive_velocity_loss(
            v_pred, target.detach(), obj.coefficient_rates(d.t[fm])[1], cfg.p, cfg.eps
        )
        total = total + fm_loss * (n_fm / B)
        logs.update(fm_loss=fm_loss.detach(), fm_mse=fm_mse, fm_weight=fm_w)
    if n_scm:
        scm_loss, scm_mse, scm_w = ops.euler_consistency_loss(
            net[sl], x_t[sl], x_l.detach(), nn_l.detach(), d.t[sl], d.l[sl], d.s[sl], cfg.p, cfg.eps,
            trig=cfg.coefficient_type == "Trig",
        )  # fmt: skip
        total = total + scm_loss * (n_scm / B)
        logs.update(scm_loss=scm_loss.detach(), scm_mse=scm_mse, scm_weight=scm_w)
    logs["loss"] = total.detach()
    return total, logs


class DropoutMLP(nn.Module):
    """A network on flat data with dropout and a per-row extra input (the U-Net's augmentation labels' kind)."""

    def __init__(self, dim=5, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(NCLS + 1, hidden)
        self.inp = nn.Linear(dim + 2, hidden)
        self.shift = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Sequential(nn.SiLU(), nn.Dropout(0.2), nn.Linear(hidden, dim))

    def forward(self, x, t, s, y=None, shift=None):
        y = torch.full((x.shape[0],), NCLS, dtype=torch.long) if y is None else y
        h = self.inp(torch.cat([x, t[:, None].to(x.dtype), (t - s)[:, None].to(x.dtype)], dim=1))
        return self.out(h + self.emb(y).to(x.dtype) + self.shift(shift))


NO_TEACHER_CONFIGS = {
    "guided": dict(),
    "guided-trig": dict(noising_type="Trig", coefficient_type="Trig"),
    "guided-nomix": dict(mix_ratio=1.0, cfg_decay_time=1.0),
    "allfm": dict(velocity_loss_ratio=1.0),
    "allscm": dict(velocity_loss_ratio=0.0, l_schedule="Cosine"),
    "unguided": dict(cfg_scale=1.0, noising_type="Trig", p=0.75, eps=0.001),
}


@pytest.mark.parametrize("name", list(NO_TEACHER_CONFIGS))
@pytest.mark.parametrize("net", ["dit32", "dit64", "dropout-mlp"])
def test_without_a_teacher_the_loss_is_bit_identical(name, net):
    cfg = SoFlowConfig(total_steps=100, cfg_drop_rate=0.3, **NO_TEACHER_CONFIGS[name])
    g = torch.Generator().manual_seed(5)
    kw = None
    if net == "dropout-mlp":
        model, x0 = randomised(DropoutMLP(), 0), torch.randn(8, 5, dtype=torch.float64, generator=g)
        kw = {"shift": torch.randn(8, 5, dtype=torch.float64, generator=g)}
    else:
        dtype = torch.float32 if net == "dit32" else torch.float64
        model, x0 = tiny_dit(0, dtype), torch.randn(8, 3, 8, 8, dtype=dtype, generator=g)
    y = torch.arange(8) % NCLS
    obj = SoFlowObjective(cfg, num_classes=NCLS, teacher=None)
    d = obj.draw(x0, y, step=40, generator=torch.Generator().manual_seed(3))
    runs = []
    for fn in (obj.loss_from_draws, lambda *a: loss_before_teacher_mode(obj, *a)):
        torch.manual_seed(11)  # the dropout masks
        loss, logs = fn(model, x0, y, d, kw)
        runs.append((loss, logs, torch.autograd.grad(loss, list(model.parameters()))))
    (l1, logs1, g1), (l2, logs2, g2) = runs
    assert torch.equal(l1, l2)
    assert logs1.keys() == logs2.keys() and all(torch.equal(logs1[k], logs2[k]) for k in logs1)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


# ----------------------------------------------------------------------------------------------
# Calls and refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 3])
def test_calls_of_the_teacher_and_the_student(steps):
    """Guided, 8 rows (6 FM, 2 consistency): the teacher once on 2 x 8 rows (conditional and null), then
    2K - 1 Heun calls on 2 x 2 rows; the student's guidance pass is the mix's 2 rows (K = 0 only)."""
    model, teacher = tiny_dit(0, torch.float32), tiny_dit(1, torch.float32)
    seen = {"student": [], "teacher": []}
    model.register_forward_hook(lambda m, i, o: seen["student"].append(i[0].shape[0]))
    teacher.register_forward_hook(lambda m, i, o: seen["teacher"].append(i[0].shape[0]))
    obj = SoFlowObjective(SoFlowConfig(teacher_steps=steps), num_classes=NCLS, teacher=teacher)
    obj.loss(model, torch.randn(8, 3, 8, 8), torch.arange(8), generator=torch.Generator().manual_seed(0))
    assert seen["teacher"] == [16] + [4] * (2 * steps - 1 if steps else 0)
    assert seen["student"] == ([2] if steps == 0 else []) + [2, 8]  # (mix), targets, the grad pass


def test_refusals():
    with pytest.raises(ValueError, match="teacher_steps=2 integrates a teacher's ODE"):
        SoFlowObjective(SoFlowConfig(teacher_steps=2))
    obj = SoFlowObjective(SoFlowConfig(), num_classes=NCLS, teacher=tiny_dit(1))
    x0, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.arange(2)
    with pytest.raises(ValueError, match="velocity_loss is the authors' per-term loss"):
        obj.velocity_loss(tiny_dit(0), x0, x0, torch.rand(2), y, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="run.teacher is SoFlow's teacher mode"):
        build_config("digits", None, ["--objective=fm", "--teacher=somewhere"])
    with pytest.raises(ValueError, match="soflow.teacher_steps=2 integrates a teacher's ODE: set run.teacher"):
        build_config("digits", None, ["--teacher_steps=2"])
    cfg = build_config("digits", None, ["--teacher=t", "--init_from=i", "--teacher_steps=4"])
    assert (cfg.run.teacher, cfg.run.init_from, cfg.soflow.teacher_steps) == ("t", "i", 4)


# ----------------------------------------------------------------------------------------------
# A SiT checkpoint: SiT's names, its time reversed, its velocity x0 - eps
# ----------------------------------------------------------------------------------------------


class TinySiT(nn.Module):
    """SiT's network (facebookresearch/SiT models.py) at a tiny size: DiT's modules and names, one time
    embedder fed SiT's time tau (tau = 1 is data), ``learn_sigma`` doubling the output channels."""

    def __init__(self, learn_sigma: bool, input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
                 num_heads=4, num_classes=NCLS):  # fmt: skip
        super().__init__()
        self.p, self.c = patch_size, in_channels * (2 if learn_sigma else 1)
        self.in_channels, self.learn_sigma = in_channels, learn_sigma
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, 0.1)
        n = (input_size // patch_size) ** 2
        pos = torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, int(n**0.5))).float()[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.c)

    def forward(self, x, tau, y):
        B, _, H, _ = x.shape
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(tau) + self.y_embedder(y, B, x.device)
        for block in self.blocks:
            h = block(h, c)
        out = self.final_layer(h, c).view(B, h.shape[1], -1)
        g = H // self.p
        out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, self.p, self.p, self.c))
        out = out.reshape(B, self.c, H, H)
        return out[:, : self.in_channels] if self.learn_sigma else out


def _dit_config(**extra) -> DiTConfig:
    return DiTConfig.from_dict({**SIZES, "model": "DiT-T/2", **extra})


def _sit_file(tmp_path, learn_sigma: bool, layout: str, args: argparse.Namespace | None = None):
    sit = randomised(TinySiT(learn_sigma), 7, torch.float32).eval()
    if layout == "state_dict":
        state = sit.state_dict()
    else:  # SiT's train.py checkpoint: EMA weights under "ema", its argparse args beside them
        noise = {k: v + 1 for k, v in sit.state_dict().items()}  # "model" differs: the EMA must be the one read
        args = args or argparse.Namespace(path_type="Linear", prediction="velocity", model="SiT-XL/2")
        state = {"model": noise, "ema": sit.state_dict(), "opt": {"state": {}, "param_groups": []}, "args": args}
    path = tmp_path / f"sit_{learn_sigma}_{layout}.pt"
    torch.save(state, path)
    return sit, path


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("layout", ["state_dict", "training_checkpoint"])
def test_a_sit_checkpoint_loads_with_its_time_reversed(tmp_path, learn_sigma, layout):
    """F(x, t, s) of the converted DiT equals -v_SiT(x, 1 - t) for every s (its s-embedder adds 0)."""
    sit, path = _sit_file(tmp_path, learn_sigma, layout)
    model, kind, what = read_flow_model(path, _dit_config(), SoFlowConfig())
    assert isinstance(model, DiT) and "DiT adapter" in what and not model.training
    assert torch.count_nonzero(model.s_embedder.mlp[0].weight) > 0  # it learns: only its output starts at zero
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 3, 9, NCLS, 1, 2])
    t = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.93, 1.0])
    with torch.no_grad():
        want = -sit(x, 1 - t, y)
        assert_rel_close(model(x, t, t, y), want, 2e-6, "F(x, t, t)")
        assert_rel_close(model(x, t, t * 0.3, y), want, 2e-6, "F(x, t, s)")
        assert not torch.allclose(model(x, t, t, y), -sit(x, t, y), rtol=1e-3)  # the time does matter


def test_sit_checkpoints_of_other_paths_and_foreign_files_are_refused(tmp_path):
    _, path = _sit_file(tmp_path, True, "training_checkpoint", argparse.Namespace(path_type="GVP"))
    with pytest.raises(ValueError, match="path_type=GVP: only path_type=Linear converts"):
        read_flow_model(path, _dit_config(), SoFlowConfig())
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a torch file of weights"):
        read_flow_model(tmp_path / "notes.pt", _dit_config(), SoFlowConfig())
    _, path = _sit_file(tmp_path, False, "state_dict")
    with pytest.raises(ValueError, match="shape mismatch"):  # another width than the checkpoint's
        read_flow_model(path, _dit_config(hidden_size=64), SoFlowConfig())


def test_reverse_time_reads_the_sinusoid_of_one_minus_t():
    emb = randomised(TimestepEmbedder(16), 3, torch.float32)
    flipped = TimestepEmbedder(16)
    flipped.load_state_dict({**emb.state_dict(), "mlp.0.weight": reverse_time(emb.mlp[0].weight)})
    t = torch.linspace(0, 1, 11)
    assert_rel_close(flipped(t), emb(1 - t), 2e-6, "embedding")


def test_init_from_a_sit_checkpoint_sets_the_model_and_every_ema_average(tmp_path):
    sit, path = _sit_file(tmp_path, True, "state_dict")
    cfg = build_config("digits", None, [f"--init_from={path}", *_dit_overrides()])
    torch.manual_seed(0)
    model = cfg.model.build()
    ema = EMA(model, decays=(0.9, 0.99))
    lines = []
    init_from(cfg, model, ema, say=lines.append)
    assert lines == [f"initialised the model and its EMA from checkpoint {path} (DiT adapter)"]
    for k in range(2):
        for name, p in model.named_parameters():
            assert torch.equal(ema.shadows[k][name], p), name
    assert ema.num_updates == 0
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0.2, 0.6, 1.0]), torch.tensor([1, 2, NCLS])
    with torch.no_grad():
        assert_rel_close(model(x, t, t, y), -sit(x, 1 - t, y), 2e-6, "F(x, t, t)")


def _dit_overrides() -> list[str]:
    return ["--model=DiT-T/2", "--input_size=8", "--in_channels=3", f"--num_classes={NCLS}", "--hidden_size=32",
            "--depth=2", "--num_heads=4"]  # fmt: skip


def test_load_teacher_checks_what_it_generates(tmp_path):
    _, path = _sit_file(tmp_path, False, "state_dict")
    cfg = build_config("digits", None, [f"--teacher={path}", *_dit_overrides()])
    teacher, note = load_teacher(cfg, torch.device("cpu"), torch.float32, sharded=False)
    assert "frozen, a full replica on every rank" in note
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    half, _ = load_teacher(cfg, torch.device("cpu"), torch.bfloat16, sharded=True)  # FSDP's param dtype
    assert half.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert half.t_embedder.mlp[0].weight.dtype == torch.float32  # the kind's fp32 modules stay fp32


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(in_channels=1), r"generates \(1, 8, 8\) conditioned on \('labels', 10\); this run trains \(3, 8, 8\)"),
        (dict(num_classes=4), "conditioned on"),
        (dict(class_dropout_prob=0.0), "calls the teacher with the null label"),
    ],
)
def test_load_teacher_refuses_a_teacher_that_does_not_fit(monkeypatch, change, message):
    """A run or exported teacher records its own model config: it must generate what the student does, and
    have a null label when guidance trains."""
    cfg = build_config("digits", None, ["--teacher=elsewhere", *_dit_overrides()])
    kind = dataclasses.replace(cfg.model, **change)
    monkeypatch.setattr("soflow_fast.teacher.read_flow_model", lambda *a: (kind.build(), kind, "run elsewhere"))
    with pytest.raises(ValueError, match=message):
        load_teacher(cfg, torch.device("cpu"), torch.float32, sharded=False)
