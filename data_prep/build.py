"""Inputs -> ordered tasks -> process pool (decode, resize, encode) -> shards -> manifest.

Results come back from `Pool.imap` in task order, so shard contents are the same for any
number of workers. After each shard is committed a line goes to a journal; a re-run
verifies the journal's shards and continues after the last good one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.fileio import atomic_write_bytes, atomic_write_json, name_disk_full
from pipeline.core.progress import Progress

from . import images, shards, sources, synthetic

JOURNAL_NAME = ".data_prep_journal.jsonl"
SPLITS = ("train", "val")


class PrepError(Exception):
    """A user error found before any work starts: printed as one line, exit code 2."""


@dataclass
class Options:
    out: Path
    size: int = 256
    image_format: str = "png"
    quality: int = 95
    seed: int = 0
    val_fraction: float = 0.01
    shard_size: int = 1000
    workers: int = 1


# ---------------------------------------------------------------- tasks


def split_of(name: str, seed: int, val_fraction: float) -> tuple[str, float]:
    """Split and sort position of one input, from its name alone: adding inputs moves no other."""
    u = int(hashlib.sha256(f"{seed}/{name}".encode()).hexdigest()[:16], 16) / 2.0**64
    return ("val" if u < val_fraction else "train"), u


def make_tasks(names: list[str], seed: int, val_fraction: float) -> list[tuple[str, str, str]]:
    """(split, key, name) for every input: train then val, each in hash order (a free shuffle)."""
    keyed = []
    for i, name in enumerate(names):
        split, u = split_of(name, seed, val_fraction)
        keyed.append((SPLITS.index(split), u, name, f"{i:08d}"))
    keyed.sort()
    return [(SPLITS[s], key, name) for s, _, name, key in keyed]


# ---------------------------------------------------------------- work done in the pool

_worker_cfg: dict = {}


def _init_worker(cfg: dict) -> None:
    _worker_cfg.clear()
    _worker_cfg.update(cfg)


def _process(task):
    """One task -> (split, key, name, encoded bytes | None, original size, skip reason)."""
    split, key, name = task
    cfg = _worker_cfg
    if cfg["kind"] == "synthetic":
        face = synthetic.draw_face(cfg["seed"], int(name.rsplit("/", 1)[1]), cfg["size"], cfg.get("grayscale", False))
        return split, key, name, images.encode(face, cfg["format"], cfg["quality"]), face.size, None
    try:
        data = sources.read_bytes(cfg["kind"], Path(cfg["root"]), name)
    except Exception as e:  # permission denied, bad zip member CRC, vanished file
        return split, key, name, None, None, f"unreadable: {type(e).__name__}: {e}"
    encoded, orig_size, reason = images.prepare_image(data, cfg["size"], cfg["format"], cfg["quality"])
    return split, key, name, encoded, orig_size, reason


# ---------------------------------------------------------------- journal (resume)


def _load_journal(out: Path, config: dict) -> list[dict]:
    """Committed entries whose shards are still whole; raises PrepError on a foreign journal."""
    path = out / JOURNAL_NAME
    lines = path.read_text().splitlines() if path.exists() else []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the line being written when the run was killed
    if not entries:
        return []
    if entries[0].get("config") != config:
        raise PrepError(
            f"{out} holds a partial run with different settings "
            f"({_config_diff(entries[0].get('config', {}), config)}); use a new --out or remove it"
        )
    good = []
    for entry in entries[1:]:
        if entry["shard"] and shards.check_shard(out, entry["shard"]) is not None:
            break
        good.append(entry)
    return good


def _config_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "unknown"


def _append_journal(out: Path, entry: dict) -> None:
    """A torn last line (killed, disk full) is ignored by _load_journal; its shard is redone."""
    try:
        with open(out / JOURNAL_NAME, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise name_disk_full(e, out / JOURNAL_NAME) from None


def _start_journal(out: Path, config: dict, entries: list[dict]) -> None:
    """Rewrite the journal with its header and the entries that survived verification."""
    lines = [json.dumps({"config": config}, sort_keys=True)] + [json.dumps(e, sort_keys=True) for e in entries]
    atomic_write_bytes(out / JOURNAL_NAME, ("\n".join(lines) + "\n").encode())


# ---------------------------------------------------------------- the run


def build(opts: Options, source: dict, names: list[str], worker_cfg: dict) -> dict:
    """Write all shards and the manifest for `names`; returns the manifest."""
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    shards.remove_stale_tmp(out)
    config = {
        "format_version": shards.FORMAT_VERSION,
        "resolution": opts.size,
        "image_format": opts.image_format,
        "quality": opts.quality,
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "shard_size": opts.shard_size,
        "source": source,
    }
    done = _check_existing(out, config)
    if done is not None:
        return done
    entries = _load_journal(out, config)
    _start_journal(out, config, entries)

    tasks = make_tasks(names, opts.seed, opts.val_fraction)
    start = entries[-1]["next_task"] if entries else 0
    progress = Progress(
        len(tasks), lambda p: f"data_prep: {p.done}/{p.total} images, {p.rate:.0f} images/s", unit="img", initial=start
    )
    _run_tasks(opts, tasks, start, entries, worker_cfg, progress)
    elapsed = progress.close()

    manifest = _manifest(config, entries)
    atomic_write_json(out / shards.MANIFEST_NAME, manifest)
    (out / JOURNAL_NAME).unlink()
    t = manifest["totals"]
    print(
        f"data_prep: wrote {manifest['splits']['train']['num_samples']} train + "
        f"{manifest['splits']['val']['num_samples']} val images in {t['num_shards']} shards "
        f"({t['bytes'] / 1e6:.1f} MB), skipped {t['num_skipped']}, {elapsed:.1f} s "
        f"({(len(tasks) - start) / max(elapsed, 1e-9):.0f} images/s) -> {out / shards.MANIFEST_NAME}",
        file=sys.stderr,
    )
    return manifest


def _check_existing(out: Path, config: dict) -> dict | None:
    """The existing manifest if it is complete for this config; PrepError if it is someone else's."""
    path = out / shards.MANIFEST_NAME
    if not path.exists():
        if any(out.glob("*.tar")) and not (out / JOURNAL_NAME).exists():
            raise PrepError(f"{out} holds .tar files but no manifest or journal; refusing to overwrite them")
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrepError(f"{path}: unreadable manifest ({e}); remove it to rebuild") from e
    if manifest.get("config") != config:
        raise PrepError(
            f"{out} already holds shards made with different settings "
            f"({_config_diff(manifest.get('config', {}), config)}); use a new --out or remove it"
        )
    problems = [p for s in manifest["splits"].values() for i in s["shards"] if (p := shards.check_shard(out, i))]
    if not problems:
        print(f"data_prep: {path} is complete and verified; nothing to do", file=sys.stderr)
        return manifest
    print(f"data_prep: {problems[0]}; rebuilding", file=sys.stderr)
    path.unlink()
    return None


def _run_tasks(opts, tasks, start, entries, worker_cfg, progress) -> None:
    """Feed tasks[start:] through the pool and commit shards in order, journaling each."""
    counts = {s: sum(1 for e in entries if e["split"] == s and e["shard"]) for s in SPLITS}
    todo = tasks[start:]
    if opts.workers > 1 and len(todo) > 1:
        pool = multiprocessing.get_context("spawn").Pool(opts.workers, _init_worker, (worker_cfg,))
        results = pool.imap(_process, todo, chunksize=max(1, min(16, len(todo) // (8 * opts.workers))))
    else:
        pool = None
        _init_worker(worker_cfg)
        results = map(_process, todo)

    writer, pending_skips, split_now = None, [], None
    try:
        for i, (split, key, name, encoded, orig_size, reason) in enumerate(results, start):
            if split != split_now:  # the last partial shard of a split is committed before the next split
                if split_now is not None:
                    _commit(opts.out, entries, writer, split_now, pending_skips, i)
                writer, pending_skips, split_now = None, [], split
            if encoded is None:
                pending_skips.append({"file": name, "reason": reason})
            else:
                if writer is None:
                    writer = shards.ShardWriter(opts.out, shards.shard_name(split, counts[split]))
                meta = {"source": name, "orig_size": list(orig_size), "split": split}
                writer.add(key, {opts.image_format: encoded, "json": json.dumps(meta, sort_keys=True).encode()})
                if writer.num_samples == opts.shard_size:
                    _commit(opts.out, entries, writer, split, pending_skips, i + 1)
                    counts[split] += 1
                    writer, pending_skips = None, []
            progress.update()
        if split_now is not None:
            _commit(opts.out, entries, writer, split_now, pending_skips, len(tasks))
    except BaseException as e:
        if writer is not None:
            writer.abort()
            raise name_disk_full(e, writer.path) from None
        raise
    finally:
        if pool is not None:
            pool.terminate()


def _commit(out, entries, writer, split, skipped, next_task) -> None:
    """Close the open shard (if any) and journal it with the inputs skipped since the last one."""
    if writer is None and not skipped:
        return
    info = shards.shard_info_dict(writer.close()) if writer is not None else None
    entry = {"split": split, "shard": info, "skipped": skipped, "next_task": next_task}
    _append_journal(out, entry)
    entries.append(entry)


def _manifest(config: dict, entries: list[dict]) -> dict:
    splits = {}
    for s in SPLITS:
        shard_list = [e["shard"] for e in entries if e["split"] == s and e["shard"]]
        splits[s] = {"shards": shard_list, "num_samples": sum(x["num_samples"] for x in shard_list)}
    skipped = [k for e in entries for k in e["skipped"]]
    all_shards = [x for s in splits.values() for x in s["shards"]]
    return {
        "format_version": shards.FORMAT_VERSION,
        "resolution": config["resolution"],
        "channels": 3,
        "image_format": config["image_format"],
        "source": config["source"],
        "seed": config["seed"],
        "splits": splits,
        "totals": {
            "num_samples": sum(s["num_samples"] for s in splits.values()),
            "num_shards": len(all_shards),
            "bytes": sum(x["bytes"] for x in all_shards),
            "num_skipped": len(skipped),
        },
        "skipped": sorted(skipped, key=lambda k: k["file"]),
        "config": config,
    }
