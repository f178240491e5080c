"""python -m data_prep: images (folder or zip) or procedural faces -> verified WebDataset shards.

python -m data_prep --src data1024x1024/ --out shards/ --size 256 --workers 8
python -m data_prep --synthetic 2000 --out shards/ --size 32
python -m data_prep --synthetic 2000 --grayscale --out shards_gray/ --size 32
python -m data_prep --verify shards/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import build, images, shards, sources


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"data_prep: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--src", type=Path, help="folder (searched recursively) or .zip of images")
    what.add_argument("--synthetic", type=int, metavar="N", help="write N procedural faces instead")
    what.add_argument("--verify", type=Path, metavar="DIR", help="re-hash every shard in DIR against its manifest")
    p.add_argument("--grayscale", action="store_true", help="with --synthetic: three equal channels (R = G = B)")
    p.add_argument("--out", type=Path, help="output directory for shards and manifest.json")
    p.add_argument("--size", type=int, default=256, help="output resolution in pixels (square)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="decode processes (output is identical for any value)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of inputs held out as val")
    p.add_argument("--format", dest="image_format", choices=sorted(images.FORMATS), default="png")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality (webp 100 = lossless)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and of the synthetic faces")
    p.add_argument("--match", metavar="GLOB", help="only inputs whose relative path matches, e.g. 'CelebA-HQ-img/*'")
    args = p.parse_args(argv)

    if args.src is None and args.synthetic is None and args.verify is None:
        p.error("one of --src, --synthetic or --verify is required")
    if args.grayscale and args.synthetic is None:
        p.error("--grayscale: only with --synthetic")
    if args.verify is None and args.out is None:
        p.error("--out is required")
    checks = [
        (args.size >= 8, f"--size {args.size}: must be at least 8"),
        (args.workers >= 1, f"--workers {args.workers}: must be at least 1"),
        (args.shard_size >= 1, f"--shard-size {args.shard_size}: must be at least 1"),
        (0.0 <= args.val_fraction < 1.0, f"--val-fraction {args.val_fraction}: must be in [0, 1)"),
        (1 <= args.quality <= 100, f"--quality {args.quality}: must be in 1..100"),
        (args.synthetic is None or args.synthetic >= 1, f"--synthetic {args.synthetic}: must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


def verify_main(out: Path) -> int:
    if not (out / shards.MANIFEST_NAME).is_file():
        raise build.PrepError(f"{out / shards.MANIFEST_NAME}: no manifest to verify against")
    checked, problems = shards.verify(out)
    for problem in problems:
        print(f"data_prep: {problem}", file=sys.stderr)
    print(f"data_prep: verified {checked} shards in {out}: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.verify is not None:
            return verify_main(args.verify)
        opts = build.Options(
            out=args.out,
            size=args.size,
            image_format=args.image_format,
            quality=args.quality,
            seed=args.seed,
            val_fraction=args.val_fraction,
            shard_size=args.shard_size,
            workers=args.workers,
        )
        cfg = {"size": args.size, "format": args.image_format, "quality": args.quality, "seed": args.seed}
        if args.synthetic is not None:
            names = [f"synthetic/{i:08d}" for i in range(args.synthetic)]
            source = {"kind": "synthetic", "num_inputs": args.synthetic, "generator": "data_prep.synthetic v1"}
            cfg["kind"] = "synthetic"
            if args.grayscale:  # a key only when set: colour sets keep their manifests
                source["grayscale"] = cfg["grayscale"] = True
        else:
            src = sources.open_source(args.src, args.match)
            if not src.names:
                raise build.PrepError(
                    f"--src {args.src}: no image files found (extensions {', '.join(sorted(sources.IMAGE_EXTENSIONS))})"
                )
            names = list(src.names)
            source = {
                "kind": src.kind,
                "path": str(src.path),
                "match": args.match,
                "num_inputs": len(names),
                "fingerprint": src.fingerprint,
            }
            cfg.update(kind=src.kind, root=str(src.path))
        build.build(opts, source, names, cfg)
        return 0
    except (build.PrepError, sources.SourceError) as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied on --out: finished shards stay, the journal resumes
        where = f"{e.filename}: " if e.filename else ""
        print(f"data_prep: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("data_prep: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
