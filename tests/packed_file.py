"""One packed safetensors file from tensors in memory: the worked example of docs/formats.md section 9.

``mmf pack`` writes whole checkpoint directories; the spec's example is a single file, so the tests
write it here with the same pieces: ``mmf.packed_format``'s metadata and per-tensor writer, the
quantiser of ``mmf pack`` and the streaming safetensors writer.
"""

from __future__ import annotations

from pathlib import Path

from mmf.converters.packing import KEEP_DTYPES
from mmf.converters.ternary_quantization import quantize_pack
from mmf.packed_format import file_metadata, packed_tensor_plan, reserved_metadata, write_packed_tensor
from mmf.safetensors_io import ST_NAMES, SafetensorsWriter


def write_packed_file(path, tensors: dict, fmt: str = "i2", keep_dtype: str = "fp32") -> dict:
    """Write one packed safetensors file: every 2-D tensor whose name ends in ``.weight`` is packed
    (``<name>`` U8 + ``<name>_scale`` F32 + metadata entry), every other tensor kept in ``keep_dtype``.

    Same fields, order and code path as ``pack_checkpoint`` writes per shard. Returns the metadata.
    """
    keep = KEEP_DTYPES[keep_dtype]
    packed_names = [name for name, t in tensors.items() if t.dim() == 2 and name.endswith(".weight")]
    plan = []
    for name, t in tensors.items():
        plan += packed_tensor_plan(name, fmt, t.shape) if name in packed_names else [(name, keep, tuple(t.shape))]
    meta = file_metadata(fmt, ST_NAMES[keep])
    template = reserved_metadata(meta, fmt, {name: tensors[name].shape for name in packed_names})
    writer = SafetensorsWriter(Path(path), plan, template)
    try:
        for name, t in tensors.items():
            if name in packed_names:
                packed, s_w, counts = quantize_pack(t, fmt, name)
                write_packed_tensor(writer, meta, name, fmt, t.shape, packed, s_w, counts)
            else:
                writer.write(name, t.to(keep))
        writer.close(meta)
    except BaseException:
        writer.abort()
        raise
    return meta
