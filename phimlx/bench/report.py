"""Turn runs into numbers people can paste: medians with min and max, a Markdown table, a plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

REFERENCE_ENGINE = "llama.cpp"
# Per-run figures summarised as median / min / max.
FIGURES = ("pp_tps", "tg_tps", "ttft_s", "load_s", "peak_rss")
# Figures that depend on the context depth (`by_depth`).
DEPTH_FIGURES = ("pp_tps", "tg_tps", "ttft_s")


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
    out["bandwidth_bytes_per_s"] = _bandwidth(out["tg_tps"], weight_bytes, machine_bw)
    errors = [r.get("error") for r in runs if not r.get("ok")]
    out["errors"] = [e for e in errors if e]
    out["by_depth"] = _by_depth(ok, weight_bytes, machine_bw)
    out["batch"] = summarize_batch(ok)
    notes = [r.get("batch_skipped") or r.get("batch_error") for r in ok]
    if any(notes):
        out["batch_note"] = next(n for n in notes if n)
    return out


def _bandwidth(
    tg: dict[str, float] | None, weight_bytes: int, machine_bw: float | None
) -> dict[str, float | None] | None:
    if not tg:
        return None
    bw: dict[str, float | None] = {k: weight_bytes * tg[k] for k in ("median", "min", "max")}
    bw["fraction_of_machine"] = bw["median"] / machine_bw if machine_bw else None  # type: ignore[operator]
    return bw


def _by_depth(
    ok: Sequence[dict[str, Any]], weight_bytes: int, machine_bw: float | None
) -> list[dict[str, Any]]:
    """Per depth (in the order measured): ``depth`` and the spreads of pp_tps, tg_tps and
    ttft_s over the runs, and the tg bandwidth (weights only: the KV cache read at depth is
    not counted)."""
    per_run = [r.get("depths") or [r] for r in ok]  # a run without depths: one, at its own
    order: list[int] = []
    for rows in per_run:
        order += [int(row.get("depth", 0)) for row in rows if int(row.get("depth", 0)) not in order]
    out = []
    for d in order:
        figs = [run_figures(row) for rows in per_run for row in rows if row.get("depth", 0) == d]
        entry: dict[str, Any] = {"depth": d}
        entry.update({k: spread([f[k] for f in figs]) for k in DEPTH_FIGURES})
        entry["bandwidth_bytes_per_s"] = _bandwidth(entry["tg_tps"], weight_bytes, machine_bw)
        out.append(entry)
    return out


def at_depth(summary: dict[str, Any], depth: int) -> dict[str, Any] | None:
    """The figures of ``summary`` (`summarize`) at ``depth``, None where not measured.  A
    summary without depths (an older result) holds depth 0."""
    by = summary.get("by_depth")
    if by is None:
        return summary if depth == 0 else None
    return next((e for e in by if e["depth"] == depth), None)


def summarize_batch(ok: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size B over the successful runs: ``batch``, the spreads of ``aggregate_tps``
    (B x tg / seconds) and ``per_seq_tps`` (tg / seconds), and ``ratio_to_b1`` (median
    aggregate over B=1's; None without B=1)."""
    sizes: dict[int, list[dict[str, Any]]] = {}
    for r in ok:
        for row in r.get("batch") or []:
            sizes.setdefault(int(row["batch"]), []).append(row)
    out = []
    for b in sorted(sizes):
        rows = [x for x in sizes[b] if x.get("tg_s") and x.get("tg_tokens")]
        out.append(
            {
                "batch": b,
                "aggregate_tps": spread([b * x["tg_tokens"] / x["tg_s"] for x in rows]),
                "per_seq_tps": spread([x["tg_tokens"] / x["tg_s"] for x in rows]),
            }
        )
    base = next((e["aggregate_tps"] for e in out if e["batch"] == 1), None)
    for e in out:
        agg = e["aggregate_tps"]
        e["ratio_to_b1"] = agg["median"] / base["median"] if agg and base else None
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


def row_label(key: str, entry: dict[str, Any]) -> str:
    """A report row's name: `engine_label` of its engine, and for the ``--vs`` model's rows
    the model's label (``phimlx numpy [SmolLM2-4bit]``)."""
    label = engine_label(entry.get("engine", key), entry.get("version"))
    return f"{label} [{entry['model']}]" if entry.get("model") else label


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
    """The report: a header naming model, machine and settings, then one row per engine (per
    engine and depth with ``--depth``), and a table of batched decode with ``--batch``."""
    s, m, model = result["settings"], result["machine"], result["model"]
    bw = result.get("machine_bandwidth") or {}
    pp, tg = s["pp"], s["tg"]
    depths = s.get("depth") or [0]
    show_depth = depths != [0]
    lines = [
        f"**{m_['label']}**{' (--vs: the rows that name it)' if i else ''}: "
        f"{m_['file_bytes'] / 2**30:.2f} GiB file, {m_['n_params'] / 1e9:.2f} B parameters, "
        f"{m_['weight_bytes'] / 1e9:.2f} GB read per generated token"
        for i, m_ in enumerate([model, *([result["vs_model"]] if "vs_model" in result else [])])
    ]
    lines += [
        "",
        f"Machine: {result['machine_line']}",
        f"Settings: pp{pp} / tg{tg}"
        + (f" at depths {', '.join(map(str, depths))}" if show_depth else "")
        + (f", batch sizes {', '.join(map(str, s['batch']))}" if s.get("batch") else "")
        + f", {s['threads']} threads, {s['repetitions']} repetitions "
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
    columns = [
        "engine",
        *(["depth"] if show_depth else []),
        f"pp{pp} tok/s",
        f"tg{tg} tok/s",
        "pp / llama.cpp",
        "tg / llama.cpp",
        "TTFT s",
        "load s",
        "peak RSS GiB",
        "tg bandwidth GB/s (% of machine)",
    ]
    lines += ["", "| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    summaries = {k: v["summary"] for k, v in result["engines"].items()}
    for d in depths if show_depth else [None]:
        at = summaries if d is None else {k: at_depth(v, d) or {} for k, v in summaries.items()}
        rat = ratios(at)
        for name, e in result["engines"].items():
            sm, fig = e["summary"], at[name]
            label = row_label(name, e)
            lead = [label] + ([str(d)] if show_depth else [])
            if not sm["runs_ok"]:
                err = (sm["errors"] or ["failed"])[0].replace("|", "/")[:120]
                rest = " |" * (len(columns) - len(lead) - 1)
                lines.append("| " + " | ".join([*lead, f"failed: {err}"]) + " |" + rest)
                continue
            b = fig.get("bandwidth_bytes_per_s")
            if b:
                frac = b.get("fraction_of_machine")
                bw_cell = f"{b['median'] / 1e9:.1f}" + (f" ({frac:.0%})" if frac else "")
            else:
                bw_cell = "-"
            cells = lead + [
                _cell(fig.get("pp_tps")),
                _cell(fig.get("tg_tps")),
                _ratio(rat[name]["pp_tps"]),
                _ratio(rat[name]["tg_tps"]),
                _cell(fig.get("ttft_s")),
                _cell(sm["load_s"]),
                _cell(sm["peak_rss"], 2**30),
                bw_cell,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if s.get("batch"):
        lines += _batch_table(result)
    for name, why in result.get("skipped", {}).items():
        lines.append(f"\nSkipped {name}: {why}")
    depth_note = (
        "; depth d: pp and tg each start from a context already holding d random token ids, "
        "prefilled untimed (llama-bench's -d), and the bandwidth counts the weights only, not "
        "the KV cache read at depth"
        if show_depth
        else ""
    )
    lines += [
        "",
        f"pp: one batched prefill of {pp} random token ids; TTFT: that prefill plus the argmax "
        f"of its logits; tg: {tg} random ids fed one at a time into an empty context (EOS "
        "ignored, nothing sampled); load: file to ready, imports excluded; peak RSS: the "
        "runner process's (interpreter and libraries included); bandwidth: bytes read per "
        "token x tg tok/s, against the machine's measured read bandwidth at the same threads"
        f"{depth_note}. "
        f"Each engine runs in its own process per repetition, engines alternating.",
        "",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


def _batch_table(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    lines = [
        "",
        f"Batched decode: B sequences, each prefilled with its own {s.get('batch_prompt', '?')}"
        f"-token random prompt (untimed), then {s['tg']} steps that advance all B in one "
        "forward pass, each fed its own greedy next token (EOS ignored):",
        "",
        "| engine | B | aggregate tok/s | per-sequence tok/s | aggregate / B=1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, e in result["engines"].items():
        sm = e["summary"]
        if not sm["runs_ok"]:
            continue  # the failure is in the table above
        label = row_label(name, e)
        rows = sm.get("batch") or []
        if not rows:
            note = (sm.get("batch_note") or "not measured").replace("|", "/")[:160]
            lines.append(f"| {label} | - | {note} | | |")
            continue
        for r in rows:
            lines.append(
                f"| {label} | {r['batch']} | {_cell(r['aggregate_tps'])} "
                f"| {_cell(r['per_seq_tps'])} | {_ratio(r['ratio_to_b1'])} |"
            )
    return lines


def plot(result: dict[str, Any], path: str) -> None:
    """Bar charts of pp and tg tokens/s per engine (median, whiskers min..max; one bar per
    depth with ``--depth``), and of batched decode's aggregate tokens/s per batch size with
    ``--batch``, into ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in result["engines"].items() if e["summary"]["runs_ok"]]
    s = result["settings"]
    depths = s.get("depth") or [0]
    sums = {n: result["engines"][n]["summary"] for n in names}
    with_batch = any(sums[n].get("batch") for n in names)
    fig, axes = plt.subplots(1, 3 if with_batch else 2, figsize=(15 if with_batch else 10, 4))
    labels = [row_label(n, {**result["engines"][n], "version": None}) for n in names]
    for ax, key, title in (
        (axes[0], "pp_tps", f"prompt pp{s['pp']}"),
        (axes[1], "tg_tps", f"generation tg{s['tg']}"),
    ):
        if len(depths) == 1:
            ours = [result["engines"][n].get("engine", n) in ("numpy", "mlx") for n in names]
            colors = ["tab:blue" if o else "tab:gray" for o in ours]
            stats = [(at_depth(sums[n], depths[0]) or {}).get(key) for n in names]
            _bars(ax, range(len(names)), stats, 0.8, colors, None)
        else:
            width = 0.8 / len(depths)
            for k, d in enumerate(depths):
                xs = [i + (k - (len(depths) - 1) / 2) * width for i in range(len(names))]
                stats = [(at_depth(sums[n], d) or {}).get(key) for n in names]
                _bars(ax, xs, stats, width, f"C{k}", f"depth {d}")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), labels)
        ax.set_title(f"{title}, tokens/s")
        ax.tick_params(axis="x", rotation=20)
    if with_batch:
        ax = axes[2]
        sizes = sorted({r["batch"] for n in names for r in sums[n].get("batch") or []})
        width = 0.8 / len(sizes)
        for k, b in enumerate(sizes):
            xs = [i + (k - (len(sizes) - 1) / 2) * width for i in range(len(names))]
            stats = [
                next(
                    (r["aggregate_tps"] for r in sums[n].get("batch") or [] if r["batch"] == b),
                    None,
                )
                for n in names
            ]
            _bars(ax, xs, stats, width, f"C{k}", f"B={b}")
        ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), labels)
        ax.set_title(f"batched decode tg{s['tg']}, aggregate tokens/s")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(
        f"{result['model']['label']}: {s['threads']} threads; {result['machine']['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(
    ax: Any,
    xs: Sequence[float] | range,
    stats: Sequence[dict[str, float] | None],
    width: float,
    color: Any,
    label: str | None,
) -> None:
    """Medians as bars with min..max whiskers and the median written on top."""
    med = [x["median"] if x else 0.0 for x in stats]
    err = [
        [m - x["min"] if x else 0.0 for m, x in zip(med, stats, strict=True)],
        [x["max"] - m if x else 0.0 for m, x in zip(med, stats, strict=True)],
    ]
    ax.bar(list(xs), med, width, yerr=err, capsize=3, color=color, label=label)
    for x, m in zip(xs, med, strict=True):
        ax.annotate(_num(m), (x, m), ha="center", va="bottom", fontsize=7)
