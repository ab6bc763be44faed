"""The comparison's reports: the markdown tables of a comparison and of an ablation, and the chart
of samples per method beside the primary metric against the number of network calls."""

from __future__ import annotations

from pathlib import Path

from soflow_fast.experiments.tasks import Task

# the (method, network calls) pairs the comparison table's headline line quotes
HEADLINE = (("soflow", 1), ("meanflow", 1), ("fm", 50))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "/".join(f"{x:.2f}" for x in v)
    return str(v)


def markdown(result: dict) -> str:
    task, primary = result["data"], result["primary"]
    keys = [k for k in result["metric_keys"] if k != "mode_weights"]
    lines = [
        f"# {task}: SoFlow vs MeanFlow vs flow matching, {result['budget']['steps']} steps each",
        "",
        f"Same SoFlowMLP ({result['budget']['hidden']} wide, {result['budget']['layers']} blocks), Adam lr "
        f"{result['budget']['lr']:g} with cosine decay, batch {result['budget']['batch']}, "
        f"seed {result['budget']['seed']}; "
        f"scored on {result['budget']['eval_samples']} samples against fresh data. Lower is better except "
        "label_accuracy. {}".format(result["env"]),
        "",
        "| method | NFE | " + " | ".join(keys) + " | train s |",
        "|---|---:|" + "---:|" * len(keys) + "---:|",
    ]
    for method, run in result["runs"].items():
        for nfe, s in run["scores"].items():
            lines.append(
                f"| {method} | {nfe} | " + " | ".join(_fmt(s.get(k, "")) for k in keys) + f" | {run['train_seconds']} |"
            )
    noise = result["noise"]
    lines.append("| (the noise itself) | 0 | " + " | ".join(_fmt(noise.get(k, "")) for k in keys) + " | |")
    lines += [
        "",
        "Headline ("
        + primary
        + "): "
        + ", ".join(
            f"{m} {n}-NFE {_fmt(result['runs'][m]['scores'][str(n)][primary])}"
            for m, n in HEADLINE
            if m in result["runs"]
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, samples: dict, path: Path, task: Task) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data", None)] + [
        (m, n)
        for m, n in (("soflow", 1), ("soflow", 2), ("meanflow", 1), ("meanflow", 2), ("fm", 1), ("fm", 50))
        if m in samples
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.9))
    for ax, (m, n) in zip(axes, panels, strict=False):
        first = samples[next(iter(samples))]
        x = first["reference"] if m == "data" else samples[m]["samples"][n]
        if task.name == "digits":
            grid = x[:64].reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
            ax.imshow(grid.clamp(-1, 1).numpy(), cmap="gray")
        elif task.name == "actions":
            for traj in x[:40]:  # each chunk has its own observation: 40 trajectories
                ax.plot(traj[:, 0].numpy(), traj[:, 1].numpy(), lw=0.6, alpha=0.6)
        else:
            pts = x[:2000].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
        ax.set_title("data" if m == "data" else f"{m} {n}-NFE", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[-1]
    primary = result["primary"]
    for m, run in result["runs"].items():
        nfes = [int(n) for n in run["scores"]]
        ax.plot(nfes, [run["scores"][str(n)][primary] for n in nfes], marker="o", label=m)
    ax.axhline(result["noise"][primary], color="gray", ls=":", lw=1, label="noise")
    ax.set_xscale("log")
    ax.set_xlabel("network calls")
    ax.set_title(primary + " (lower better)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablation_markdown(result: dict) -> str:
    primary = result["primary"]
    overrides = result.get("soflow_overrides")  # absent from results written before overrides applied
    if overrides:
        base = "`objective.PRESETS['toy']` with " + ", ".join(f"`{k}={v}`" for k, v in overrides.items())
    else:
        base = "`objective.PRESETS['toy']`"
    lines = [
        f"# {result['data']}: SoFlow ablation, {result['budget']['steps']} steps per row",
        "",
        f"One setting changed from {base} per row (marked * where the row is the base's "
        f"own value); {primary} at 1 and 2 network calls, lower is better. {result['env']}",
        "",
        f"| setting | {primary} 1-NFE | {primary} 2-NFE | train s |",
        "|---|---:|---:|---:|",
    ]
    for label, run in result["runs"].items():
        mark = " *" if run["preset"] else ""
        lines.append(
            f"| {label}{mark} | {_fmt(run['scores']['1'][primary])} | {_fmt(run['scores']['2'][primary])} | "
            f"{run['train_seconds']} |"
        )
    lines.append(f"| (the noise itself) | {_fmt(result['noise'][primary])} | | |")
    return "\n".join(lines) + "\n"
