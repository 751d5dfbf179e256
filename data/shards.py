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

from common.errors import DataError

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


def check_sample(d: dict, max_seq_len: int, max_predictions: int, vocab_size: int) -> None:
    """Raise ValueError when a decoded sample breaks its manifest's limits: bytes that decode into a record
    header can still be garbage, and a token id past the vocabulary would crash the embedding."""
    n, npred, ids = len(d["input_ids"]), len(d["masked_lm_positions"]), d["input_ids"]
    if n > max_seq_len:
        raise ValueError(f"{n} tokens > max_seq_len {max_seq_len}")
    if npred and d["masked_lm_positions"].max() >= n:
        raise ValueError("masked position outside the sequence")
    if npred > max_predictions:
        raise ValueError(f"{npred} predictions > max_predictions {max_predictions}")
    if n and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token id outside [0, {vocab_size})")


class ShardScan:
    """What reading one shard found: samples read before the end or the damage, and the damage if any."""

    def __init__(self, path: str):
        self.path, self.samples, self.error = path, 0, None

    def describe(self, expected: int) -> str | None:
        """None when the shard gave its ``expected`` samples (damage after the last one loses nothing); else what
        is wrong, in words."""
        if self.samples == expected:
            return None
        why = self.error or self._silent_end()
        return f"{why}; {self.samples} samples read, manifest says {expected}"

    def _silent_end(self) -> str:
        """Why tar stopped without an error: the file lacks its end-of-archive blocks (two zero 512-byte
        blocks), or tar took a damaged header in the middle for the end."""
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1024))
            tail = f.read()
        if len(tail) < 1024 or tail.strip(b"\0"):
            return f"truncated: the archive ends at byte {size} without its end-of-archive marker"
        return "a damaged member header: tar stops reading there"


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing: no such file"
    if isinstance(e, OSError):
        return f"unreadable ({e.strerror or e})"
    msg = str(e.args[0]) if e.args else str(e)
    return f"{type(e).__name__}: {msg.split(' @ ')[0]}"  # webdataset appends ' @ <file object>'



def iter_samples(path: str, scan: ShardScan | None = None) -> Iterator[dict]:
    """Raw WebDataset samples (``__key__`` + bytes per lower-cased extension) of one shard in stored order,
    read with webdataset's tar member iteration and its key rule (``base_plus_ext``). A missing, unreadable,
    truncated or corrupt archive ends the iteration after the samples whose members were read whole; ``scan``
    records the count and the reason (tar itself ends silently at a header overwritten mid-archive: compare
    ``scan.samples`` with the manifest)."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    scan = scan if scan is not None else ShardScan(path)
    current = None
    try:
        with open(path, "rb") as f:
            for member in tar_file_iterator(f):
                key, ext = base_plus_ext(member["fname"])
                if key is None:
                    continue
                if current is not None and key != current["__key__"]:
                    scan.samples += 1
                    yield current
                    current = None
                current = current or {"__key__": key}
                current[ext.lower()] = member["data"]
    except (OSError, EOFError, tarfile.TarError, ValueError, UnicodeDecodeError) as e:
        scan.error = _reason(e)
    if current is not None:  # the last sample before the end (or the damage), its members read whole
        scan.samples += 1
        yield current


def verify_shard(path: str, entry: dict, limits: tuple[int, int, int]) -> dict:
    """One pass over a shard against its manifest entry (``samples``, ``tokens``) and the limits of
    ``check_sample``: {"samples", "corrupt", "tokens", "problems"}, problems empty for a sound shard."""
    scan = ShardScan(path)
    corrupt = tokens = 0
    for raw in iter_samples(path, scan):
        try:
            d = decode_sample(raw)
            check_sample(d, *limits)
            tokens += len(d["input_ids"])
        except ValueError:
            corrupt += 1
    problem = scan.describe(entry["samples"])
    problems = [problem] if problem else []
    if corrupt:
        problems.append(f"{corrupt} record(s) do not decode")
    if not problems and tokens != entry["tokens"]:
        problems.append(f"{tokens} tokens, manifest says {entry['tokens']}")
    return {"samples": scan.samples, "corrupt": corrupt, "tokens": tokens, "problems": problems}


def sample_limits(manifest: dict) -> tuple[int, int, int]:
    """The ``check_sample`` limits of a shard folder: (max_seq_len, max_predictions, vocab_size)."""
    st = manifest["settings"]
    return int(st["max_seq_len"]), int(st["max_predictions"]), int(manifest["tokenizer"]["vocab_size"])


def iter_shard(path: str, expected: int | None = None) -> Iterator[dict]:
    """Decoded examples of one shard file, in stored order; DataError naming the file if it is damaged."""
    scan = ShardScan(path)
    for raw in iter_samples(path, scan):
        yield decode_sample(raw)
    problem = scan.describe(scan.samples if expected is None else expected)
    if problem:
        raise DataError(f"{path}: {problem}")


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
    m = read_manifest(path)
    for p, sh in zip(shard_paths(path, split), m["splits"][split]["shards"]):
        yield from iter_shard(p, sh["samples"])
