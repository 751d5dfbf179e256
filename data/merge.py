"""Merge per-slice builds into one shard folder.

    python -m data.merge OUT_DIR PART_DIR [PART_DIR ...]

Each PART_DIR is a finished ``python -m data.build --num-slices N --slice-index I`` build. All N
slices must be given once, with the same settings and tokenizer. Shards are moved (renamed) into
OUT_DIR and renumbered ``train-000000.tar ...`` in slice order, then one manifest is written last. A part's
manifest is removed before its shards are moved, so an interrupted merge leaves nothing that looks
complete; rebuild the affected part then.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from data import shards
from common import files
from common.errors import DataError, run_main

_PER_SLICE = ("slice_index",)


def _sum_stats(parts: list[dict]) -> dict:
    out: dict = {}
    for st in parts:
        for k, v in st.items():
            if k == "input":  # the whole input is read by every slice: identical, take one
                out.setdefault(k, v)
            elif isinstance(v, dict):
                d = out.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            else:
                out[k] = out.get(k, 0) + v
    return out


def merge(out: str, parts: list[str]) -> dict:
    """Move the shards of all slice builds in ``parts`` into ``out``; return the merged manifest."""
    if not parts:
        raise DataError("merge: no part folders given")
    ms = [(shards.read_manifest(p), p) for p in parts]
    ms.sort(key=lambda mp: mp[0]["settings"].get("slice_index", 0))
    first, first_dir = ms[0]
    n = first["settings"].get("num_slices", 1)
    idx = [m["settings"].get("slice_index", 0) for m, _ in ms]
    if sorted(idx) != list(range(n)):
        raise DataError(f"merge: parts hold slices {sorted(idx)} but the build has {n} slices "
                        f"(0..{n - 1} each exactly once)")

    def norm(s: dict) -> dict:
        return {k: v for k, v in s.items() if k not in _PER_SLICE}

    for m, p in ms[1:]:
        if m["tokenizer"] != first["tokenizer"]:
            raise DataError(f"merge: {p} was built with tokenizer {m['tokenizer']['fingerprint']}, "
                            f"{first_dir} with {first['tokenizer']['fingerprint']}")
        if norm(m["settings"]) != norm(first["settings"]):
            diff = sorted(k for k in set(m["settings"]) | set(first["settings"])
                          if k not in _PER_SLICE and m["settings"].get(k) != first["settings"].get(k))
            raise DataError(f"merge: {p} differs from {first_dir} in settings: {', '.join(diff)}")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, shards.MANIFEST)):
        raise DataError(f"{os.path.join(out, shards.MANIFEST)}: output folder already holds a build")
    for m, p in ms:  # check every shard exists before touching anything
        for s in shards.SPLITS:
            for sh in m["splits"][s]["shards"]:
                if not os.path.isfile(os.path.join(p, sh["name"])):
                    raise DataError(f"{os.path.join(p, sh['name'])}: shard listed in the manifest is missing")

    splits: dict = {s: {"shards": [], "samples": 0, "tokens": 0} for s in shards.SPLITS}
    tok_dir = os.path.join(out, "tokenizer")
    if os.path.isdir(os.path.join(first_dir, "tokenizer")) and not os.path.isdir(tok_dir):
        shutil.copytree(os.path.join(first_dir, "tokenizer"), tok_dir)
    for m, p in ms:
        os.remove(os.path.join(p, shards.MANIFEST))  # the part is no longer complete from here
        for s in shards.SPLITS:
            for sh in m["splits"][s]["shards"]:
                name = shards.shard_name(s, len(splits[s]["shards"]))
                src, dst = os.path.join(p, sh["name"]), os.path.join(out, name)
                if os.path.abspath(src) != os.path.abspath(dst):
                    shutil.move(src, dst)
                splits[s]["shards"].append({"name": name, "samples": sh["samples"], "tokens": sh["tokens"]})
                splits[s]["samples"] += sh["samples"]
                splits[s]["tokens"] += sh["tokens"]
    settings = norm(first["settings"])
    settings["num_slices"] = n
    settings["merged_slices"] = n
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "tokenizer": first["tokenizer"],
        "settings": settings,
        "splits": splits,
        "stats": _sum_stats([m["stats"] for m, _ in ms]),
    }
    path = os.path.join(out, shards.MANIFEST)
    shards.validate_manifest(manifest, path)
    files.write_json(path, manifest)
    return manifest


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="merged output folder")
    p.add_argument("parts", nargs="+", help="per-slice build folders")
    a = p.parse_args(argv)
    m = merge(a.out, a.parts)
    print(f"merged {len(a.parts)} slices into {a.out}: train {m['splits']['train']['samples']} "
          f"examples in {len(m['splits']['train']['shards'])} shards, valid "
          f"{m['splits']['valid']['samples']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
