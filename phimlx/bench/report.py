"""Turn runs into numbers people can paste: medians with min and max, a Markdown table, a plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

REFERENCE_ENGINE = "llama.cpp"
# Per-run figures summarised as median / min / max.
FIGURES = ("pp_tps", "tg_tps", "ttft_s", "load_s", "peak_rss")


def run_figures(run: dict[str, Any]) -> dict[str, float | None]:
    """Derived figures of one successful run (tokens/s from token counts and seconds)."""
    pp, tg = run.get("pp_tokens") or 0, run.get("tg_tokens") or 0
    return {
        "pp_tps": pp / run["pp_s"] if pp and run.get("pp_s") else None,
        "tg_tps": tg / run["tg_s"] if tg and run.get("tg_s") else None,
        "ttft_s": run.get("ttft_s"),
        "load_s": run.get("load_s"),
        "peak_rss": run.get("peak_rss"),
    }


def spread(values: Sequence[float | None]) -> dict[str, float] | None:
    """``{"median", "min", "max", "n"}`` of the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(
    runs: Sequence[dict[str, Any]], weight_bytes: int, machine_bw: float | None
) -> dict[str, Any]:
    """Median, min and max of every figure over the successful ``runs`` of one engine.

    Achieved bandwidth is ``weight_bytes x tg tokens/s`` (what each generated token must read,
    times the rate), also given as a fraction of ``machine_bw`` (bytes/s) when known.
    """
    ok = [r for r in runs if r.get("ok")]
    figs = [run_figures(r) for r in ok]
    out: dict[str, Any] = {k: spread([f[k] for f in figs]) for k in FIGURES}
    out["runs_ok"], out["runs_failed"] = len(ok), len(runs) - len(ok)
    tg = out["tg_tps"]
    if tg:
        bw = {k: weight_bytes * tg[k] for k in ("median", "min", "max")}
        bw["fraction_of_machine"] = bw["median"] / machine_bw if machine_bw else None
        out["bandwidth_bytes_per_s"] = bw
    else:
        out["bandwidth_bytes_per_s"] = None
    errors = [r.get("error") for r in runs if not r.get("ok")]
    out["errors"] = [e for e in errors if e]
    return out


def ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per engine, its median pp and tg tokens/s divided by llama.cpp's (None without it)."""
    ref = summaries.get(REFERENCE_ENGINE) or {}
    out: dict[str, dict[str, float | None]] = {}
    for name, s in summaries.items():
        row: dict[str, float | None] = {}
        for k in ("pp_tps", "tg_tps"):
            mine, theirs = s.get(k), ref.get(k)
            row[k] = mine["median"] / theirs["median"] if mine and theirs else None
        out[name] = row
    return out


def engine_label(name: str, version: str | None) -> str:
    """``phimlx numpy``, ``phimlx mlx (mlx 0.32.4)``, ``llama.cpp 0.3.36`` ..."""
    if name == "numpy":
        return "phimlx numpy"
    if name == "mlx":
        return f"phimlx mlx (mlx {version})" if version else "phimlx mlx"
    return f"{name} {version or ''}".strip()


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _cell(s: dict[str, float] | None, scale: float = 1.0) -> str:
    if not s:
        return "-"
    med, lo, hi = s["median"] / scale, s["min"] / scale, s["max"] / scale
    if s["n"] == 1:
        return _num(med)
    return f"{_num(med)} ({_num(lo)}..{_num(hi)})"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def busy(result: dict[str, Any]) -> bool:
    """True when other work was running: the 1-minute load average before the run is over 1."""
    la = result.get("machine", {}).get("load_average")
    return bool(la) and la[0] > 1.0


def markdown(result: dict[str, Any]) -> str:
    """The report: a header naming model, machine and settings, then one row per engine."""
    s, m, model = result["settings"], result["machine"], result["model"]
    bw = result.get("machine_bandwidth") or {}
    pp, tg = s["pp"], s["tg"]
    lines = [
        f"**{model['label']}**: {model['file_bytes'] / 2**30:.2f} GiB file, "
        f"{model['n_params'] / 1e9:.2f} B parameters, "
        f"{model['weight_bytes'] / 1e9:.2f} GB read per generated token",
        "",
        f"Machine: {result['machine_line']}",
        f"Settings: pp{pp} / tg{tg}, {s['threads']} threads, {s['repetitions']} repetitions "
        f"(median (min..max)), warm-up {'on' if s['warmup'] else 'off'}, seed {s['seed']}, "
        f"phimlx {result.get('commit') or '?'}",
    ]
    if bw:
        parts = [
            f"{t} thread{'s' if t != '1' else ''} {v['bytes_per_s'] / 1e9:.1f} GB/s"
            for t, v in bw.items()
        ]
        lines.append(f"Measured read bandwidth: {', '.join(parts)}")
    la = m.get("load_average")
    if la:
        lines.append(f"Load average before / after: {la} / {result.get('load_average_after')}")
        if busy(result):
            lines.append(
                "**Warning: the machine was busy** (load average above 1 while nothing of "
                "this run was active): other processes shared the cores; figures with as many "
                "threads as cores suffer most (spinning thread pools), so treat them as lower "
                "bounds."
            )
    lines += [
        "",
        f"| engine | pp{pp} tok/s | tg{tg} tok/s | pp / llama.cpp | tg / llama.cpp "
        f"| TTFT s | load s | peak RSS GiB | tg bandwidth GB/s (% of machine) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rat = ratios({k: v["summary"] for k, v in result["engines"].items()})
    for name, e in result["engines"].items():
        sm = e["summary"]
        label = engine_label(name, e.get("version"))
        if not sm["runs_ok"]:
            err = (sm["errors"] or ["failed"])[0].replace("|", "/")[:120]
            lines.append(f"| {label} | failed: {err} | | | | | | | |")
            continue
        b = sm.get("bandwidth_bytes_per_s")
        if b:
            frac = b.get("fraction_of_machine")
            bw_cell = f"{b['median'] / 1e9:.1f}" + (f" ({frac:.0%})" if frac else "")
        else:
            bw_cell = "-"
        lines.append(
            f"| {label} | {_cell(sm['pp_tps'])} | {_cell(sm['tg_tps'])} "
            f"| {_ratio(rat[name]['pp_tps'])} | {_ratio(rat[name]['tg_tps'])} "
            f"| {_cell(sm['ttft_s'])} | {_cell(sm['load_s'])} | {_cell(sm['peak_rss'], 2**30)} "
            f"| {bw_cell} |"
        )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"\nSkipped {name}: {why}")
    lines += [
        "",
        f"pp: one batched prefill of {pp} random token ids; TTFT: that prefill plus the argmax "
        f"of its logits; tg: {tg} random ids fed one at a time into an empty context (EOS "
        "ignored, nothing sampled); load: file to ready, imports excluded; peak RSS: the "
        "runner process's (interpreter and libraries included); bandwidth: bytes read per "
        "token x tg tok/s, against the machine's measured read bandwidth at the same threads. "
        f"Each engine runs in its own process per repetition, engines alternating.",
        "",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Bar charts of pp and tg tokens/s per engine (median, whiskers min..max) into ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in result["engines"].items() if e["summary"]["runs_ok"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    s = result["settings"]
    for ax, key, title in (
        (axes[0], "pp_tps", f"prompt pp{s['pp']}"),
        (axes[1], "tg_tps", f"generation tg{s['tg']}"),
    ):
        stats = [result["engines"][n]["summary"][key] for n in names]
        med = [x["median"] if x else 0.0 for x in stats]
        err = [
            [m - x["min"] if x else 0.0 for m, x in zip(med, stats, strict=True)],
            [x["max"] - m if x else 0.0 for m, x in zip(med, stats, strict=True)],
        ]
        colors = ["tab:blue" if n in ("numpy", "mlx") else "tab:gray" for n in names]
        labels = [engine_label(n, None) for n in names]
        ax.bar(labels, med, yerr=err, capsize=4, color=colors)
        ax.set_title(f"{title}, tokens/s")
        ax.tick_params(axis="x", rotation=20)
        for i, m in enumerate(med):
            ax.annotate(_num(m), (i, m), ha="center", va="bottom", fontsize=8)
    fig.suptitle(
        f"{result['model']['label']}: {s['threads']} threads; {result['machine']['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
