"""Shard format: WebDataset tar shards of prebuilt examples, a manifest, and the reading API.

One tar member per example, named ``<key>.bin`` (WebDataset groups by key, so a raw sample is
``{"__key__": key, "bin": bytes}``). The member is one compact binary record, little-endian::

    header  struct "<BBHHH": version, flags, n_tokens, sep_index, n_pred
            flags bit 0     next_sentence_label (1 = random next, Google's convention)
            flags bits 1-2  id dtype      (0 uint8, 1 uint16, 2 uint32)
            flags bit 3     position dtype (0 uint8, 1 uint16)
    input_ids            n_tokens x id dtype   ([CLS] A [SEP] B [SEP], masking applied, no padding)
    masked_lm_positions  n_pred   x pos dtype  (ascending)
    masked_lm_ids        n_pred   x id dtype   (original ids at those positions)

``segment_ids`` are not stored: they are 0 up to and including the first [SEP] (``sep_index``) and 1
after it, which is exactly Google's layout. Tar headers are deterministic (mtime 0, uid/gid 0, mode
0644, no user names) so identical examples give byte-identical shards.
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
from collections.abc import Iterator

import numpy as np

from data.errors import DataError

FORMAT_VERSION = 1
SAMPLE_EXT = "bin"
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")

_HDR = struct.Struct("<BBHHH")
_ID_DTYPES = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"))
_POS_DTYPES = (np.dtype("<u1"), np.dtype("<u2"))


def id_dtype_code(vocab_size: int) -> int:
    return 0 if vocab_size <= 1 << 8 else 1 if vocab_size <= 1 << 16 else 2


def pos_dtype_code(max_seq_len: int) -> int:
    if max_seq_len > 1 << 16:
        raise ValueError("max_seq_len above 65536 is not supported by the record format")
    return 0 if max_seq_len <= 1 << 8 else 1


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def encode_record(ids: np.ndarray, sep_index: int, positions: np.ndarray, masked_ids: np.ndarray,
                  nsp: int, id_code: int, pos_code: int) -> bytes:
    flags = (nsp & 1) | (id_code << 1) | (pos_code << 3)
    return b"".join((
        _HDR.pack(FORMAT_VERSION, flags, len(ids), sep_index, len(positions)),
        np.asarray(ids, _ID_DTYPES[id_code]).tobytes(),
        np.asarray(positions, _POS_DTYPES[pos_code]).tobytes(),
        np.asarray(masked_ids, _ID_DTYPES[id_code]).tobytes(),
    ))


def _header_template() -> bytearray:
    h = bytearray(512)
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"00000000000\0"  # mtime 0
    h[148:156] = b"        "  # checksum placeholder
    h[156] = ord("0")  # regular file
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    return h


_TEMPLATE = bytes(_header_template())
_TEMPLATE_SUM = sum(_TEMPLATE)  # name and size fields are zero in the template
TAR_EOF = b"\0" * 1024


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data padded to 512 bytes), fully deterministic."""
    nb = name.encode("ascii")
    if len(nb) > 99:
        raise ValueError(f"tar member name too long: {name}")
    size = b"%011o\0" % len(data)
    chk = b"%06o\0 " % (_TEMPLATE_SUM + sum(nb) + sum(size))
    pad = (-len(data)) % 512
    return b"".join((nb, _TEMPLATE[len(nb):124], size, _TEMPLATE[136:148], chk, _TEMPLATE[156:],
                     data, b"\0" * pad))


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def decode_record(key: str, data: bytes) -> dict:
    """One record -> dict of numpy arrays (see module docstring). ValueError naming the key if corrupt."""
    try:
        version, flags, n, sep, npred = _HDR.unpack_from(data, 0)
    except struct.error:
        raise ValueError(f"sample {key!r}: record too short ({len(data)} bytes)") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"sample {key!r}: record format version {version}, expected {FORMAT_VERSION}")
    idc, posc = (flags >> 1) & 3, (flags >> 3) & 1
    if idc > 2 or flags >> 4:
        raise ValueError(f"sample {key!r}: bad flags {flags:#x}")
    idt, pdt = _ID_DTYPES[idc], _POS_DTYPES[posc]
    o1 = _HDR.size + n * idt.itemsize
    o2 = o1 + npred * pdt.itemsize
    end = o2 + npred * idt.itemsize
    if end != len(data):
        raise ValueError(f"sample {key!r}: record length {len(data)} != {end} from its header")
    if not 0 < sep < n - 1:
        raise ValueError(f"sample {key!r}: [SEP] index {sep} out of range for {n} tokens")
    input_ids = np.frombuffer(data, idt, n, _HDR.size).astype(np.int32)
    positions = np.frombuffer(data, pdt, npred, o1).astype(np.int32)
    if npred and positions[-1] >= n:
        raise ValueError(f"sample {key!r}: masked position {int(positions[-1])} >= length {n}")
    segment_ids = np.zeros(n, np.int32)
    segment_ids[sep + 1:] = 1
    return {
        "__key__": key,
        "input_ids": input_ids,
        "segment_ids": segment_ids,
        "masked_lm_positions": positions,
        "masked_lm_ids": np.frombuffer(data, idt, npred, o2).astype(np.int32),
        "next_sentence_label": flags & 1,
    }


def decode_sample(raw: dict) -> dict:
    """A raw WebDataset sample (``__key__`` + bytes fields, no decoders) -> dict of numpy arrays.

    Output: ``input_ids``, ``segment_ids``, ``masked_lm_positions``, ``masked_lm_ids`` (int32
    arrays, unpadded), ``next_sentence_label`` (int, 1 = random next) and ``__key__``.
    """
    key = raw.get("__key__", "<no key>")
    data = raw.get(SAMPLE_EXT)
    if data is None:
        data = raw.get("." + SAMPLE_EXT)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        fields = sorted(k for k in raw if not k.startswith("__"))
        raise ValueError(f"sample {key!r}: no {SAMPLE_EXT!r} field (fields: {fields})")
    return decode_record(key, bytes(data) if not isinstance(data, bytes) else data)


def iter_tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of regular files, fast path for our own ustar shards."""
    with open(path, "rb") as f:
        buf = f.read()
    mv = memoryview(buf)
    off, n = 0, len(buf)
    while off + 512 <= n:
        h = buf[off:off + 512]
        if h[0] == 0:  # end-of-archive block
            return
        if h[257:262] != b"ustar" or h[156] not in (0x30, 0):  # not ours: let tarfile do it
            yield from _iter_tar_generic(path, skip=off)
            return
        try:
            size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ValueError(f"{path}: corrupt tar header at byte {off}") from None
        name = h[0:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8") + "/" + name
        start = off + 512
        if start + size > n:
            raise ValueError(f"{path}: truncated tar member {name!r}")
        yield name, bytes(mv[start:start + size])
        off = start + size + ((-size) % 512)


def _iter_tar_generic(path: str, skip: int = 0) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if m.isfile() and m.offset >= skip:
                f = tf.extractfile(m)
                yield m.name, f.read() if f else b""


def iter_shard(path: str) -> Iterator[dict]:
    """Decoded examples of one shard file, in stored order."""
    for name, data in iter_tar_members(path):
        base = os.path.basename(name)
        key, _, ext = base.partition(".")
        if ext != SAMPLE_EXT:
            continue
        d = os.path.dirname(name)
        yield decode_record(f"{d}/{key}" if d else key, data)


# ---------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------
_TOKENIZER_KEYS = ("fingerprint", "vocab_size", "pad_id", "cls_id", "sep_id", "mask_id")
_SETTINGS_KEYS = ("max_seq_len", "max_predictions", "masked_lm_prob", "short_seq_prob", "dupe_factor",
                  "whole_word_mask", "seed", "valid_fraction", "shard_size", "inputs")


def validate_manifest(m: dict, where: str) -> dict:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise DataError(f"{where}: incomplete or invalid manifest: {what}")

    need(isinstance(m, dict), "not a JSON object")
    need(m.get("format_version") == FORMAT_VERSION,
         f"format_version {m.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    tok = m.get("tokenizer")
    need(isinstance(tok, dict) and all(k in tok for k in _TOKENIZER_KEYS),
         f"tokenizer needs {', '.join(_TOKENIZER_KEYS)}")
    st = m.get("settings")
    need(isinstance(st, dict) and all(k in st for k in _SETTINGS_KEYS),
         f"settings need {', '.join(_SETTINGS_KEYS)}")
    sp = m.get("splits")
    need(isinstance(sp, dict) and all(s in sp for s in SPLITS), "splits need train and valid")
    for s in SPLITS:
        d = sp[s]
        need(isinstance(d, dict) and isinstance(d.get("shards"), list), f"splits.{s}.shards missing")
        for sh in d["shards"]:
            need(isinstance(sh, dict) and {"name", "samples", "tokens"} <= set(sh),
                 f"splits.{s}.shards entries need name, samples, tokens")
        need(d.get("samples") == sum(x["samples"] for x in d["shards"]), f"splits.{s}.samples mismatch")
        need(d.get("tokens") == sum(x["tokens"] for x in d["shards"]), f"splits.{s}.tokens mismatch")
    need(isinstance(m.get("stats"), dict), "stats missing")
    return m


def read_manifest(path: str) -> dict:
    """The parsed, validated manifest.json of a shard folder (``path`` = folder or the file)."""
    path = os.fspath(path)
    f = path if path.endswith(".json") else os.path.join(path, MANIFEST)
    if not os.path.exists(f):
        hint = " (the build did not finish, or this is not a shard folder)" if os.path.isdir(path) else ""
        raise DataError(f"{f}: manifest not found{hint}")
    try:
        with open(f, encoding="utf-8") as fh:
            m = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None
    return validate_manifest(m, f)


def shard_paths(path: str, split: str = "train") -> list[str]:
    """Absolute-or-relative shard file paths of a split, in manifest order."""
    m = read_manifest(path)
    if split not in m["splits"]:
        raise DataError(f"{path}: no split {split!r} (have {', '.join(m['splits'])})")
    d = os.path.dirname(path) if os.fspath(path).endswith(".json") else os.fspath(path)
    return [os.path.join(d, s["name"]) for s in m["splits"][split]["shards"]]


def iter_examples(path: str, split: str = "train") -> Iterator[dict]:
    """Decoded examples of every shard of ``split``, in manifest order."""
    for p in shard_paths(path, split):
        if not os.path.exists(p):
            raise DataError(f"{p}: shard listed in the manifest is missing")
        yield from iter_shard(p)
