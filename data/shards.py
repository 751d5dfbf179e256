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
import stat
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

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
    arrays, unpadded), ``next_sentence_label`` (int, 1 = random next) and ``__key__``. ValueError naming the key
    when the member name is not UTF-8 (tar hands such a name over with surrogate escapes) or the record is corrupt.
    """
    key = raw.get("__key__", "<no key>")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"sample {key!r}: member name is not UTF-8") from None
    data = raw.get(SAMPLE_EXT)
    if data is None:
        data = raw.get("." + SAMPLE_EXT)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        fields = sorted(k for k in raw if not k.startswith("__"))
        raise ValueError(f"sample {key!r}: no {SAMPLE_EXT!r} field (fields: {fields})")
    return decode_record(key, bytes(data) if not isinstance(data, bytes) else data)


# The largest record the format can hold: 65535 tokens of uint32 ids, 65535 predictions of uint16 positions
# and uint32 ids (8 + 262,140 + 393,210 = 655,358 bytes). Readers without a manifest bound members by this.
MAX_RECORD_BYTES = _HDR.size + 0xFFFF * 4 + 0xFFFF * (2 + 4)


@dataclass(frozen=True)
class RecordLimits:
    """What a shard folder's manifest allows a record to hold (``sample_limits``)."""

    max_seq_len: int
    max_predictions: int
    vocab_size: int
    cls_id: int
    sep_id: int

    @property
    def max_record_bytes(self) -> int:
        """The largest record these limits allow (seq 128, 20 predictions, vocab 30522: 8 + 256 + 60 = 324
        bytes); a tar member beyond it cannot be one of ours."""
        ids, pos = _ID_DTYPES[id_dtype_code(self.vocab_size)], _POS_DTYPES[pos_dtype_code(self.max_seq_len)]
        return _HDR.size + self.max_seq_len * ids.itemsize + self.max_predictions * (pos.itemsize + ids.itemsize)


def check_sample(d: dict, limits: RecordLimits) -> None:
    """Raise ValueError (naming the field) when a decoded sample breaks the manifest's limits or the layout every
    model input relies on: bytes that decode into a record header can still be garbage, and an id past the
    vocabulary or a position past the sequence crashes the embedding or the loss of every later resume."""
    ids, seg, pos, labels = d["input_ids"], d["segment_ids"], d["masked_lm_positions"], d["masked_lm_ids"]
    n, npred = len(ids), len(pos)
    if not 3 <= n <= limits.max_seq_len:
        raise ValueError(f"input_ids: {n} tokens, outside [3, max_seq_len {limits.max_seq_len}]")
    if ids.min() < 0 or ids.max() >= limits.vocab_size:
        raise ValueError(f"input_ids: token id outside [0, {limits.vocab_size})")
    if len(seg) != n or not np.isin(seg, (0, 1)).all() or seg[0] != 0 or seg[-1] != 1 or (np.diff(seg) < 0).any():
        raise ValueError("segment_ids: not 0 for [CLS] A [SEP] and 1 for B [SEP]")
    sep = int(np.count_nonzero(seg == 0)) - 1  # the first [SEP] closes segment 0
    if ids[0] != limits.cls_id or ids[sep] != limits.sep_id or ids[-1] != limits.sep_id:
        raise ValueError(f"input_ids: not [CLS] A [SEP] B [SEP] (ids {int(ids[0])}, {int(ids[sep])} at the segment "
                         f"boundary {sep}, {int(ids[-1])}; [CLS]={limits.cls_id}, [SEP]={limits.sep_id})")
    if d["next_sentence_label"] not in (0, 1):
        raise ValueError(f"next_sentence_label {d['next_sentence_label']!r} is not 0 or 1")
    if npred > limits.max_predictions or len(labels) != npred:
        raise ValueError(f"masked_lm_positions: {npred} predictions with {len(labels)} labels, max_predictions "
                         f"{limits.max_predictions}")
    if npred and (pos[0] < 1 or pos[-1] >= n - 1 or (np.diff(pos) <= 0).any() or sep in pos):
        raise ValueError(f"masked_lm_positions: not strictly increasing positions of A and B tokens "
                         f"(1 <= p < {n - 1}, p != {sep})")
    if npred and (labels.min() < 0 or labels.max() >= limits.vocab_size):
        raise ValueError(f"masked_lm_ids: label outside [0, {limits.vocab_size})")


def read_sample(raw: dict, limits: RecordLimits) -> dict:
    """The one check of a sample, for training and ``data.inspect --verify`` alike: ``decode_sample`` then
    ``check_sample``; ValueError ``sample 'KEY': what is wrong`` when it is to be skipped as corrupt."""
    d = decode_sample(raw)
    try:
        check_sample(d, limits)
    except ValueError as e:
        raise ValueError(f"sample {d['__key__']!r}: {e}") from None
    return d


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


class ShardDamage(ValueError):
    """A shard that is not a plain, uncompressed tar of bounded members; its message says why."""


def _reason(e: BaseException) -> str:
    msg = str(e.args[0]).split(" @ ")[0] if e.args else str(e)  # webdataset appends ' @ <file object>'
    if isinstance(e, ShardDamage):
        return msg
    if isinstance(e, FileNotFoundError):
        return "missing: no such file"
    if isinstance(e, OSError):
        return f"unreadable ({e.strerror or e})"
    return f"{type(e).__name__}: {msg}"


# Leading bytes of the compressions Python's tarfile opens on its own (gzip, bzip2, xz and lzma-alone as
# tarfile._StreamProxy sniffs them; zstd, which tarfile reads from Python 3.14 on): a compressed member of a
# 1.8 MB file inflated to 400 MiB in one read, so a compressed shard is refused before tar sees it.
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"),
               (b"\x28\xb5\x2f\xfd", "zstd"))
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _open_shard(path: str):
    """The shard opened for binary reading, once it is known to be a regular, uncompressed file inside its
    folder; ShardDamage saying what it is otherwise. A FIFO, device or socket is never opened (opening a FIFO
    for reading waits for a writer forever); a symlink may point inside the folder only."""
    folder, real = os.path.realpath(os.path.dirname(path) or "."), os.path.realpath(path)
    if os.path.commonpath((folder, real)) != folder:
        raise ShardDamage(f"a symlink to {real}, outside the shard folder")
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise ShardDamage(f"{kind}, not a tar file")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)  # replaced by a FIFO since the stat: still no wait
    f = os.fdopen(fd, "rb")
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        f.close()
        raise ShardDamage("replaced while it was opened")
    head = f.read(8)
    f.seek(0)
    comp = next((what for magic, what in _COMPRESSED if head.startswith(magic)), None)
    if comp is not None:
        f.close()
        raise ShardDamage(f"{comp}-compressed: shards are plain tar files (decompress it, or rebuild)")
    return f


# Bytes tar may pull from the file for one member beyond the record itself: its 512-byte header (a few more for
# a PAX or GNU long-name header), the padding to 512 bytes, and tarfile's read-ahead of one 10 KiB record.
MEMBER_SLACK = 64 << 10


class _ReadBudget:
    """The shard file as tar reads it, giving at most ``limit`` bytes between two members handed over (tar holds
    a whole member in memory; one larger than any record ends the shard there, as damage)."""

    def __init__(self, f, member_bound: int):
        self.f, self.bound, self.limit, self.used = f, member_bound, member_bound + MEMBER_SLACK, 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(self.limit - self.used + 1 if size < 0 else size)
        self.used += len(data)
        if self.used > self.limit:
            raise ShardDamage(f"a member larger than the largest record ({self.bound} bytes) at byte "
                              f"{self.f.tell() - self.used}")
        return data

    def member_done(self) -> None:
        self.used = 0


def iter_samples(path: str, scan: ShardScan | None = None, member_bound: int = MAX_RECORD_BYTES) -> Iterator[dict]:
    """Raw WebDataset samples (``__key__`` + bytes per lower-cased extension) of one shard in stored order,
    read with webdataset's tar member iteration and its key rule (``base_plus_ext``) from a file opened here:
    a missing, unreadable, non-regular, compressed, truncated or corrupt archive, or a member larger than
    ``member_bound`` bytes, ends the iteration after the samples whose members were read whole; ``scan`` records
    the count and the reason (tar itself ends silently at a header overwritten mid-archive: compare
    ``scan.samples`` with the manifest). Memory: one member, at most ``member_bound`` + MEMBER_SLACK bytes."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    scan = scan if scan is not None else ShardScan(path)
    current = None
    try:
        with _open_shard(path) as f:
            budget = _ReadBudget(f, member_bound)
            # webdataset opens the stream with tarfile's "r|*"; _open_shard refused every compression that
            # mode would inflate, so tar reads the plain file, member by member
            for member in tar_file_iterator(budget):
                budget.member_done()
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


def verify_shard(path: str, entry: dict, limits: RecordLimits) -> dict:
    """One pass over a shard against its manifest entry (``samples``, ``tokens``) with the checks training applies
    (``iter_samples`` bounded by ``limits``, ``read_sample`` on each of the manifest's samples): {"samples",
    "corrupt", "corrupt_keys", "tokens", "problems"}, problems empty for a sound shard. Training skips exactly
    the corrupt samples and, of a damaged shard, those from ``samples`` on."""
    scan = ShardScan(path)
    tokens, corrupt = 0, []
    for k, raw in enumerate(iter_samples(path, scan, limits.max_record_bytes)):
        if k >= entry["samples"]:
            continue  # more samples than the manifest says: never used, the count below reports it
        try:
            tokens += len(read_sample(raw, limits)["input_ids"])
        except ValueError as e:
            corrupt.append((raw["__key__"], str(e)))
    problem = scan.describe(entry["samples"])
    problems = [problem] if problem else []
    if corrupt:
        more = f" (and {len(corrupt) - 1} more)" if len(corrupt) > 1 else ""
        problems.append(f"{len(corrupt)} record(s) do not decode: {corrupt[0][1]}{more}")
    if not problems and tokens != entry["tokens"]:
        problems.append(f"{tokens} tokens, manifest says {entry['tokens']}")
    return {"samples": scan.samples, "corrupt": len(corrupt), "corrupt_keys": [k for k, _ in corrupt],
            "tokens": tokens, "problems": problems}


def sample_limits(manifest: dict) -> RecordLimits:
    """The ``check_sample`` limits of a (validated) shard folder's manifest."""
    st, tok = manifest["settings"], manifest["tokenizer"]
    return RecordLimits(max_seq_len=st["max_seq_len"], max_predictions=st["max_predictions"],
                        vocab_size=tok["vocab_size"], cls_id=tok["cls_id"], sep_id=tok["sep_id"])


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


def _count(x, low: int = 0) -> bool:
    """An integer (not a bool, not a float) of at least ``low``."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def plain_shard_name(name) -> bool:
    """A shard name names a file directly inside the shard folder: no absolute path, no folder part, no '..'."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and os.path.basename(name) == name)


def validate_manifest(m: dict, where: str) -> dict:
    """``m`` unchanged when it is a complete manifest the readers can trust: plain, unique shard names, counts that
    are non-negative integers adding up, limits the record format holds; else DataError naming ``where`` and
    the field."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise DataError(f"{where}: incomplete or invalid manifest: {what}")

    need(isinstance(m, dict), "not a JSON object")
    need(m.get("format_version") == FORMAT_VERSION,
         f"format_version {m.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    tok = m.get("tokenizer")
    need(isinstance(tok, dict) and all(k in tok for k in _TOKENIZER_KEYS),
         f"tokenizer needs {', '.join(_TOKENIZER_KEYS)}")
    need(_count(tok["vocab_size"], 1) and tok["vocab_size"] <= 1 << 32,
         f"tokenizer.vocab_size {tok['vocab_size']!r} is not an integer in [1, 2**32]")
    for k in _TOKENIZER_KEYS[2:]:
        need(_count(tok[k]) and tok[k] < tok["vocab_size"],
             f"tokenizer.{k} {tok[k]!r} is not an id in [0, vocab_size {tok['vocab_size']})")
    st = m.get("settings")
    need(isinstance(st, dict) and all(k in st for k in _SETTINGS_KEYS),
         f"settings need {', '.join(_SETTINGS_KEYS)}")
    need(_count(st["max_seq_len"], 3) and st["max_seq_len"] <= 0xFFFF,
         f"settings.max_seq_len {st['max_seq_len']!r} is not an integer in [3, 65535]")
    need(_count(st["max_predictions"]) and st["max_predictions"] <= 0xFFFF,
         f"settings.max_predictions {st['max_predictions']!r} is not an integer in [0, 65535]")
    sp = m.get("splits")
    need(isinstance(sp, dict) and all(s in sp for s in SPLITS), "splits need train and valid")
    seen: dict[str, str] = {}
    for s in SPLITS:
        d = sp[s]
        need(isinstance(d, dict) and isinstance(d.get("shards"), list), f"splits.{s}.shards missing")
        for i, sh in enumerate(d["shards"]):
            at = f"splits.{s}.shards[{i}]"
            need(isinstance(sh, dict) and {"name", "samples", "tokens"} <= set(sh), f"{at} needs name, samples, tokens")
            need(plain_shard_name(sh["name"]), f"{at}.name {sh['name']!r} is not a plain file name inside the "
                                               f"shard folder (no absolute path, folder or '..')")
            need(sh["name"] not in seen, f"{at}.name {sh['name']!r} is listed twice (also at {seen.get(sh['name'])})")
            seen[sh["name"]] = at
            for k in ("samples", "tokens"):
                need(_count(sh[k]), f"{at}.{k} {sh[k]!r} is not a non-negative integer")
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
