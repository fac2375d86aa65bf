"""`mmf bench --batch 1,4,16,64` and `--prompt-len 128,2048,8192`: one run of the inference benchmark per value,
both architectures (MatMul-free and Transformer++), gathered in one document with a table and a chart.

The sweep document::

    {"schema_version": 1, "kind": "sweep", "command": ..., "sweep": {"axis": "batch" | "prompt_len",
     "values": [...]}, "points": [<the single-run document of model_bench.run_bench at that value>, ...]}

Each point is exactly what `mmf bench` writes for one value (its own machine, protocol, bandwidth measured
at its start, per size and variant every figure with its label), so nothing is recomputed here: the table
and the chart read the points. Per batch the chart shows decode tokens/s (batch / step time) and the step
time against batch, each with its floor (bytes a step moves, weights + state or KV cache, over the copy or
read bandwidth measured in that point's run); per prompt length, prefill time and prefill tokens/s.
"""

from __future__ import annotations

from typing import Optional

from mmf.errors import MMFError

SWEEP_VARIANTS = ("mmf", "transformer++")
AXES = {"batch": "--batch", "prompt_len": "--prompt-len"}


def parse_values(option: str, value) -> Optional[list]:
    """``--batch 4`` -> [4]; ``--batch 1,4,16`` -> [1, 4, 16]; None -> None. Each >= 1, no repeats."""
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    out = []
    for part in str(value).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise MMFError(f"{option} {value}: give a whole number or a comma list of them (e.g. {option} "
                           "1,4,16,64)") from None
        if v < 1:
            raise MMFError(f"{option} {value}: each value must be >= 1")
        if v in out:
            raise MMFError(f"{option} {value}: {v} is given twice")
        out.append(v)
    return out


def run_sweep(models, axis: str, values: list, *, run_point, command: Optional[str] = None,
              on_point_done=None) -> dict:
    """``run_point(value)`` -> the single-run document at that value (``model_bench.run_bench``), for each of
    ``values`` in order; returns the sweep document (module doc)."""
    doc = {"schema_version": 1, "kind": "sweep", "command": command, "sweep": {"axis": axis, "values": list(values)},
           "points": []}
    for v in values:
        doc["points"].append(run_point(v))
        if on_point_done is not None:
            on_point_done(doc)
    return doc


# ---------------------------------------------------------------------------------------------- table
def _fig(v: dict, key: str):
    f = (v.get("figures") or {}).get(key)
    return None if f is None else f["value"]


def sweep_rows(doc: dict) -> list:
    """One row per (size, variant, swept value): the headline figures and their floors."""
    axis = doc["sweep"]["axis"]
    rows = []
    sizes = []
    for p in doc["points"]:
        sizes += [s for s in p["sizes"] if s not in sizes]
    for size in sizes:
        for p in doc["points"]:
            s = p["sizes"].get(size)
            if s is None:
                continue
            batch = p["protocol"]["batch"]
            for variant, v in s["variants"].items():
                row = {"size": size, axis.replace("_", " "): p["protocol"][axis], "model": variant}
                if "figures" not in v:
                    row.update({"prefill ms": "-", "step ms": "-", "floor ms": "-", "tok/s": "-", "floor tok/s": "-",
                                "status": v["label"]})
                    rows.append(row)
                    continue
                step, floor, pre = (_fig(v, k) for k in ("decode_ms_per_token", "decode_floor_ms", "prefill_ms"))
                mark = "" if v["status"] == "measured" else " (x)"
                row["prefill ms"] = f"{pre:.3f}{mark}"
                row["step ms"] = f"{step:.3f}{mark}"
                row["floor ms"] = "-" if floor is None else f"{floor:.3f}"
                row["tok/s"] = f"{batch * 1e3 / step:.1f}{mark}"
                row["floor tok/s"] = "-" if not floor else f"{batch * 1e3 / floor:.1f}"
                row["status"] = v["label"]
                rows.append(row)
    return rows


def print_sweep(doc: dict) -> None:
    from mmf.cli.app import print_table

    p0 = doc["points"][0]["protocol"]
    axis = doc["sweep"]["axis"]
    fixed = (f"prompt {p0['prompt_len']}" if axis == "batch" else f"batch {p0['batch']}")
    values = ",".join(map(str, doc["sweep"]["values"]))
    print_table(sweep_rows(doc), title=(f"mmf bench sweep over {AXES[axis]} {values}: {p0['device']}, {fixed}, {p0['gen_len']} new tokens, {p0['dtype']}, "
                                       f"median of {p0['repeat']}; step = one decode step for every row, tok/s = "
                                       "batch / step, floor = bytes a step moves / bandwidth measured in the run; "
                                       "(x) extrapolated"))


# ---------------------------------------------------------------------------------------------- chart
def plot_sweep(doc: dict):
    """Per size: (batch axis) decode tokens/s and step time against batch, (prompt axis) prefill time and
    prefill tokens/s against prompt length; a line per variant, its floor dashed (batch axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = doc["sweep"]["axis"]
    sizes = []
    for p in doc["points"]:
        sizes += [s for s in p["sizes"] if s not in sizes]
    variants = []
    for p in doc["points"]:
        variants += [v for v in p["protocol"]["variants"] if v not in variants]
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12, 4.2 * len(sizes)), squeeze=False)
    for row, size in zip(axes, sizes):
        for i, v in enumerate(variants):
            xs, tps, step, ftps, fstep, pre, ptps = [], [], [], [], [], [], []
            for p in doc["points"]:
                e = p["sizes"].get(size, {}).get("variants", {}).get(v, {})
                if "figures" not in e:
                    continue
                b, T = p["protocol"]["batch"], p["protocol"]["prompt_len"]
                xs.append(p["protocol"][axis])
                st, fl, pr = _fig(e, "decode_ms_per_token"), _fig(e, "decode_floor_ms"), _fig(e, "prefill_ms")
                step.append(st)
                tps.append(b * 1e3 / st)
                fstep.append(fl)
                ftps.append(b * 1e3 / fl if fl else None)
                pre.append(pr)
                ptps.append(b * T * 1e3 / pr)
            if not xs:
                continue
            color = f"C{i}"
            if axis == "batch":
                panels = ((row[0], tps, ftps), (row[1], step, fstep))
            else:
                panels = ((row[0], pre, None), (row[1], ptps, None))
            for ax, ys, floor in panels:
                ax.plot(xs, ys, "o-", color=color, label=v)
                if floor and any(f is not None for f in floor):
                    ax.plot([x for x, f in zip(xs, floor) if f], [f for f in floor if f], "--", color=color,
                            alpha=0.6, label=f"{v} floor")
        titles = (("decode tokens/s", "decode step (ms)") if axis == "batch" else
                  ("prefill (ms)", "prefill tokens/s"))
        for ax, t in zip(row, titles):
            ax.set_xscale("log", base=2)
            ax.set_xticks(doc["sweep"]["values"], [str(v) for v in doc["sweep"]["values"]])
            ax.minorticks_off()
            ax.set_xlabel(axis.replace("_", " "))
            ax.set_title(f"{size}: {t}")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    m = doc["points"][0]["machine"]
    fig.suptitle(f"mmf bench sweep on {m.get('gpu') or m.get('cpu')} ({doc['points'][0]['protocol']['device']})")
    fig.tight_layout()
    return fig


def write_sweep_plot(doc: dict, path) -> None:
    from mmf.bench.model_bench_report import save_png

    save_png(plot_sweep(doc), path)
