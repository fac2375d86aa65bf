"""`mmf fpga-image`: memory images of a MatMul-free checkpoint, with an address map (docs/fpga.md).

Two regions, each one linear word address space split into banks of ``bank_words`` words:

* ``ternary``: every BitLinear weight as 2-bit codes, row-major, the columns of a row sequential
  inside its words (the order a streaming matrix-vector unit reads). Every tensor starts at a bank
  boundary, so each bank belongs to one tensor; rows never straddle banks unless ``split_rows``.
* ``params``: everything else (embeddings, norm weights, lower bounds) as fp16 (or bf16/fp32) and
  the per-tensor weight scales s_w as fp32, each tensor starting on a word boundary.

The build streams the checkpoint one tensor at a time (``fpga.source``: float and latent checkpoints through
``iter_tensors``; packed checkpoints through the frozen model), writes each region's raw ``.bin``
image in place, then cuts the banks' ``.mem``/``.coe``/``.mif`` files from it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mmf.errors import MMFError
from mmf.outputs import atomic_directory, check_output, check_output_file, write_text_output

from . import formats as fmt
from .manifest import CHECKSUMS, FORMAT_NAME, FORMAT_VERSION, HEADER, MANIFEST, RESOURCES, sha256_file
from .sim import check_verify_options, failure_summary, find_simulator, verify_image
from .source import DERIVED_LB, CheckpointSource, is_ternary_name, layer_of

WORD_BITS_MIN, WORD_BITS_MAX = 32, 4096
DEFAULT_WORD_BITS = 64
DEFAULT_BANK_WORDS = 4096  # one UltraRAM (4096 x 72) deep; 8 BRAM36 at 64 bits
DEFAULT_ON_CHIP_MIB = 32.0  # about the BRAM + UltraRAM of a large Alveo/Versal card
SCALE_SUFFIX = "_scale"  # "<tensor>.weight" -> "<tensor>.weight_scale", FrozenBitLinear's buffer name
ELEMENT_ORDER_TERNARY = ("row-major; row n starts at word base + (n // rows_per_bank) * bank_words + "
                         "(n % rows_per_bank) * words_per_row; column k is in word k // codes_per_word of its row, "
                         "lane k % codes_per_word = bits [2*lane+1 : 2*lane]; code = w + 1 (0:-1, 1:0, 2:+1, "
                         "3 reserved); lanes past the last column hold code 1")
ELEMENT_ORDER_VALUES = ("row-major (C order) flattening; element i is in word base + i // values_per_word, "
                        "lane i % values_per_word = bits [b*(lane+1)-1 : b*lane] with b bits per value, "
                        "little-endian IEEE encoding")

@dataclass
class ImageOptions:
    word_bits: int = DEFAULT_WORD_BITS
    bank_words: int = DEFAULT_BANK_WORDS
    formats: tuple = fmt.FORMATS
    layers: str = "all"
    split_rows: bool = False
    param_encoding: str = "fp16"
    on_chip_mib: float = DEFAULT_ON_CHIP_MIB

    def validate(self) -> None:
        wb = self.word_bits
        if not isinstance(wb, int) or wb % 2 or not WORD_BITS_MIN <= wb <= WORD_BITS_MAX:
            raise MMFError(f"--word-bits {wb}: a word must hold whole 2-bit codes; use an even width from "
                           f"{WORD_BITS_MIN} to {WORD_BITS_MAX} (64, 72, 128, 256 or 512 are usual)")
        if not isinstance(self.bank_words, int) or self.bank_words < 1:
            raise MMFError(f"--bank-words {self.bank_words}: a bank needs at least one word (4096 is one UltraRAM deep)")
        if self.param_encoding not in fmt.VALUE_ENCODINGS:
            raise MMFError(f"--dtype {self.param_encoding!r}: use one of {', '.join(fmt.VALUE_ENCODINGS)} "
                           "(the encoding of the non-ternary parameters)")
        if not self.formats:
            raise MMFError("--formats is empty; give one or more of mem,coe,mif,bin")
        if not (math.isfinite(self.on_chip_mib) and self.on_chip_mib >= 0):
            raise MMFError(f"--on-chip-mib {self.on_chip_mib}: give the on-chip memory budget in MiB, a number >= 0 "
                           "(0 places every region off-chip)")


def parse_formats(spec: str) -> tuple:
    items = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if s not in fmt.FORMATS]
    if bad or not items:
        raise MMFError(f"--formats {spec!r}: unknown format {', '.join(bad) or '(none)'}; use a comma list of "
                       f"{','.join(fmt.FORMATS)}")
    return tuple(f for f in fmt.FORMATS if f in items)


def parse_layers(spec: str, num_layers: int) -> tuple[set, bool, bool]:
    """``all`` or a comma list of ``N``, ``N-M``, ``lm_head``, ``embeddings`` -> (layers, lm_head, embeddings)."""
    spec = spec.strip()
    if spec == "all":
        return set(range(num_layers)), True, True
    layers, lm_head, emb = set(), False, False
    for item in (s.strip() for s in spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if item == "lm_head":
            lm_head = True
        elif item == "embeddings":
            emb = True
        elif m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if lo > hi:
                raise MMFError(f"--layers {spec!r}: {item!r} is a reversed range; write it low to high ({hi}-{lo})")
            if hi >= num_layers:
                raise MMFError(f"--layers {spec!r}: {item!r} is out of range; the model has layers 0-{num_layers - 1}")
            layers.update(range(lo, hi + 1))
        else:
            raise MMFError(f"--layers {spec!r}: cannot read {item!r}; use all, or a comma list of layer numbers "
                           "(3), ranges (0-2), lm_head, embeddings")
    return layers, lm_head, emb


def select_names(source: CheckpointSource, layers_spec: str) -> list:
    layers, lm_head, emb = parse_layers(layers_spec, source.cfg.num_hidden_layers)
    out = []
    for name in source.names():
        layer = layer_of(name)
        if layer is not None:
            keep = layer in layers
        elif name.startswith("lm_head."):
            keep = lm_head
        elif name == "model.embeddings.weight":
            keep = emb
        else:  # final norm and lower bounds: small, and every layer needs them
            keep = True
        if keep:
            out.append(name)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Layout: addresses of every tensor, from shapes alone.


@dataclass
class Region:
    name: str
    encoding: str
    words: int = 0  # words placed so far (ternary: always a multiple of bank_words)
    tensors: list = field(default_factory=list)


def plan_layout(source: CheckpointSource, names: list, opt: ImageOptions) -> dict:
    """Assign every selected tensor its region, base word address, bank and geometry."""
    w, bw = opt.word_bits, opt.bank_words
    e = fmt.codes_per_word(w)
    ternary = Region("ternary", "ternary-2bit")
    params = Region("params", "values")
    entries = []
    scale_entries = []
    for name in names:
        shape = source.shapes[name]
        if is_ternary_name(name):
            rows, cols = shape
            wpr = -(-cols // e)
            if opt.split_rows:
                rpb = None
                used = rows * wpr
                nbanks = -(-used // bw)
            else:
                if wpr > bw:
                    raise MMFError(
                        f"a row of {name} ({cols} columns) needs {wpr} words of {w} bits but a bank holds {bw}; "
                        f"use --bank-words {wpr} or more, a wider --word-bits, or --split-rows")
                rpb = bw // wpr
                nbanks = -(-rows // rpb)
                used = rows * wpr
            entry = dict(name=name, kind="ternary", region="ternary", base_address=ternary.words,
                         bank=ternary.words // bw, banks=nbanks, words=nbanks * bw, payload_words=used,
                         rows=rows, columns=cols, words_per_row=wpr, rows_per_bank=rpb,
                         codes_per_word=e, element_order=ELEMENT_ORDER_TERNARY, encoding="ternary-2bit",
                         source_dtype=source.dtypes.get(name))
            ternary.words += nbanks * bw
            entries.append(entry)
            scale_entries.append(dict(name=name + SCALE_SUFFIX, kind="scale", of=name, shape=[]))
        else:
            entries.append(dict(name=name, kind="values", shape=list(shape), source_dtype=source.dtypes.get(name)))
    # params region: values tensors in order, then the scales
    for entry in [x for x in entries if x["kind"] == "values"] + scale_entries:
        enc = "fp32" if entry["kind"] == "scale" else opt.param_encoding
        numel = math.prod(entry["shape"]) if entry["shape"] else 1
        per = fmt.values_per_word(w, enc)
        nwords = -(-numel // per)
        entry.update(region="params", base_address=params.words, bank=params.words // bw, words=nwords,
                     payload_words=nwords, elements=numel, values_per_word=per, encoding=enc,
                     element_order=ELEMENT_ORDER_VALUES)
        if len(entry["shape"]) == 2:
            entry.update(rows=entry["shape"][0], columns=entry["shape"][1])
        elif len(entry["shape"]) == 1:
            entry.update(rows=1, columns=entry["shape"][0])
        else:
            entry.update(rows=1, columns=1)
        if entry["name"] == DERIVED_LB:
            entry["derived"] = ("softmax(model.lower_bounds, dim=0).cumsum(0) - that softmax's row 0: the lower "
                                "bound of layer l's forget gate is row l (row 0 is zero: layer 0 has none)")
        params.words += nwords
    params.words = -(-params.words // bw) * bw
    entries += scale_entries
    for x in entries:
        if x["region"] == "params":  # banks this tensor touches (params tensors may continue into the next bank)
            x["banks"] = (x["base_address"] + x["words"] - 1) // bw - x["bank"] + 1
    regions = {r.name: r for r in (ternary, params) if r.words}
    return {"entries": entries, "regions": regions}


# ----------------------------------------------------------------------------------------------------------------
# Resources


_BRAM36_SHAPES = [(72, 512), (36, 1024), (18, 2048), (9, 4096), (4, 8192), (2, 16384), (1, 32768)]


def bram36_per_bank(word_bits: int, depth: int) -> int:
    """Fewest RAMB36 primitives for a word_bits x depth memory over their aspect ratios (estimate)."""
    return min(-(-word_bits // wd) * -(-depth // dp) for wd, dp in _BRAM36_SHAPES)


def uram_per_bank(word_bits: int, depth: int) -> int:
    """UltraRAM (URAM288, 72 x 4096) primitives for a word_bits x depth memory (estimate)."""
    return -(-word_bits // 72) * -(-depth // 4096)


def resource_report(regions: dict, entries: list, opt: ImageOptions) -> list:
    rows = []
    for r in regions.values():
        banks = r.words // opt.bank_words
        nbytes = r.words * fmt.bytes_per_word(opt.word_bits)
        on_chip = nbytes <= opt.on_chip_mib * 2**20
        payload = sum(x["payload_words"] for x in entries if x["region"] == r.name)
        rows.append({
            "region": r.name,
            "placement": "on-chip" if on_chip else "off-chip (DDR/HBM)",
            "tensors": sum(1 for x in entries if x["region"] == r.name),
            "banks": banks,
            "words": r.words,
            "bits": r.words * opt.word_bits,
            "payload_words": payload,
            "bram36": banks * bram36_per_bank(opt.word_bits, opt.bank_words) if on_chip else None,
            "uram288": banks * uram_per_bank(opt.word_bits, opt.bank_words) if on_chip else None,
            "ddr_bytes": None if on_chip else nbytes,
        })
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Writing


def bank_file(region: str, bank: int, ext: str) -> str:
    return f"{region}/bank{bank:05d}.{ext}"


def _write_tensors(source: CheckpointSource, layout: dict, tmp: Path, opt: ImageOptions, progress) -> None:
    w, bw = opt.word_bits, opt.bank_words
    bpw = fmt.bytes_per_word(w)
    regions = layout["regions"]
    by_name = {x["name"]: x for x in layout["entries"]}
    handles = {}
    for r in regions.values():
        path = tmp / f"{r.name}.bin"
        if r.name == "ternary":  # unused words read as weight 0 (code 1)
            fill = fmt.ternary_fill_word(w)
            with open(path, "wb") as f:
                block = fill * bw
                for _ in range(r.words // bw):
                    f.write(block)
        else:
            with open(path, "wb") as f:
                f.truncate(r.words * bpw)
        handles[r.name] = open(path, "r+b")
    try:
        wanted = {x["name"] for x in layout["entries"] if x["kind"] != "scale"}
        task = progress.add_task("fpga-image: writing tensors", total=len(wanted))
        for name, payload in source.iter(wanted):
            x = by_name[name]
            f = handles[x["region"]]
            if x["kind"] == "ternary":
                codes, s_w = payload
                rows = fmt.encode_ternary_rows(codes, w)  # (N, wpr, bpw)
                if x["rows_per_bank"] is None:
                    f.seek(x["base_address"] * bpw)
                    f.write(rows.tobytes())
                else:
                    rpb = x["rows_per_bank"]
                    for b0 in range(0, x["rows"], rpb):
                        f.seek((x["base_address"] + (b0 // rpb) * bw) * bpw)
                        f.write(rows[b0:b0 + rpb].tobytes())
                s = by_name[name + SCALE_SUFFIX]
                s_w = s_w.float().reshape(())
                x["scale"] = {"value": float(s_w), "fp32_hex": f"0x{int(s_w.view(torch.int32)) & 0xFFFFFFFF:08x}",
                              "encoding": "fp32", "tensor": s["name"],
                              "meaning": "s_w: w = code_value / s_w, so y = acc / (s_x * s_w)"}
                handles["params"].seek(s["base_address"] * bpw)
                handles["params"].write(fmt.encode_values(s_w, "fp32", w).tobytes())
            else:
                t = payload
                if t.is_floating_point() and x["encoding"] != "fp32":
                    big = t.float().abs().max().item() if t.numel() else 0.0
                    if x["encoding"] == "fp16" and big > 65504.0:
                        raise MMFError(f"{name} has values up to {big:g}, beyond fp16's 65504; "
                                       "use --dtype bf16 or fp32")
                f.seek(x["base_address"] * bpw)
                f.write(fmt.encode_values(t, x["encoding"], w).tobytes())
                x["scale"] = None
            progress.advance(task)
    finally:
        for h in handles.values():
            h.close()
    missing = [n for n in wanted if "scale" not in by_name[n]]
    if missing:
        raise MMFError(f"{source.path}: tensor {missing[0]} was not found while reading the checkpoint")


def _write_bank_texts(layout: dict, tmp: Path, opt: ImageOptions, progress) -> None:
    texts = [f for f in opt.formats if f in fmt.TEXT_FORMATS]
    if not texts:
        return
    w, bw = opt.word_bits, opt.bank_words
    bpw = fmt.bytes_per_word(w)
    total = sum(r.words // bw for r in layout["regions"].values())
    task = progress.add_task("fpga-image: writing banks", total=total)
    for r in layout["regions"].values():
        (tmp / r.name).mkdir()
        with open(tmp / f"{r.name}.bin", "rb") as f:
            for b in range(r.words // bw):
                words = np.frombuffer(f.read(bw * bpw), dtype=np.uint8).reshape(bw, bpw)
                title = (f"mmf fpga-image: region {r.name}, bank {b}, {bw} words x {w} bits, "
                         f"region words {b * bw}..{(b + 1) * bw - 1} (manifest.json has the map)")
                for ext in texts:
                    fmt.WRITERS[ext](tmp / bank_file(r.name, b, ext), words, w, title)
                progress.advance(task)


def verilog_name(name: str) -> str:
    s = name.removeprefix("model.")
    s = re.sub(r"^layers\.(\d+)\.", r"L\1_", s)
    s = s.removesuffix(".weight")
    return "MMF_" + re.sub(r"[^0-9A-Za-z]+", "_", s).upper()


def _vnum(v: int) -> str:
    return str(v) if v < 2**31 else f"64'd{v}"


def verilog_header(manifest: dict) -> str:
    w, bw = manifest["word_bits"], manifest["bank_words"]
    lines = [
        "// Generated by mmf fpga-image: widths, depths and base addresses of this image. Do not edit;",
        "// include it inside a module (`include \"mmf_image.vh\"). Addresses are word addresses in a region.",
        f"localparam MMF_FORMAT_VERSION = {manifest['format_version']};",
        f"localparam MMF_WORD_BITS = {w};",
        f"localparam MMF_CODES_PER_WORD = {w // 2};",
        f"localparam MMF_BANK_WORDS = {bw};",
        f"localparam MMF_BANK_ADDR_BITS = {max(1, (bw - 1).bit_length())};",
    ]
    for rname, r in manifest["regions"].items():
        up = rname.upper()
        lines += [f"localparam MMF_{up}_BANKS = {r['banks']};", f"localparam MMF_{up}_WORDS = {_vnum(r['words'])};",
                  f"localparam MMF_{up}_ADDR_BITS = {max(1, (r['words'] - 1).bit_length())};"]
    for x in manifest["tensors"]:
        v = verilog_name(x["name"])
        lines.append(f"// {x['name']}: {x['kind']}, region {x['region']}, {x['rows']} x {x['columns']}")
        lines.append(f"localparam {v}_BASE = {_vnum(x['base_address'])};")
        lines.append(f"localparam {v}_BANK = {x['bank']};")
        lines.append(f"localparam {v}_WORDS = {_vnum(x['words'])};")
        lines.append(f"localparam {v}_ROWS = {x['rows']};")
        lines.append(f"localparam {v}_COLS = {x['columns']};")
        if x["kind"] == "ternary":
            lines.append(f"localparam {v}_WORDS_PER_ROW = {x['words_per_row']};")
            lines.append(f"localparam {v}_ROWS_PER_BANK = {x['rows_per_bank'] or 0};")
    return "\n".join(lines) + "\n"


def build_image(checkpoint, out, opt: Optional[ImageOptions] = None, overwrite: bool = False,
                verify: bool = False, verify_rows: int = 64, seed: int = 0, json_out: Optional[Path] = None) -> dict:
    """Write the image directory ``out`` from ``checkpoint``; returns the manifest (and the verify report).

    With ``verify`` the reference RTL is simulated on the image before it is moved into place, so a
    failed verification leaves nothing behind. ``overwrite`` replaces only a directory mmf wrote.
    ``json_out``: also write ``report_document`` there (checked before any work).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    opt = opt or ImageOptions()
    opt.validate()
    check_verify_options(verify_rows, seed)
    out = Path(out)
    checkpoint = Path(checkpoint)
    src, dst = checkpoint.resolve(), out.resolve()
    if dst == src:
        raise MMFError(f"--out {out} is the checkpoint itself; choose another directory")
    if src in dst.parents or dst in src.parents:
        raise MMFError(f"--out {out} overlaps the checkpoint {checkpoint}; write the image to a separate directory")
    check_output(out, overwrite)
    if json_out is not None:
        check_output_file(json_out)
    source = CheckpointSource(checkpoint)
    names = select_names(source, opt.layers)
    layout = plan_layout(source, names, opt)
    if verify:
        find_simulator()  # fail before any work when the simulator is missing
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        transient=True, disable=not sys.stderr.isatty())
    with atomic_directory(out, overwrite, need_bytes=image_bytes_estimate(layout, opt)) as tmp, progress:
        _write_tensors(source, layout, tmp, opt, progress)
        _write_bank_texts(layout, tmp, opt, progress)
        if "bin" not in opt.formats:
            for r in layout["regions"]:
                (tmp / f"{r}.bin").unlink()
        manifest = _manifest(source, layout, opt)
        (tmp / HEADER).write_text(verilog_header(manifest))
        resources = manifest["resources"]
        (tmp / RESOURCES).write_text(json.dumps(resources, indent=2) + "\n")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest["files"] = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                             for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        sums = dict(manifest["files"])
        sums[MANIFEST] = {"sha256": sha256_file(tmp / MANIFEST)}
        (tmp / CHECKSUMS).write_text("".join(f"{v['sha256']}  {k}\n" for k, v in sorted(sums.items())))
        report = {"manifest": manifest, "verify": None}
        if verify:
            report["verify"] = verify_image(tmp, checkpoint, rows=verify_rows, seed=seed, source=source,
                                            progress=progress, checksums=False)  # hashed a moment ago
            if not report["verify"]["passed"]:
                raise MMFError(failure_summary(report["verify"]) + "; nothing was written")
    if json_out is not None:
        write_text_output(json_out, json.dumps(report_document(report, out), indent=2) + "\n")
    return report


def report_document(report: dict, out) -> dict:
    """The JSON document of a build (``--json`` prints it, ``--json-out`` writes it): resources, verify, out."""
    return {"resources": report["manifest"]["resources"], "verify": report["verify"], "out": str(out)}


def image_bytes_estimate(layout: dict, opt: ImageOptions) -> int:
    """A lower bound of the bytes the image takes on disk: the raw region images (always written first) and,
    per text format, one line of hex digits per word."""
    words = sum(r.words for r in layout["regions"].values())
    texts = sum(1 for f in opt.formats if f in fmt.TEXT_FORMATS)
    return words * fmt.bytes_per_word(opt.word_bits) + texts * words * (-(-opt.word_bits // 4) + 1)


def _manifest(source: CheckpointSource, layout: dict, opt: ImageOptions) -> dict:
    from mmf import __version__

    w, bw = opt.word_bits, opt.bank_words
    resources = resource_report(layout["regions"], layout["entries"], opt)
    placement = {r["region"]: r["placement"] for r in resources}
    regions = {}
    for r in layout["regions"].values():
        regions[r.name] = {
            "encoding": r.encoding,
            "banks": r.words // bw,
            "words": r.words,
            "placement": placement[r.name],
            "bin": f"{r.name}.bin" if "bin" in opt.formats else None,
            "bank_files": {ext: f"{r.name}/bank{{bank:05d}}.{ext}" for ext in opt.formats if ext in fmt.TEXT_FORMATS},
            "fill": "code 1 (weight 0) in every lane" if r.name == "ternary" else "zero bits",
        }
    cfg = source.cfg
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "mmf_version": __version__,
        "source": {"checkpoint": str(source.path), "kind": source.kind, "model_type": cfg.model_type,
                   "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                   "vocab_size": cfg.vocab_size, "intermediate_size": cfg.ffn_size,
                   "rms_norm_eps": cfg.rms_norm_eps, "bitlinear_norm_eps": 1e-6},
        "layers": opt.layers,
        "word_bits": w,
        "bytes_per_word": fmt.bytes_per_word(w),
        "codes_per_word": fmt.codes_per_word(w),
        "bank_words": bw,
        "split_rows": opt.split_rows,
        "byte_order": "little-endian words in .bin, ceil(word_bits/8) bytes each; big-endian hex digits in text files",
        "ternary_code": {"0": -1, "1": 0, "2": 1, "3": "reserved (never written)"},
        "activation_quantisation": "per token: s_x = 127 / max(max|xn|, 1e-5), xq = clamp(round(xn * s_x), -128, 127)",
        "off_chip_note": ("regions whose placement is off-chip (DDR/HBM) are too large for on-chip memory at "
                          f"the --on-chip-mib budget ({opt.on_chip_mib:g} MiB): preload their .bin at a base address "
                          "of your choice and stream banks from there; a billion-parameter model's weights live "
                          "off-chip (1e9 ternary weights take 250 MB at 2 bits)"),
        "regions": regions,
        "tensors": layout["entries"],
        "resources": {"regions": resources,
                      "notes": "BRAM36 (RAMB36, best aspect ratio of 72x512 .. 1x32768) and URAM288 (72x4096) "
                               "counts are per-bank estimates for on-chip regions; synthesis may differ"},
    }


def resource_rows(manifest: dict) -> list:
    """The resource report as table rows (for the CLI)."""
    rows = []
    for r in manifest["resources"]["regions"]:
        rows.append({"region": r["region"], "placement": r["placement"], "tensors": r["tensors"],
                     "banks": r["banks"], "words": f"{r['words']:,}", "bits": f"{r['bits']:,}",
                     "BRAM36": "-" if r["bram36"] is None else r["bram36"],
                     "URAM288": "-" if r["uram288"] is None else r["uram288"],
                     "DDR bytes": "-" if r["ddr_bytes"] is None else f"{r['ddr_bytes']:,}"})
    return rows
