"""mmf fpga-image: images read back by independent readers, the address map, and the RTL simulation.

The readers here parse each file format from its own specification (docs/fpga.md, $readmemh, Xilinx
COE, Intel MIF) and rebuild the weights with the manifest's addresses; they share no code with
mmf.fpga. Simulation tests need Icarus Verilog: under CI=true a missing simulator is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import main_in_process, run_cli
from mmf.checkpoint import iter_tensors
from mmf.errors import MMFError
from mmf.fpga.image import ImageOptions, build_image, parse_formats, parse_layers
from mmf.fpga.sim import random_activations, verify_image
from mmf.kernels.reference import weight_quant


def need_iverilog():
    if shutil.which("iverilog") and shutil.which("vvp"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("Icarus Verilog is missing under CI=true; CI must install it (apt-get install iverilog)")
    pytest.skip("Icarus Verilog not installed (apt-get install iverilog); simulation tests skipped")


# ------------------------------------------------------------------------------------------------ readers


def read_mem(path, width):
    words = []
    for line in open(path):
        line = line.split("//")[0].strip()
        if line:
            v = int(line, 16)
            assert v < 1 << width
            words.append(v)
    return words


def read_coe(path, width):
    text = "\n".join(l for l in open(path).read().splitlines() if not l.strip().startswith(";"))
    assert re.search(r"memory_initialization_radix\s*=\s*16\s*;", text)
    vec = text.split("memory_initialization_vector", 1)[1].split("=", 1)[1]
    assert vec.rstrip().endswith(";")
    items = [s.strip() for s in vec.rstrip().rstrip(";").split(",")]
    words = [int(s, 16) for s in items]
    assert all(v < 1 << width for v in words)
    return words


def read_mif(path, width):
    text = "\n".join(l.split("--")[0] for l in open(path).read().splitlines())
    head = dict(re.findall(r"(\w+)\s*=\s*(\w+)\s*;", text.split("CONTENT", 1)[0]))
    assert int(head["WIDTH"]) == width and head["ADDRESS_RADIX"] == "HEX" and head["DATA_RADIX"] == "HEX"
    depth = int(head["DEPTH"])
    words = [None] * depth
    body = text.split("BEGIN", 1)[1].rsplit("END", 1)[0]
    for a, d in re.findall(r"([0-9A-Fa-f]+)\s*:\s*([0-9A-Fa-f]+)\s*;", body):
        words[int(a, 16)] = int(d, 16)
    assert None not in words
    return words


def read_bin(path, width):
    bpw = -(-width // 8)
    data = open(path, "rb").read()
    assert len(data) % bpw == 0
    return [int.from_bytes(data[i:i + bpw], "little") for i in range(0, len(data), bpw)]


READERS = {"mem": read_mem, "coe": read_coe, "mif": read_mif}


def region_words(image, manifest, region, ext):
    w = manifest["word_bits"]
    if ext == "bin":
        return read_bin(image / f"{region}.bin", w)
    words = []
    for b in range(manifest["regions"][region]["banks"]):
        bank = READERS[ext](image / region / f"bank{b:05d}.{ext}", w)
        assert len(bank) == manifest["bank_words"]
        words += bank
    return words


def decode_ternary(words, entry, manifest):
    e, bw = manifest["word_bits"] // 2, manifest["bank_words"]
    n, k, wpr, rpb = entry["rows"], entry["columns"], entry["words_per_row"], entry["rows_per_bank"]
    out = np.empty((n, k), dtype=np.int8)
    for r in range(n):
        start = entry["base_address"] + (r * wpr if rpb is None else (r // rpb) * bw + (r % rpb) * wpr)
        for c in range(k):
            code = (words[start + c // e] >> (2 * (c % e))) & 3
            assert code != 3
            out[r, c] = code - 1
        for c in range(k, wpr * e):  # row padding reads as weight 0
            assert (words[start + c // e] >> (2 * (c % e))) & 3 == 1
    return torch.from_numpy(out)


def decode_values(words, entry, manifest):
    bits = {"fp16": 16, "bf16": 16, "fp32": 32}[entry["encoding"]]
    per = manifest["word_bits"] // bits
    raw = [(words[entry["base_address"] + i // per] >> (bits * (i % per))) & ((1 << bits) - 1)
           for i in range(entry["elements"])]
    if bits == 32:
        return torch.tensor(np.array(raw, dtype=np.uint32).view(np.float32))
    as16 = torch.tensor(np.array(raw, dtype=np.uint16).view(np.int16))
    return as16.view(torch.float16 if entry["encoding"] == "fp16" else torch.bfloat16)


def checkpoint_truth(ckpt):
    tensors = dict(iter_tensors(ckpt))
    lb = tensors["model.lower_bounds"].float().softmax(0)
    tensors["model.layer_lower_bounds"] = lb.cumsum(0) - lb[0]
    return tensors


def check_image_against_checkpoint(image, ckpt, formats):
    manifest = json.loads((image / "manifest.json").read_text())
    truth = checkpoint_truth(ckpt)
    by_name = {x["name"]: x for x in manifest["tensors"]}
    for ext in formats:
        words = {r: region_words(image, manifest, r, ext) for r in manifest["regions"]}
        for x in manifest["tensors"]:
            if x["kind"] == "ternary":
                codes, s_w = weight_quant(truth[x["name"]])
                assert torch.equal(decode_ternary(words["ternary"], x, manifest), codes), (ext, x["name"])
                assert x["scale"]["value"] == float(s_w)
                stored = decode_values(words["params"], by_name[x["scale"]["tensor"]], manifest)
                assert stored.item() == float(s_w)
            elif x["kind"] == "values":
                t = truth[x["name"]].float().reshape(-1).to(torch.float16)
                got = decode_values(words["params"], x, manifest)
                assert torch.equal(got.view(torch.int16), t.view(torch.int16)), (ext, x["name"])
    return manifest


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def image64(tiny_mmf_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("fpga") / "img64"
    build_image(tiny_mmf_ckpt, out, ImageOptions(word_bits=64, bank_words=64))
    return out


# ------------------------------------------------------------------------------------------------ tests


def test_every_format_rebuilds_the_weights_exactly(image64, tiny_mmf_ckpt):
    manifest = check_image_against_checkpoint(image64, tiny_mmf_ckpt, ("mem", "coe", "mif", "bin"))
    assert manifest["format_version"] == 1 and manifest["word_bits"] == 64


@pytest.mark.parametrize("word_bits,bank_words,split", [(72, 16, True), (34, 8, False)])
def test_odd_widths_and_split_rows_rebuild_exactly(tiny_mmf_ckpt, tmp_path, word_bits, bank_words, split):
    out = tmp_path / "img"
    build_image(tiny_mmf_ckpt, out, ImageOptions(word_bits=word_bits, bank_words=bank_words, split_rows=split,
                                                 formats=("mem", "mif", "bin")))
    check_image_against_checkpoint(out, tiny_mmf_ckpt, ("mem", "mif", "bin"))
    if split:  # rows that straddle banks: the simulator loads consecutive banks as one memory
        need_iverilog()
        rep = verify_image(out, tiny_mmf_ckpt, rows=16)
        assert rep["passed"] and rep["rtl_parameters"]["NBANKS"] > 1


def test_bf16_checkpoint_matches_the_frozen_model(tmp_path):
    import mmf
    from conftest import small_model

    ckpt = tmp_path / "bf16"
    mmf.save_checkpoint(small_model("mmf", seed=3, tie_word_embeddings=True), ckpt, dtype=torch.bfloat16)
    rep = build_image(ckpt, tmp_path / "img", ImageOptions(formats=("bin",)))
    manifest = rep["manifest"]
    words = region_words(tmp_path / "img", manifest, "ternary", "bin")
    model = mmf.load_model(ckpt, frozen=True)
    modules = dict(model.named_modules())
    for x in (t for t in manifest["tensors"] if t["kind"] == "ternary"):
        m = modules[x["name"].removesuffix(".weight")]
        assert torch.equal(decode_ternary(words, x, manifest), m.ternary_codes())
        assert x["scale"]["value"] == float(m.weight_scale)
    assert "lm_head.weight" in {x["name"] for x in manifest["tensors"]}  # tied: quantised from the embeddings


def test_worked_example_of_the_spec(image64, tiny_mmf_ckpt):
    """docs/fpga.md: 64 x 96 down_proj, W = 64, B = 64: 3 words per row, 21 rows per bank, 4 banks;
    element (22, 70) is in word base + 1*64 + 1*3 + 2, bits [13:12]."""
    manifest = json.loads((image64 / "manifest.json").read_text())
    x = next(t for t in manifest["tensors"] if t["name"] == "model.layers.0.mlp.down_proj.weight")
    assert (x["words_per_row"], x["rows_per_bank"], x["banks"]) == (3, 21, 4)
    words = read_bin(image64 / "ternary.bin", 64)
    code = (words[x["base_address"] + 64 + 3 + 2] >> 12) & 3
    codes, _ = weight_quant(dict(iter_tensors(tiny_mmf_ckpt))[x["name"]])
    assert code == int(codes[22, 70]) + 1


def test_packed_checkpoint_gives_the_same_weight_image(tiny_mmf_ckpt, image64, tmp_path):
    packing = pytest.importorskip("mmf.converters.packing", reason="packed checkpoints (mmf pack) not available")
    for fmt_name in ("i2", "tq1"):
        packed = tmp_path / f"packed-{fmt_name}"
        packing.pack_checkpoint(tiny_mmf_ckpt, packed, fmt=fmt_name)
        rep = build_image(packed, tmp_path / f"img-{fmt_name}", ImageOptions(word_bits=64, bank_words=64))
        assert rep["manifest"]["source"]["kind"] == "packed"
        assert (tmp_path / f"img-{fmt_name}" / "ternary.bin").read_bytes() == (image64 / "ternary.bin").read_bytes()
        scales = {x["name"]: x["scale"] for x in rep["manifest"]["tensors"] if x["kind"] == "ternary"}
        ref = {x["name"]: x["scale"] for x in json.loads((image64 / "manifest.json").read_text())["tensors"]
               if x["kind"] == "ternary"}
        assert scales == ref


def test_manifest_addresses_cover_every_tensor_without_overlap(image64, tiny_mmf_ckpt):
    import hashlib

    manifest = json.loads((image64 / "manifest.json").read_text())
    bw = manifest["bank_words"]
    names = {x["name"] for x in manifest["tensors"]}
    ckpt_names = {k for k, _ in iter_tensors(tiny_mmf_ckpt)}
    ternary = {n for n in ckpt_names if n.endswith("_proj.weight") or n == "lm_head.weight"}
    assert ckpt_names | {"model.layer_lower_bounds"} | {n + "_scale" for n in ternary} == names
    for region, info in manifest["regions"].items():
        spans = sorted((x["base_address"], x["base_address"] + x["words"], x["name"])
                       for x in manifest["tensors"] if x["region"] == region)
        assert info["words"] == info["banks"] * bw
        for (a0, a1, n0), (b0, _, n1) in zip(spans, spans[1:]):
            assert a1 <= b0, f"{n0} overlaps {n1}"
        assert spans[0][0] >= 0 and spans[-1][1] <= info["words"]
        for a0, a1, name in spans:
            x = next(t for t in manifest["tensors"] if t["name"] == name)
            assert x["bank"] == a0 // bw
            if region == "ternary":
                assert a0 % bw == 0  # every ternary tensor owns whole banks
                assert x["words"] >= x["rows"] * x["words_per_row"]
    listed = set(manifest["files"])
    on_disk = {p.relative_to(image64).as_posix() for p in image64.rglob("*") if p.is_file()}
    assert on_disk - listed == {"manifest.json", "SHA256SUMS"}
    for rel, info in manifest["files"].items():
        assert hashlib.sha256((image64 / rel).read_bytes()).hexdigest() == info["sha256"]
    header = (image64 / "mmf_image.vh").read_text()
    assert "localparam MMF_WORD_BITS = 64;" in header and "localparam MMF_L0_ATTN_I_PROJ_BASE = 0;" in header


def test_resource_report(image64):
    res = json.loads((image64 / "resources.json").read_text())
    t = next(r for r in res["regions"] if r["region"] == "ternary")
    # a 64 x 64 bank fits one RAMB36 (512 x 72) and one URAM288 (4096 x 72)
    assert t["placement"] == "on-chip" and t["bram36"] == t["banks"] and t["uram288"] == t["banks"]
    assert t["bits"] == t["words"] * 64


def test_off_chip_placement(tiny_mmf_ckpt, tmp_path):
    rep = build_image(tiny_mmf_ckpt, tmp_path / "img", ImageOptions(on_chip_mib=0.0, formats=("bin",)))
    regions = rep["manifest"]["resources"]["regions"]
    assert all(r["placement"] == "off-chip (DDR/HBM)" and r["bram36"] is None for r in regions)
    assert all(r["ddr_bytes"] == (tmp_path / "img" / f"{r['region']}.bin").stat().st_size for r in regions)
    assert not (tmp_path / "img" / "ternary").exists()  # bin only: no bank text files


def test_layers_selection(tiny_mmf_ckpt, tmp_path):
    rep = build_image(tiny_mmf_ckpt, tmp_path / "img", ImageOptions(layers="1", formats=("bin",)))
    names = {x["name"] for x in rep["manifest"]["tensors"]}
    assert "model.layers.1.attn.i_proj.weight" in names and "model.layers.0.attn.i_proj.weight" not in names
    assert "lm_head.weight" not in names and "model.embeddings.weight" not in names
    assert parse_layers("0-1,lm_head", 2) == ({0, 1}, True, False)
    with pytest.raises(MMFError, match="out of range"):
        parse_layers("2", 2)
    with pytest.raises(MMFError, match=r"^--layers '3-1': '3-1' is a reversed range; write it low to high \(1-3\)$"):
        parse_layers("3-1", 4)  # said "out of range", though layers 1 to 3 exist
    with pytest.raises(MMFError, match="cannot read"):
        parse_layers("attn", 2)
    with pytest.raises(MMFError, match="unknown format"):
        parse_formats("mem,hex")


def test_bad_input_one_line_nothing_written(tiny_mmf_ckpt, tmp_path):
    out = tmp_path / "img"
    with pytest.raises(MMFError, match="even width"):
        build_image(tiny_mmf_ckpt, out, ImageOptions(word_bits=63))
    with pytest.raises(MMFError, match="a bank holds 2"):  # a row of 64 columns needs 4 words of 32 bits
        build_image(tiny_mmf_ckpt, out, ImageOptions(word_bits=32, bank_words=2))
    assert list(tmp_path.iterdir()) == []  # no directory, no temporary left behind
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(MMFError, match="already exists"):
        build_image(tiny_mmf_ckpt, out, ImageOptions())
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]
    with pytest.raises(MMFError, match="no such checkpoint"):
        build_image(tiny_mmf_ckpt.parent / "missing", tmp_path / "x", ImageOptions())
    assert not (tmp_path / "x").exists()


def test_transformer_checkpoint_is_refused(tiny_llama_ckpt, tmp_path):
    with pytest.raises(MMFError, match="no ternary weights"):
        build_image(tiny_llama_ckpt, tmp_path / "x", ImageOptions())
    assert not (tmp_path / "x").exists()


def test_bad_input_cli_one_line(tiny_mmf_ckpt, tmp_path):
    r = run_cli("fpga-image", tiny_mmf_ckpt, "--out", tmp_path / "img", "--word-bits", "65")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--word-bits 65" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "img").exists()


def test_missing_simulator_says_how_to_install(monkeypatch):
    from mmf.fpga import sim

    monkeypatch.setattr(sim.shutil, "which", lambda name: None)
    with pytest.raises(MMFError, match="apt-get install iverilog"):
        sim.find_simulator()


def test_simulation_passes_and_catches_one_flipped_bit(image64, tiny_mmf_ckpt, tmp_path):
    need_iverilog()
    rep = verify_image(image64, tiny_mmf_ckpt, rows=64)
    assert rep["passed"] and all(r["mismatches"] == 0 and r["simulated_rows"] > 0 for r in rep["tensors"])
    assert len(rep["tensors"]) == 13  # 2 layers x 6 BitLinears + lm_head

    bad = tmp_path / "bad"
    shutil.copytree(image64, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    x = next(t for t in manifest["tensors"] if t["name"] == "model.layers.1.mlp.down_proj.weight")
    act = random_activations(x["columns"], 0, x["name"])
    k = int(torch.nonzero(act).flatten()[-1])  # a column whose activation is non-zero, in the last word
    row = x["rows"] - 1  # the last row: its bank is not the tensor's first
    e, bw = manifest["word_bits"] // 2, manifest["bank_words"]
    rpb = x["rows_per_bank"]
    addr = x["base_address"] + (row // rpb) * bw + (row % rpb) * x["words_per_row"] + k // e
    path = bad / "ternary" / f"bank{addr // bw:05d}.mem"
    lines = path.read_text().splitlines()
    word = int(lines[1 + addr % bw], 16) ^ (1 << (2 * (k % e)))  # line 0 is the comment
    lines[1 + addr % bw] = f"{word:016x}"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(MMFError, match="sha256 differs"):
        verify_image(bad, tiny_mmf_ckpt, rows=64)
    rep = verify_image(bad, tiny_mmf_ckpt, rows=64, checksums=False)
    assert not rep["passed"]
    failed = [r for r in rep["tensors"] if r["status"] == "FAIL"]
    assert [r["tensor"] for r in failed] == [x["name"]]
    assert failed[0]["mismatches"] == 1 and failed[0]["first_mismatch"]["row"] == row


def test_cli_verify_end_to_end(tiny_mmf_ckpt, tmp_path):
    need_iverilog()
    out = tmp_path / "img"
    r = run_cli("fpga-image", tiny_mmf_ckpt, "--out", out, "--word-bits", "128", "--bank-words", "32",
                "--layers", "0", "--verify", "--verify-rows", "0", "--json-out", tmp_path / "rep.json")
    assert r.returncode == 0, r.stderr
    assert "verified: " in r.stdout and "BRAM36" in r.stdout
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["verify"]["passed"] and len(rep["verify"]["tensors"]) == 6
    assert all(t["simulated_rows"] == t["rows"] for t in rep["verify"]["tensors"])  # --verify-rows 0: all rows
    import hashlib

    sums = [line.split("  ", 1) for line in (out / "SHA256SUMS").read_text().splitlines()]
    assert {name for _, name in sums} >= {"manifest.json", "ternary.bin", "mmf_image.vh"}
    for digest, name in sums:  # the `sha256sum -c SHA256SUMS` format
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def test_verilog_header_compiles(image64, tmp_path):
    need_iverilog()
    top = tmp_path / "top.v"
    top.write_text('module top;\n`include "mmf_image.vh"\ninitial begin\n'
                   '  if (MMF_WORD_BITS != 64 || MMF_BANK_WORDS != 64) $display("BAD");\n'
                   '  else $display("OK %0d", MMF_LM_HEAD_ROWS);\nend\nendmodule\n')
    subprocess.run(["iverilog", "-g2001", "-I", str(image64), "-o", str(tmp_path / "t.vvp"), str(top)], check=True)
    out = subprocess.run(["vvp", "-n", str(tmp_path / "t.vvp")], capture_output=True, text=True, check=True).stdout
    assert "OK 259" in out


def test_docs_verilog_example_compiles_against_an_image(image64, tmp_path):
    """The instantiation example of docs/fpga.md elaborates with the generated header and the RTL."""
    need_iverilog()
    from pathlib import Path

    from mmf.fpga.sim import RTL_FILES, rtl_dir

    doc = (Path(__file__).resolve().parents[1] / "docs" / "fpga.md").read_text()
    example = re.search(r"```verilog\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "example.v").write_text(example)
    files = [str(tmp_path / "example.v")] + [str(rtl_dir() / f) for f in RTL_FILES if not f.startswith("tb_")]
    r = subprocess.run(["iverilog", "-g2001", "-I", str(image64), "-s", "l0_i_proj_bank0", "-o",
                        str(tmp_path / "ex.vvp"), *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------ issue 16




@pytest.mark.parametrize("args, message", [
    (("--verify-rows", "-1"), "--verify-rows -1: give the number of rows to simulate per tensor (1 or more), or 0"),
    (("--seed", "-1"), "--seed -1: give a seed from 0 to 4294967295"),
    (("--on-chip-mib", "nan"), "--on-chip-mib nan: give the on-chip memory budget in MiB"),
    (("--on-chip-mib", "-1"), "--on-chip-mib -1.0"),
    (("--bank-words", "0"), "--bank-words 0: a bank needs at least one word"),
    (("--word-bits", "8"), "--word-bits 8"),
    (("--dtype", "fp8"), "--dtype 'fp8': use one of"),
    (("--bank-words", str(2**40)), "no space left on device for"),  # the image would not fit: refused before writing
])
def test_out_of_range_options_are_refused(monkeypatch, capsys, tiny_mmf_ckpt, tmp_path, args, message):
    code, _, err = main_in_process(capsys, "fpga-image", tiny_mmf_ckpt, "--out", tmp_path / "img", *args)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_dtype_json_and_json_out(monkeypatch, capsys, tiny_mmf_ckpt, tmp_path):
    rep = tmp_path / "reports" / "rep.json"
    code, stdout, err = main_in_process(capsys, "fpga-image", tiny_mmf_ckpt, "--out", tmp_path / "img",
                              "--param-encoding", "bf16", "--formats", "bin", "--json", "--json-out", rep)
    assert code == 0, err
    printed = json.loads(stdout)  # --json: the document alone on stdout, no table
    assert printed == json.loads(rep.read_text()) and printed["verify"] is None
    assert {r["region"] for r in printed["resources"]["regions"]} == {"ternary", "params"}
    def encoding(img):
        tensors = json.loads((img / "manifest.json").read_text())["tensors"]
        return next(t["encoding"] for t in tensors if t["name"] == "model.norm.weight")

    assert encoding(tmp_path / "img") == "bf16"  # --param-encoding: the old spelling of --dtype
    code, stdout, err = main_in_process(capsys, "fpga-image", tiny_mmf_ckpt, "--out", tmp_path / "img2",
                              "--dtype", "fp32", "--formats", "bin")
    assert code == 0, err
    assert "BRAM36" in stdout and encoding(tmp_path / "img2") == "fp32"
    code, _, err = main_in_process(capsys, "fpga-image", tiny_mmf_ckpt, "--out", tmp_path / "img3",
                         "--json-out", tmp_path)  # a directory: refused before any work
    assert code == 2 and "--json-out" in err and "is a directory" in err and not (tmp_path / "img3").exists()
    code, stdout, _ = main_in_process(capsys, "fpga-image", "--help")
    text = " ".join(stdout.replace("│", " ").split())
    assert "--param-encoding: old spelling" in text and "was --json FILE before" in text


def test_force_replaces_only_an_image(monkeypatch, capsys, tiny_mmf_ckpt, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    code, _, err = main_in_process(capsys, "fpga-image", tiny_mmf_ckpt, "--out", notes, "--force")
    assert code == 2 and "is a file, not a directory that mmf wrote" in err and notes.read_text() == "x\n"
    theirs = tmp_path / "vivado"
    theirs.mkdir()
    (theirs / "top.xpr").write_text("project")
    code, _, err = main_in_process(capsys, "fpga-image", tiny_mmf_ckpt, "--out", theirs, "--force")
    assert code == 2 and "mmf did not write" in err and (theirs / "top.xpr").exists()
    out = tmp_path / "img"
    build_image(tiny_mmf_ckpt, out, ImageOptions(formats=("bin",)))
    build_image(tiny_mmf_ckpt, out, ImageOptions(formats=("bin",), word_bits=128), overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["word_bits"] == 128


def test_full_disk_is_one_line(monkeypatch, capsys, tiny_mmf_ckpt, tmp_path):
    import errno

    from mmf.fpga import image

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image, "sha256_file", full)
    code, _, err = main_in_process(capsys, "fpga-image", tiny_mmf_ckpt, "--out", tmp_path / "img")
    assert code == 2 and "no space left on device writing" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_image_follows_the_umask(tiny_mmf_ckpt, tmp_path, mask):
    import stat

    old = os.umask(mask)
    try:
        build_image(tiny_mmf_ckpt, tmp_path / "img", ImageOptions(word_bits=64, bank_words=256))
    finally:
        os.umask(old)
    seen = set()
    for root, dirs, files in os.walk(tmp_path / "img"):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o777 & ~mask
        seen.update(stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) for f in files)
    assert seen == {0o666 & ~mask}
