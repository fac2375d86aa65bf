"""The batched-decode GEMM per schedule, timed as the decoder runs it (GPU): where a decode step's time goes.

For each projection shape of a MatMul-free preset (i/f/g as three segments, o with the residual, the
gate/up GLU pair, down with the residual) and each batch in ``--rows``: every candidate schedule of
``kernels.ternary_gemm`` (``_gemm_configs``, split-K ones included) timed in a CUDA graph of back-to-back
launches over ``--pool`` distinct weight sets (no L2 reuse; programmatic dependent launch where the GPU
has it), its output compared bit for bit with the first schedule's; then, for the fastest schedule, the
quantisation pre-pass alone in the same kind of chain, and (pre-pass, GEMM) pairs, the unit a decode step
repeats four times per layer. Beside each time, the floor: the projection's packed weight bytes at
``--bandwidth``.

    python -m mmf.bench.decode_gemm_chain --size 13b --rows 4,16 --json-out F

Prints a table; the JSON is rewritten after every shape.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mmf.bench import mmf_preset_or_none, write_json


def _pair_chain(fns_a, fns_b):
    return [f for pair in zip(fns_a, fns_b) for f in pair]


def measure_shape(name, nseg, n, k, epi, rows, pool_size, bandwidth, d, gen, dev="cuda") -> list:
    from mmf.bench.model_variants import random_packed
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemv as tv

    dev = torch.device(dev)
    wrows = 2 * n if epi == tv.EPI_GLU else n
    pool = [[random_packed(wrows, k, "i2", dev, gen) for _ in range(nseg)] for _ in range(pool_size)]
    sw = torch.ones(nseg, device=dev)
    nbytes = nseg * wrows * tv.packed_bytes(k)
    out_rows = []
    for m in rows:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
        nw = torch.ones(nseg, k, device=dev, dtype=torch.bfloat16)
        sc = tv.Scratch(nseg, m, k, dev)
        tg.quantize(x, nw, sc, nseg=nseg)
        out = torch.empty(m, n if epi == tv.EPI_GLU else nseg * n, device=dev, dtype=torch.bfloat16)
        resid = torch.randn(m, nseg * n, device=dev, dtype=torch.bfloat16, generator=gen) if epi == tv.EPI_RESIDUAL \
            else None

        def launch(cfg, w):
            return lambda: tg.gemm(sc, w, sw, out, k=k, epi=epi, residual=resid, config=cfg)

        row = dict(shape=name, m=m, n=n, k=k, nseg=nseg, floor_us=nbytes / bandwidth * 1e6, configs={})
        want = None
        for cfg in tg._gemm_configs(m):
            try:
                us = tv.chain_ms([launch(cfg, w) for w in pool] * 2) * 1e3
            except Exception as e:  # noqa: BLE001 - a schedule that does not fit is reported, not fatal
                row["configs"][str(cfg)] = dict(us=None, equal=None, error=repr(e)[:120])
                continue
            launch(cfg, pool[-1])()
            got = out.clone()
            want = got if want is None else want
            row["configs"][str(cfg)] = dict(us=us, equal=bool(torch.equal(got, want)))
        timed = {c: v for c, v in row["configs"].items() if v["us"] is not None}
        best = min(timed, key=lambda c: timed[c]["us"])
        cfg = tuple(int(v) for v in best.strip("()").split(","))
        chunks = tg.decode_quant_chunks(m, d)

        def pre():
            tg.quantize(x, nw, sc, nseg=nseg, chunks=chunks)

        row.update(best=best, best_us=timed[best]["us"],
                   best_unsplit_us=min(v["us"] for c, v in timed.items() if c.count(",") < 6),
                   quant_us=tv.chain_ms([pre] * (2 * pool_size)) * 1e3,
                   pair_us=2 * tv.chain_ms(_pair_chain([pre] * (2 * pool_size), [launch(cfg, w) for w in pool] * 2))
                   * 1e3,
                   all_equal=all(v["equal"] for v in timed.values()))
        out_rows.append(row)
    return out_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmf.bench.decode_gemm_chain",
                                 description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--size", default="13b", help="MatMul-free preset whose shapes are timed (default: 13b)")
    ap.add_argument("--rows", default="4,16", help="decode batches, comma-separated, 1-64 (default: 4,16)")
    ap.add_argument("--pool", type=int, default=6, help="distinct weight sets per chain (default: 6)")
    ap.add_argument("--bandwidth", type=float, default=4.2e12,
                    help="bytes/s for the floor column (default: 4.2e12, an H200's measured copy bandwidth)")
    ap.add_argument("--json-out", default=None, help="JSON output (default: none)")
    args = ap.parse_args(argv)
    cfg = mmf_preset_or_none("decode_gemm_chain", "--size", args.size)
    if cfg is None:
        return 2
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or not all(1 <= r <= 64 for r in rows) or args.pool < 2:
        print(f"decode_gemm_chain: --rows {args.rows} --pool {args.pool}: give batches 1-64 and a pool of 2 or more",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("decode_gemm_chain: needs a CUDA GPU; run it on a machine with one", file=sys.stderr)
        return 2
    import triton
    from tabulate import tabulate

    from mmf.kernels import ternary_gemv as tv

    d, f = cfg.hidden_size, cfg.ffn_size
    shapes = [("ifg", 3, d, d, tv.EPI_STORE), ("o", 1, d, d, tv.EPI_RESIDUAL), ("gate/up", 1, f, d, tv.EPI_GLU),
              ("down", 1, d, f, tv.EPI_RESIDUAL)]
    res = dict(command=" ".join(["python -m mmf.bench.decode_gemm_chain", *(argv if argv is not None else sys.argv[1:])]),
               device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               size=args.size, bandwidth=args.bandwidth, rows=[])
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    for shape in shapes:
        res["rows"] += measure_shape(*shape, rows, args.pool, args.bandwidth, d, gen)
        torch.cuda.empty_cache()
        if args.json_out:
            write_json(args.json_out, res)
        print(f"[{shape[0]} done, {time.time() - t0:.0f} s]", flush=True)
    table = [[r["shape"], r["m"], f"{r['floor_us']:.2f}", f"{r['best_us']:.2f}", r["best"], f"{r['best_unsplit_us']:.2f}",
              f"{r['quant_us']:.2f}", f"{r['pair_us']:.2f}", "yes" if r["all_equal"] else "NO"] for r in res["rows"]]
    print(tabulate(table, headers=["shape", "rows", "floor us", "GEMM us", "schedule", "unsplit us", "pre-pass us",
                                   "pair us", "bit-equal"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
