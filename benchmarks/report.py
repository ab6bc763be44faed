"""Render ``pytest benchmarks/ --benchmark-json=...`` output as a Markdown table and a PNG chart.

    python benchmarks/report.py benchmarks/results/cpu.json [more.json ...] --out benchmarks/results/cpu

Writes ``<out>.md`` and ``<out>.png``. Several JSON files (a CPU run and a GPU run) merge into one
report; each file's device, versions and date go in the header. Train-step rows that no file
measured are listed as skipped (with the reason) or, for the GPU sizes, "not measured" until a
GPU run's JSON is passed in. ``--summary summary.json`` (``benchmarks/summary.py``) puts the run's
summary table and the issue's checks first: the table the README's GPU section is regenerated from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import summary as summary_mod  # noqa: E402
from benchmarks._util import CPU_CASES, GPU_CASES, VARIANTS, Case, skip_reason  # noqa: E402

DISTURBED_CORES = 0.25  # other processes' average CPU use above which a row is flagged


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(sources: the meta block of each file, rows: every benchmark with its source index)."""
    sources, rows = [], []
    for i, path in enumerate(paths):
        data = json.loads(path.read_text())
        meta = data.get("soflow") or data.get("machine_info", {}).get("soflow", {})
        sources.append({"file": path.name, **meta})
        for b in data.get("benchmarks", []):
            rows.append(
                {
                    "name": b["name"],
                    "group": b.get("group") or "",
                    "stats": b["stats"],
                    "info": b.get("extra_info", {}),
                    "source": i,
                }
            )
    return sources, rows


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _load_flag(info: dict) -> str:
    other = info.get("other_load_cores")
    if other is None:
        return "-"
    return f"{other:.2f} (disturbed)" if other >= DISTURBED_CORES else f"{other:.2f}"


def _not_measured(variant: str, case: Case) -> str:
    reason = skip_reason(variant, case, cuda_available=True)
    if reason:
        return f"skipped: {reason}"
    return "not measured (GPU size: run benchmarks/gpu_suite.sh)" if case.device == "cuda" else "not measured"


def _memory(info: dict) -> tuple[str, str]:
    if "peak_mib" in info:
        return _fmt(info["peak_mib"]), "CUDA peak"
    return _fmt(info.get("saved_for_backward_mib")), "saved for bwd"


def _memory_mib(info: dict) -> float:
    """The memory figure as a number for the chart; NaN (no bar) where none was recorded."""
    try:
        return float(_memory(info)[0].replace(",", ""))
    except ValueError:
        return float("nan")


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def header(sources: list[dict]) -> list[str]:
    lines = ["# SoFlow step and sampling benchmarks", ""]
    for s in sources:
        peaks = ", ".join(
            f"{dev} {p['dtype']} {p['tflops']:.3g} TFLOP/s" for dev, p in (s.get("matmul_peaks") or {}).items()
        )
        lines.append(
            f"- `{s['file']}`: device **{s.get('device', '?')}**, torch {s.get('torch', '?')}, triton "
            f"{s.get('triton', '?')}, {s.get('threads', '?')} threads, {s.get('date', '?')}; measured matmul peak "
            f"{peaks or '-'}; load average (1/5/15 min) {s.get('loadavg_start', '?')} at start, "
            f"{s.get('loadavg_end', '?')} at end; session {s.get('session_s', '?')} s"
        )
    lines += [
        "",
        "Memory: on GPU the CUDA allocator's peak over one step; on CPU the activation bytes that autograd "
        "saves for backward (saved-tensor hooks, distinct storages, parameters excluded), and for the eager headline "
        "pair (the compiled one with SOFLOW_BENCH_RSS_COMPILED=1) also the resident-memory high-water mark of one "
        "step in a child process. `other load` is the CPU "
        f"that other processes used during the case, in cores; rows at {DISTURBED_CORES} or more are flagged.",
        "",
    ]
    return lines


def headline(rows: list[dict]) -> list[str]:
    """One section per headline mode (eager, compiled), the last row of each."""
    latest: dict[str, dict] = {}
    for r in rows:
        if r["group"].startswith("headline"):
            latest[r["info"].get("mode", "eager")] = r
    lines: list[str] = []
    train = train_rows(rows)
    for mode, r in latest.items():
        i = dict(r["info"])
        # model FLOPs per step from the eager train-step rows of the same case (the same for any mode)
        so, mf = (train.get((i["case"], v)) for v in ("soflow-reference-eager", "meanflow-eager"))
        if "soflow_gflop" not in i and so and mf and "flops_zero_tangent_left_out" in mf["info"]:
            i["soflow_gflop"] = so["info"]["flops_per_step"] / 1e9
            i["meanflow_gflop"] = mf["info"]["flops_per_step"] / 1e9
            i["flop_ratio_meanflow_over_soflow"] = i["meanflow_gflop"] / i["soflow_gflop"]
        lines += _headline_section(mode, i)
    return lines


def _headline_section(mode: str, i: dict) -> list[str]:
    variants = f" (`{i['soflow_variant']}` vs `{i['meanflow_variant']}`)" if "soflow_variant" in i else ""
    lines = [
        f"## Headline: SoFlow vs MeanFlow, {i['model']} ({i['case']}), batch {i['batch']}, {mode}{variants}",
        "",
        "| measure | SoFlow | MeanFlow | SoFlow / MeanFlow | goal |",
        "|---|---:|---:|---:|---|",
        f"| step time, median ms | {_fmt(i['soflow_step_ms_median'])} | {_fmt(i['meanflow_step_ms_median'])} | "
        f"{1 / i['speedup_soflow_over_meanflow_paired_median']:.3f} (SoFlow "
        f"{i['speedup_soflow_over_meanflow_paired_median']:.2f}x faster, median of per-round ratios; "
        f"{i['speedup_soflow_over_meanflow_minima']:.2f}x on minima) | >= 1.5x faster: "
        f"{'met' if i['goal_speedup_1p5'] else 'NOT met'} |",
        f"| activations saved for backward, MiB | {_fmt(i['soflow_saved_mib'])} | {_fmt(i['meanflow_saved_mib'])} | "
        f"{i['memory_ratio_saved']:.3f} | <= 0.7x: {'met' if i['goal_memory_0p7'] else 'NOT met'} |",
    ]
    if "soflow_rss_step_mib" in i:
        lines += [
            f"| resident growth over one step (child process), MiB | {_fmt(i['soflow_rss_step_mib'])} | "
            f"{_fmt(i['meanflow_rss_step_mib'])} | {i['memory_ratio_rss_step']:.3f} | |",
            f"| resident peak of the whole process, MiB | {_fmt(i['soflow_rss_peak_mib'])} | "
            f"{_fmt(i['meanflow_rss_peak_mib'])} | {i['memory_ratio_rss_peak']:.3f} | |",
        ]
    if "soflow_gflop" in i:
        lines.append(
            f"| model FLOPs per step, GFLOP | {_fmt(i['soflow_gflop'])} | {_fmt(i['meanflow_gflop'])} | "
            f"{1 / i['flop_ratio_meanflow_over_soflow']:.3f} (at equal efficiency SoFlow would be "
            f"{i['flop_ratio_meanflow_over_soflow']:.2f}x faster) | |"
        )
    if "soflow_compile_s" in i:
        lines.append(
            f"| compile, s (first step over a warm one) | {_fmt(i['soflow_compile_s'])} | "
            f"{_fmt(i['meanflow_compile_s'])} | | |"
        )
    lines += [
        "",
        f"Timing: {i.get('timing', 'interleaved steps')}. Load: 1-min average {i.get('loadavg_1m_start')} "
        f"-> {i.get('loadavg_1m_end')}, other processes {_load_flag(i)} cores.",
        "",
    ]
    return lines


def train_rows(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["info"]["case"], r["info"]["variant"]): r for r in rows if r["name"].startswith("test_train_step")}


def cases_of(train: dict) -> tuple[list[Case], set[str]]:
    """(the benchmark cases, then those that only the JSON files hold (sizes of an earlier run); the
    ids of the latter, whose unmeasured variants the tables leave out)."""
    known = CPU_CASES + GPU_CASES
    ids = {c.id for c in known}
    extra: dict[str, Case] = {}
    for (cid, _), r in train.items():
        i = r["info"]
        if cid in ids or cid in extra or not {"model", "input", "batch", "num_classes"} <= i.keys():
            continue
        channels, size, _ = (int(v) for v in i["input"].split("x"))
        case = Case(i["model"], size, i["batch"], i["num_classes"], channels, device=cid.split("-", 1)[0])
        if case.id == cid:
            extra[cid] = case
    return known + list(extra.values()), set(extra)


def comparison(train: dict) -> list[str]:
    lines = [
        "## SoFlow vs MeanFlow per case (from the train-step rows)",
        "",
        "| case | mode | SoFlow ms | MeanFlow ms | SoFlow speed-up | SoFlow / MeanFlow memory |",
        "|---|---|---:|---:|---:|---:|",
    ]
    n = 0
    for case in cases_of(train)[0]:
        for mode, so, mf in (
            ("eager", "soflow-reference-eager", "meanflow-eager"),
            ("compiled", "soflow-reference-compiled", "meanflow-compiled"),
            ("whole-loss compiled", "soflow-loss-compiled", "meanflow-compiled"),
        ):
            a, b = train.get((case.id, so)), train.get((case.id, mf))
            if not (a and b):
                continue
            ta, tb = a["stats"]["median"], b["stats"]["median"]
            try:
                ma, mb = (float(_memory(x["info"])[0].replace(",", "")) for x in (a, b))
                ratio = f"{ma / mb:.3f}"
            except ValueError:  # a row without a memory figure (e.g. the memory step ran out of memory)
                ratio = "n/a"
            lines.append(f"| {case.id} | {mode} | {ta * 1e3:,.1f} | {tb * 1e3:,.1f} | {tb / ta:.2f}x | {ratio} |")
            n += 1
    return lines + [""] if n else []


def train_table(train: dict) -> list[str]:
    lines = [
        "## Train step (loss, backward, AdamW, EMA)",
        "",
        "| device | case | variant | dtype | step ms (median) | images/s | vs authors-loop | memory MiB | memory "
        "| GFLOP/step | TFLOP/s | MFU | compile s | other load |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    cases, extra = cases_of(train)
    for case in cases:
        for variant in VARIANTS:
            r = train.get((case.id, variant))
            if r is None and case.id in extra:
                continue
            if r is None:
                lines.append(
                    f"| {case.device} | {case.label} | {variant} | | {_not_measured(variant, case)} | | | | | | | | | |"
                )
                continue
            i = r["info"]
            mem, how = _memory(i)
            base = train.get((case.id, "authors-loop"))
            vs = f"{base['stats']['median'] / r['stats']['median']:.2f}x" if base else "-"
            lines.append(
                f"| {case.device} | {case.label} | {variant} | {i['dtype']} | "
                f"{r['stats']['median'] * 1e3:,.1f} | {_fmt(i['images_per_s'])} | {vs} | {mem} | {how} | "
                f"{i['flops_per_step'] / 1e9:,.1f} | {i['tflops']:.3f} | {i['mfu']:.1%} | "
                f"{_fmt(i.get('compile_s'))} | {_load_flag(i)} |"
            )
    lines += [
        "",
        "vs authors-loop: the authors' step time over this row's (above 1: faster than their structure). "
        "MFU: model FLOPs of the step (FlopCounterMode on the eager path: matmuls and convolutions; the "
        "CPU attention kernel is not counted, under 2% at these sizes; matmuls against a broadcast zero, the "
        "weight tangent that eager forward-mode AD multiplies in every JVP linear layer, are left out) over "
        "the measured matmul peak of the device (CPU: fp32; GPU: bf16). Rows without "
        "`flops_zero_tangent_left_out` (before 2026-11-23 06:00 UTC) still count those matmuls.",
        "",
    ]
    return lines


def summary_table(summary: dict) -> list[str]:
    """The run's summary.json (benchmarks/summary.py): the README's GPU table and the issue's checks."""
    return ["## Summary (summary.json)", "", *summary_mod.markdown(summary)]


def sampling_table(rows: list[dict]) -> list[str]:
    hits = [r for r in rows if r["name"].startswith("test_sampling")]
    if not hits:
        return []
    lines = [
        "## Sampling (1 network call vs 50-step flow-matching Euler, same network)",
        "",
        "| case | sampler | NFE | ms / batch | images/s | 1-step speed-up | other load |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    one = {r["info"]["case"]: r["stats"]["median"] for r in hits if r["info"]["nfe"] == 1}
    for r in sorted(hits, key=lambda r: (r["info"]["case"], r["info"]["nfe"])):
        i = r["info"]
        base = one.get(i["case"])
        speed = f"{r['stats']['median'] / base:.1f}x" if base and i["nfe"] != 1 else ""
        lines.append(
            f"| {i['case']} | {i['sampler']} | {i['nfe']} | {r['stats']['median'] * 1e3:,.1f} | "
            f"{_fmt(i['images_per_s'])} | {speed} | {_load_flag(i)} |"
        )
    return lines + [""]


def ema_table(rows: list[dict]) -> list[str]:
    hits = [r for r in rows if r["name"].startswith("test_ema")]
    if not hits:
        return []
    lines = [
        "## EMA update (benchmarks/test_ema_bench.py)",
        "",
        "| group | test | median ms | GB/s |",
        "|---|---|---:|---:|",
    ]
    for r in hits:
        gbps = r["info"].get("gbps_median", r["info"].get("1_decay_fraction_of_copy"))
        lines.append(f"| {r['group']} | {r['name']} | {r['stats']['median'] * 1e3:,.2f} | {_fmt(gbps, 2)} |")
    return lines + [""]


# ----------------------------------------------------------------------------------------------
# Chart
# ----------------------------------------------------------------------------------------------


def chart(train: dict, rows: list[dict], sources: list[dict], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
        from matplotlib.patches import Patch
    except ImportError:
        print("report.py: matplotlib is not installed, no PNG written", file=sys.stderr)
        return False
    measured = [(c, v, train[(c.id, v)]) for c in cases_of(train)[0] for v in VARIANTS if (c.id, v) in train]
    samples = sorted(
        (r for r in rows if r["name"].startswith("test_sampling")), key=lambda r: (r["info"]["case"], r["info"]["nfe"])
    )
    families = {"soflow": "tab:blue", "meanflow": "tab:red", "authors": "tab:gray"}
    colors = [families[VARIANTS[v].objective] for _, v, _ in measured]
    labels = [f"{c.label}  {v}" for c, v, _ in measured]
    height = max(4.0, 0.38 * max(len(measured), 1) + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(19, height), gridspec_kw={"width_ratios": [1, 1, 0.9]})
    ypos = list(range(len(measured)))[::-1]
    panels = [
        (axes[0], [r["info"]["images_per_s"] for _, _, r in measured], "train step: images/s (log)", True),
        (
            axes[1],
            [_memory_mib(r["info"]) for _, _, r in measured],
            "train step memory, MiB (CPU: saved for backward; GPU: CUDA peak)",
            False,
        ),
    ]
    hatches = ["//" if VARIANTS[v].compiles(c.device) else "" for c, v, _ in measured]
    for ax, values, title, log in panels:
        ax.barh(ypos, values, color=colors, hatch=hatches, edgecolor="white")
        ax.set_yticks(ypos, labels if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            _log_axis(ax, ticker)
        for y, val in zip(ypos, values, strict=True):
            ax.text(val, y, f" {val:,.1f}", va="center", fontsize=7)
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3)
    ax = axes[2]
    sp = list(range(len(samples)))[::-1]
    vals = [r["info"]["images_per_s"] for r in samples]
    ax.barh(sp, vals, color=["tab:blue" if r["info"]["nfe"] == 1 else "tab:orange" for r in samples])
    ax.set_yticks(sp, [f"{r['info']['case']}  {r['info']['sampler']}" for r in samples], fontsize=8)
    ax.yaxis.tick_right()
    _log_axis(ax, ticker, subs=(1.0,))  # spans three decades or more
    ax.set_title("sampling: images/s (log); blue 1 call, orange 50-step Euler", fontsize=10)
    for y, val in zip(sp, vals, strict=True):
        ax.text(val, y, f" {val:,.1f}", va="center", fontsize=7)
    ax.margins(x=0.3)
    ax.grid(axis="x", alpha=0.3)
    legend = [Patch(color=c, label=f) for f, c in families.items()]
    legend.append(Patch(facecolor="lightgray", hatch="//", edgecolor="white", label="compiled"))
    axes[1].legend(handles=legend, loc="upper right", fontsize=8)
    title = "; ".join(
        f"{s.get('device', '?')} | torch {s.get('torch', '?')} | triton {s.get('triton', '?')} | {s.get('date', '?')}"
        for s in sources
    )
    fig.suptitle(
        f"SoFlow benchmarks: {title}\nblue SoFlow (ours), red MeanFlow, gray authors' step structure", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _log_axis(ax, ticker, subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    """Log scale labelled at 1-2-5 steps in plain numbers; matplotlib's minor labels overlap on short axes."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent / "results"
    p.add_argument("json", nargs="*", type=Path, default=[here / "cpu.json"], help="--benchmark-json files")
    p.add_argument("--out", type=Path, default=None, help="output prefix (default: beside the first JSON)")
    p.add_argument("--summary", type=Path, default=None, help="a summary.json (benchmarks/summary.py) to render first")
    args = p.parse_args(argv)
    missing = [str(f) for f in [*args.json, *([args.summary] if args.summary else [])] if not f.is_file()]
    if missing:
        print(f"report.py: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out or args.json[0].with_suffix("")
    sources, rows = load(args.json)
    train = train_rows(rows)
    md = header(sources)
    if args.summary:
        md += summary_table(json.loads(args.summary.read_text()))
    md += headline(rows) + comparison(train) + train_table(train)
    md += sampling_table(rows) + ema_table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = Path(f"{out}.png")
    if chart(train, rows, sources, png):
        md += [f"![chart]({png.name})", ""]
    Path(f"{out}.md").write_text("\n".join(md))
    print(f"wrote {out.with_suffix('.md')}" + (f" and {png}" if png.exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
