"""What `mmf bench` shows and writes from its result document (``model_bench.run_bench``): the table
(one row per size and variant, one ratio row per size, and which code path each ran), the chart
(peak memory, decode and prefill latency by size), and the files: the JSON document and the PNG,
written after each size (``PartialWriter``) and at the end (``write_outputs``), each atomically.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from mmf.errors import MMFError
from mmf.units import human_bytes

GB = 1e9


# ---------------------------------------------------------------------------------------------- table
def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 10 else f"{x:.3f}")


def _mark(label: str) -> str:
    if label == "measured":
        return ""
    if label.startswith("extrapolated"):
        return " (x)"
    if label.startswith("computed"):
        return ""
    return " (e)"


def table_title(result: dict) -> str:
    p = result["protocol"]
    bw = result["copy_bandwidth"]["bytes_per_s"]
    chosen = f" ({p['device_choice']})" if p.get("device_choice", "").startswith("--device auto") else ""
    bandwidth = f"copy bandwidth {bw / 1e9:.1f} GB/s (measured)"
    rb = result.get("read_bandwidth")
    if rb is not None:
        threads = p.get("threads")
        if rb.get("bytes_per_s"):
            bandwidth = (f"read bandwidth {rb['bytes_per_s'] / 1e9:.1f} GB/s (measured, {rb['threads']} thread"
                         f"{'s' if rb['threads'] != 1 else ''}; the floor's), copy {bw / 1e9:.1f} GB/s")
        else:
            bandwidth += " (the floor's: read bandwidth not measured, no native kernel)"
        bandwidth = f"{threads} thread{'s' if threads != 1 else ''}; " + bandwidth
    return (f"mmf bench: {p['device']}{chosen}, batch {p['batch']}, prompt {p['prompt_len']}, {p['gen_len']} new "
            f"tokens, {p['dtype']}, {p['format']}, median of {p['repeat']} (min-max in brackets); {bandwidth}; "
            "(x) extrapolated, (e) estimated, others measured")


def model_cell(variant: str, v: dict) -> str:
    """The table's model column: the variant and, where known, the code path it ran, short."""
    name = (v.get("raw") or {}).get("path_name")
    return f"{variant} ({name})" if name else variant


def table_rows(result: dict) -> list:
    """One row per (size, variant) and one ratio row per size, for ``print_table``.

    Marks: (x) extrapolated from k1,k2/L layers (see the JSON), (e) estimated.
    """
    rows = []
    cuda = result["protocol"]["device"] == "cuda"
    for size, s in result["sizes"].items():
        for variant, v in s["variants"].items():
            row = {"size": size, "model": model_cell(variant, v)}
            if "figures" not in v:
                row.update({"status": v["label"]})
                rows.append(row)
                continue
            f = v["figures"]

            def cell(key, fmt="{:.2f}", scale=1.0):
                x = f.get(key)
                return "-" if x is None else fmt.format(x["value"] * scale) + _mark(x["label"])

            def bcell(key):
                x = f.get(key)
                return "-" if x is None else human_bytes(x["value"]) + _mark(x["label"])

            row["weights"] = bcell("weight_bytes")
            row["peak mem"] = bcell("peak_memory_bytes")
            if cuda:
                row["reserved"] = bcell("peak_reserved_bytes")
            row["state"] = bcell("state_bytes_end")
            row["prefill ms"] = _ms(f["prefill_ms"]["value"]) + _mark(f["prefill_ms"]["label"]) \
                if "prefill_ms" in f else "-"
            d = f["decode_ms_per_token"]
            row["decode ms/tok"] = (f"{_ms(d['value'])} [{_ms(f['decode_ms_per_token_min']['value'])}-"
                                    f"{_ms(f['decode_ms_per_token_max']['value'])}]" + _mark(d["label"]))
            if "decode_floor_ms" in f:
                row["floor ms"] = _ms(f["decode_floor_ms"]["value"]) + _mark(f["decode_floor_ms"]["label"])
            row["e2e s"] = cell("e2e_s", "{:.3f}")
            row["tok/s"] = cell("decode_tokens_per_s", "{:.1f}")
            row["build s"] = cell("build_s", "{:.1f}")
            row["status"] = v["label"] if v["status"] != "measured" else "measured"
            if v["status"] == "extrapolated":
                row["status"] += (f" (needs {human_bytes(v['needs_bytes'])}, {human_bytes(v['available_bytes'])} "
                                  "available)")
            rows.append(row)
        for key in [k for k in s if k.startswith("ratio_mmf_over_")]:
            r = s[key] or {}
            if not r:
                continue
            row = {"size": size, "model": f"mmf ÷ {key[len('ratio_mmf_over_'):]}"}

            def rc(key):
                return f"{r[key]['value']:.3f}" if key in r else "-"

            row["weights"] = rc("weight_bytes")
            row["peak mem"] = rc("peak_memory_bytes")
            if cuda:
                row["reserved"] = rc("peak_reserved_bytes")
            row["state"] = rc("state_bytes_end")
            row["prefill ms"] = rc("prefill_ms")
            row["decode ms/tok"] = rc("decode_ms_per_token")
            if "decode_floor_ms" in r:
                row["floor ms"] = rc("decode_floor_ms")
            row["e2e s"] = rc("e2e_s")
            row["tok/s"] = rc("decode_tokens_per_s")
            row["build s"] = ""
            row["status"] = "ratio"
            rows.append(row)
    # equalise columns (does-not-fit rows have fewer)
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return [{c: r.get(c, "") for c in cols} for r in rows]


def paths_summary(result: dict) -> list:
    """Which code path each variant ran, one line per (size, variant)."""
    out = []
    for size, s in result["sizes"].items():
        for variant, v in s["variants"].items():
            path = (v.get("raw") or {}).get("path", "-")
            out.append(f"{size} {variant}: {path}")
    return out


def print_results(result: dict) -> None:
    """The table, which code path each variant ran, and the protocol, on stdout."""
    from mmf.cli.app import print_table

    print_table(table_rows(result), title=table_title(result))
    print("paths:")
    for line in paths_summary(result):
        print(f"  {line}")
    print("protocol: " + result["protocol"]["description"])


# ---------------------------------------------------------------------------------------------- chart
def plot_figure(result: dict):
    """The chart: peak memory, decode and prefill latency by size, every variant; linear axes, each bar
    labelled with its value (a log axis with bars from the bottom makes a 3.9x gap look like 30x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"])
    variants = result["protocol"]["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    peaks = [v["figures"]["peak_memory_bytes"]["value"] for s in result["sizes"].values()
             for v in s["variants"].values() if "peak_memory_bytes" in v.get("figures", {})]
    mem_unit, mem_scale = ("GB", GB) if max(peaks, default=GB) >= GB else ("MB", 1e6)
    panels = (("peak_memory_bytes", 1 / mem_scale, f"peak memory ({mem_unit})", lambda x: f"{x:.3g}"),
              ("decode_ms_per_token", 1.0, "decode latency (ms / token)", _ms),
              ("prefill_ms", 1.0, f"prefill latency (ms, {result['protocol']['prompt_len']} tokens)", _ms))
    width = 0.8 / max(1, len(variants))
    for ax, (key, scale, title, text) in zip(axes, panels):
        for i, v in enumerate(variants):
            xs, ys, hatch, labels = [], [], [], []
            for j, s in enumerate(sizes):
                f = result["sizes"][s]["variants"].get(v, {}).get("figures")
                if f and key in f:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(f[key]["value"] * scale)
                    hatch.append("//" if f[key]["label"].startswith("extrapolated") else "")
                    labels.append(text(f[key]["value"] * scale))
            bars = ax.bar(xs, ys, width, label=v)
            for b, h in zip(bars, hatch):
                b.set_hatch(h)
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2, rotation=90)
            if key == "decode_ms_per_token" and v != "hf-llama":
                fl = [(x, result["sizes"][s]["variants"][v]["figures"].get("decode_floor_ms"))
                      for x, s in zip(xs, [s for s in sizes if "figures" in result["sizes"][s]["variants"].get(v, {})])]
                fx = [x for x, f in fl if f]
                fy = [f["value"] for x, f in fl if f]
                if fx:
                    ax.scatter(fx, fy, marker="_", s=300, color="black", zorder=3,
                               label="bandwidth floor" if v == "mmf" else None)
        ax.set_xticks(range(len(sizes)), sizes)
        top = max([b.get_height() for b in ax.patches] + [y for c in ax.collections for _, y in c.get_offsets()]
                  + [0.0])
        ax.set_ylim(0, 1.2 * top if top > 0 else 1)  # linear from 0, with room for the labels above the bars
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"mmf bench on {m.get('gpu') or m.get('cpu')} ({result['protocol']['device']}, batch "
                 f"{result['protocol']['batch']}, {result['protocol']['dtype']}, hatched = extrapolated)")
    fig.tight_layout()
    return fig


def write_plot(result: dict, path) -> None:
    """``plot_figure`` as a PNG: written to a temporary name beside ``path``, then renamed."""
    save_png(plot_figure(result), path)


def save_png(fig, path) -> None:
    """A matplotlib figure as a PNG: written to a temporary name beside ``path``, then renamed; closed after.
    Missing parent folders are created, as ``write_json`` does for ``--json-out``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except BaseException:
        plt.close(fig)
        raise
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- files
class PartialWriter:
    """After each size, the JSON and chart so far (a run cut short keeps the sizes it measured). A
    failed write does not stop the measurements: it is said once on stderr, and tried again at the end."""

    def __init__(self, json_out, plot, plot_writer: Optional[Callable] = None):
        self.json_out, self.plot = json_out, plot
        self.plot_writer = plot_writer or write_plot  # (result, path): the chart of this kind of run
        self.warned = False

    def __call__(self, res: dict) -> None:
        import mmf.bench as bench_pkg

        for opt, path, write in (("--json-out", self.json_out, lambda p: bench_pkg.write_json(p, res)),
                                 ("--plot", self.plot, lambda p: self.plot_writer(res, p))):
            if path is None:
                continue
            try:
                write(path)
            except Exception as e:
                if not self.warned:
                    print(f"mmf: warning: could not write {opt} {path} ({_why(e)}); measuring goes on, the "
                          "write is tried again at the end", file=sys.stderr)
                    self.warned = True


def write_outputs(result: dict, outputs: list, say: Callable[[str], None], where: str,
                  plot_writer: Optional[Callable] = None) -> None:
    """Write each ``(option, path)`` of ``outputs`` (``--json-out``: the JSON document; ``--plot``: the chart,
    by ``plot_writer(result, path)``, default ``write_plot``) and ``say`` "wrote PATH". Called once the
    figures are on screen (in the ``where``: table or JSON): the failures, if any, become one MMFError line
    that says so."""
    failed = []
    for opt, path in outputs:
        try:
            if opt == "--json-out":
                import mmf.bench as bench_pkg

                bench_pkg.write_json(path, result)
            else:
                (plot_writer or write_plot)(result, path)
            say(f"wrote {path}")
        except Exception as e:  # the figures are on screen already: say what failed, in one line
            failed.append((f"could not write {opt} {path}: {_why(e)}", e))
    if failed:
        raise MMFError("; ".join(m for m, _ in failed) + f" (the figures are in the {where} above)") from failed[0][1]


def _why(e: BaseException) -> str:
    if isinstance(e, MMFError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
