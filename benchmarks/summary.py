"""``summary.json`` of a GPU suite run (issue #18): one row per (case, variant), and the issue's checks.

    python benchmarks/summary.py gpu.json gpu_compiled_B2.json ... [--train-log train_b2_log.txt ...]
        --out results/summary.json [--markdown]

Reads the suite's pytest-benchmark JSON files (``benchmarks/test_train_step.py`` rows) and, with
``--train-log``, the trainer's log of the suite's ``train`` stage (its ``config.yaml`` beside it, as
the suite copies them: ``train_b2_log.txt`` and ``train_b2_config.yaml``). Writes

    {"device", "date", "torch", "triton",
     "rows": [{"case", "variant", "step_ms", "images_per_s", "peak_gib", "mfu"}, ...],
     "checks": {name: true | false | null}, "check_details": {name: {...}},
     "mfu_peak": {"tflops", "dtype", "shape"}, "sources": [file names]}

``case`` is ``Case.short`` (``B2-b64``); ``variant`` a key of ``benchmarks._util.VARIANTS``
(``trainer-default`` is what ``train.py`` runs with no flags), or ``trainer-loop`` for the trainer's
real loop (``trainer-loop-loss-compiled``, ``-loss-graphs`` and ``-step-graphs`` for the suite's
TRAIN_SCOPES=loss, graphs and stepgraph runs). ``step_ms`` is the
median step time, ``images_per_s`` the batch over it, ``peak_gib`` the CUDA allocator's peak over one
step (null on CPU, where the benchmarks record no such peak), ``mfu`` the step's model FLOPs per
second over the dense matmul peak measured in the same run (bf16 on CUDA; ``mfu_peak``: the highest
that the run's benchmark sessions measured, so the most conservative), null where a field was not
measured. A run's rows are those of one device: CUDA when any JSON holds a CUDA row, else CPU (the
suite's dry run). ``checks`` are the issue's "what must show" conditions computed from the rows:
true, false, or null where the rows needed were not measured; ``check_details`` gives the numbers.
``--markdown`` prints the table (``markdown``, which ``report.py --summary`` also renders).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import GPU_CASES, VARIANTS, environment, short_case  # noqa: E402

ROW_KEYS = ("case", "variant", "step_ms", "images_per_s", "peak_gib", "mfu")
TRAIN_LOOP = "trainer-loop"
# the suite's TRAIN_SCOPES -> variant name
_LOOP_SUFFIX = {"loss": "-loss-compiled", "graphs": "-loss-graphs", "stepgraph": "-step-graphs"}
DEFAULT, DEFAULT_FUSED, MEANFLOW = "trainer-default", "trainer-default-fused", "meanflow-compiled"

# the issue's thresholds
WITHIN_FASTEST = 1.05  # trainer-default step time over the fastest SoFlow variant's, at every case
MFU_MIN = {"B2-b256": 0.50, "XL2-b128": 0.55}  # trainer-default
MEANFLOW_RATIO = ("B2-b64", 1.7)  # meanflow-compiled / trainer-default step time at least this

CHECK_RULES = {
    "trainer_default_within_5pct_of_fastest_soflow": (
        f"at every case, trainer-default's step time <= {WITHIN_FASTEST} x the fastest SoFlow variant's "
        "(the trainer-default variants included; two SoFlow rows at least)"
    ),
    "trainer_default_mfu": "MFU of trainer-default >= "
    + " and ".join(f"{v:.0%} at {c}" for c, v in MFU_MIN.items())
    + " (of the dense bf16 matmul peak measured in the same run)",
    "meanflow_compiled_over_trainer_default": (
        f"meanflow-compiled / trainer-default step time >= {MEANFLOW_RATIO[1]} at {MEANFLOW_RATIO[0]}"
    ),
    "fused_on_vs_off_default_path": (
        "trainer-default (fused ops off, the trainer's default) and trainer-default-fused (on) both measured at "
        "every case; the details give off / on step time (above 1: the fused ops are faster)"
    ),
}


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _row_device(info: dict) -> str:
    return str(info.get("case", "")).split("-", 1)[0]


def load_step_rows(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(sources: each file's ``soflow`` meta block and name; rows: its train-step benchmarks, flattened)."""
    sources, rows = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = data.get("soflow") or data.get("machine_info", {}).get("soflow", {})
        sources.append({"file": Path(path).name, **meta})
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            if not b["name"].startswith("test_train_step") or "variant" not in info:
                continue
            rows.append(
                {
                    "case": short_case(info["model"], info["batch"]),
                    "variant": info["variant"],
                    "device": _row_device(info),
                    "batch": info["batch"],
                    "step_s": b["stats"]["median"],
                    "flops": info.get("flops_per_step"),
                    "peak_mib": info.get("peak_mib"),
                    "source": len(sources) - 1,
                }
            )
    return sources, rows


_STEP_LINE = re.compile(r"\| ([\d.]+) step/s \| ([\d.]+) img/s \| peak mem ([\d.]+) GiB")
_HEADER = re.compile(r"\| device (\w+)(?::\d+)? \|.*\| global batch (\d+) \|")


def parse_train_log(log: Path, config: Path | None = None) -> dict | None:
    """The trainer's loop from its log: median step/s and img/s over the logged intervals after the
    first (which holds the compile and warm-up), the last peak; the model from its config.yaml.
    None when the log has no timed interval after the first or no model can be named."""
    log = Path(log)
    if config is None:
        config = log.with_name(log.name.replace("_log.txt", "_config.yaml"))
    if not log.is_file() or not config.is_file():
        return None
    text = log.read_text()
    header = _HEADER.search(text)
    steps = [tuple(float(v) for v in m.groups()) for m in _STEP_LINE.finditer(text)]
    if header is None or len(steps) < 2:
        return None
    import yaml

    model = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("model")
    if not model:
        return None
    device, batch = header.group(1), int(header.group(2))
    timed = steps[1:]
    tag = log.name.removesuffix("_log.txt").split("_", 2)[2:]  # train_b2_loss_log.txt -> ["loss"]
    return {
        "case": short_case(model, batch),
        "variant": TRAIN_LOOP + (_LOOP_SUFFIX.get(tag[0], "-" + tag[0]) if tag else ""),
        "device": device,
        "batch": batch,
        "step_s": 1 / statistics.median(s for s, _, _ in timed),
        "images_per_s": statistics.median(i for _, i, _ in timed),
        "flops": None,
        "peak_mib": steps[-1][2] * 1024 if device == "cuda" else None,  # CPU logs the resident set
        "source": None,
        "log": log.name,
    }


# ----------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------


def _variant_order(name: str) -> int:
    names = list(VARIANTS)
    return names.index(name) if name in names else len(names)


def _case_order(case: str) -> tuple[int, str]:
    shorts = [c.short for c in GPU_CASES]
    return (shorts.index(case), case) if case in shorts else (len(shorts), case)


def build_summary(json_paths: list[Path], train_logs: list[Path] = ()) -> dict:
    sources, rows = load_step_rows(list(json_paths))
    loops = [r for r in (parse_train_log(p) for p in train_logs) if r is not None]
    everything = rows + loops
    device = "cuda" if any(r["device"] == "cuda" for r in everything) else "cpu"
    rows = [r for r in rows if r["device"] == device]
    loops = [r for r in loops if r["device"] == device]
    used = sorted({r["source"] for r in rows})
    metas = [sources[i] for i in used] or sources
    env = metas[0] if metas else environment()  # no benchmark JSON: this process's environment
    peaks = [m["matmul_peaks"][device] for m in metas if device in (m.get("matmul_peaks") or {})]
    peak = max(peaks, key=lambda p: p["tflops"]) if peaks else None

    latest: dict[tuple[str, str], dict] = {}
    for r in rows + loops:  # a later file's row replaces an earlier one's
        latest[r["case"], r["variant"]] = r
    # the loop's model FLOPs per step: those of a SoFlow step row at its case (trainer-default's first)
    for r in loops:
        same = [latest.get((r["case"], v)) for v in VARIANTS if VARIANTS[v].objective == "soflow"]
        flops = [x["flops"] for x in same if x and x.get("flops")]
        r["flops"] = flops[0] if flops else None

    out_rows = []
    for (case, variant), r in sorted(latest.items(), key=lambda kv: (_case_order(kv[0][0]), _variant_order(kv[0][1]))):
        step_s = r["step_s"]
        mfu = r["flops"] / step_s / (peak["tflops"] * 1e12) if (peak and r.get("flops") and step_s) else None
        out_rows.append(
            {
                "case": case,
                "variant": variant,
                "step_ms": round(step_s * 1e3, 3),
                "images_per_s": round(r.get("images_per_s") or r["batch"] / step_s, 1),
                "peak_gib": round(r["peak_mib"] / 1024, 3) if r.get("peak_mib") is not None else None,
                "mfu": round(mfu, 4) if mfu is not None else None,
            }
        )
    dates = sorted(m["date"] for m in metas if m.get("date"))
    if device == "cuda":
        name = env.get("device")
    else:
        name = env.get("cpu") or env.get("device")
    expected = [c.short for c in GPU_CASES] if device == "cuda" else None
    verdicts, details = checks(out_rows, expected)
    return {
        "device": name,
        "date": dates[0] if dates else datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "rows": out_rows,
        "checks": verdicts,
        "check_details": details,
        "mfu_peak": (
            {"tflops": round(peak["tflops"], 3), "dtype": peak["dtype"], "shape": peak.get("shape")} if peak else None
        ),
        "sources": [s["file"] for s in sources] + [r["log"] for r in loops],
    }


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _all(values: list[bool | None]) -> bool | None:
    """false if any is false; null if any is null (or there are none); else true."""
    if any(v is False for v in values):
        return False
    if not values or any(v is None for v in values):
        return None
    return True


def checks(rows: list[dict], cases: list[str] | None = None) -> tuple[dict, dict]:
    """The issue's four conditions over summary rows. ``cases``: the cases the first and last must
    cover (the GPU cases on CUDA); None: the cases that the rows hold."""
    ms = {(r["case"], r["variant"]): r["step_ms"] for r in rows if r.get("step_ms")}
    mfu = {(r["case"], r["variant"]): r["mfu"] for r in rows}
    if cases is None:  # the cases of the step benchmarks (not of a trainer loop alone)
        cases = sorted({r["case"] for r in rows if r["variant"] in VARIANTS}, key=_case_order)
    verdicts, details = {}, {}

    name = "trainer_default_within_5pct_of_fastest_soflow"
    per_case, oks = {}, []
    for case in cases:
        soflow = {v: t for (c, v), t in ms.items() if c == case and v in VARIANTS and VARIANTS[v].objective == "soflow"}
        td = soflow.get(DEFAULT)
        if td is None or len(soflow) < 2:
            per_case[case] = None
            oks.append(None)
            continue
        fastest = min(soflow, key=soflow.get)
        ratio = td / soflow[fastest]
        per_case[case] = {"ratio": round(ratio, 4), "fastest": fastest, "fastest_step_ms": soflow[fastest]}
        oks.append(ratio <= WITHIN_FASTEST)
    verdicts[name], details[name] = _all(oks), {"rule": CHECK_RULES[name], "cases": per_case}

    name = "trainer_default_mfu"
    per_case, oks = {}, []
    for case, floor in MFU_MIN.items():
        value = mfu.get((case, DEFAULT))
        per_case[case] = value
        oks.append(None if value is None else value >= floor)
    verdicts[name], details[name] = _all(oks), {"rule": CHECK_RULES[name], "cases": per_case}

    name = "meanflow_compiled_over_trainer_default"
    case, floor = MEANFLOW_RATIO
    mf, td = ms.get((case, MEANFLOW)), ms.get((case, DEFAULT))
    ratio = mf / td if (mf and td) else None
    verdicts[name] = None if ratio is None else ratio >= floor
    details[name] = {"rule": CHECK_RULES[name], "cases": {case: None if ratio is None else round(ratio, 4)}}

    name = "fused_on_vs_off_default_path"
    per_case, oks = {}, []
    for case in cases:
        off, on = ms.get((case, DEFAULT)), ms.get((case, DEFAULT_FUSED))
        both = off is not None and on is not None
        per_case[case] = {"off_ms": off, "on_ms": on, "off_over_on": round(off / on, 4)} if both else None
        oks.append(True if both else None)
    verdicts[name], details[name] = _all(oks), {"rule": CHECK_RULES[name], "cases": per_case}
    return verdicts, details


# ----------------------------------------------------------------------------------------------
# Markdown: the README's GPU table
# ----------------------------------------------------------------------------------------------


def _cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(summary: dict) -> list[str]:
    """summary.json as Markdown: a header line, the rows' table and the checks."""
    peak = summary.get("mfu_peak")
    peak_text = f"{peak['dtype']} matmul peak {peak['tflops']:.4g} TFLOP/s measured in the run" if peak else "no peak"
    lines = [
        f"{summary.get('device')}, torch {summary.get('torch')}, triton {summary.get('triton')}, "
        f"{summary.get('date')}; MFU of the {peak_text}.",
        "",
        "| case | variant | step ms | images/s | peak GiB | MFU |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(
            f"| {r['case']} | {r['variant']} | {_cell(r['step_ms'], ',.1f')} | {_cell(r['images_per_s'], ',.0f')} | "
            f"{_cell(r['peak_gib'], ',.1f')} | {mfu} |"
        )
    lines.append("")
    word = {True: "met", False: "NOT met", None: "not measured"}
    for name, ok in summary.get("checks", {}).items():
        rule = summary.get("check_details", {}).get(name, {}).get("rule", name)
        lines.append(f"- {word[ok]}: {rule}")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="*", type=Path, help="the suite's --benchmark-json files")
    p.add_argument("--train-log", type=Path, action="append", default=[], help="a train stage's log (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="summary.json to write")
    p.add_argument("--markdown", action="store_true", help="also print the table")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.json if not f.is_file()]
    if missing:
        print(f"summary.py: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    summary = build_summary(args.json, args.train_log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}: {len(summary['rows'])} rows; checks {summary['checks']}")
    if args.markdown:
        print("\n".join(markdown(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
