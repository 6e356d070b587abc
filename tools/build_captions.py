"""Write Kohaku-style `<image>.txt` captions from Danbooru metadata (JSON, JSONL or CSV).

    python tools/build_captions.py --metadata posts.jsonl --image_dir train/images --keep_tokens_separator "|||"

Order: <1girl/1boy/...>, <character>, <series>, <artists>, <general tags>, <quality>, <date>, <meta>, <rating>.
Quality tags come from fav_count percentiles within each rating, computed over every post of the metadata
(excluded posts left out); the rules are in library/data/danbooru_captions.py. A post's image is the file
in --image_dir whose name (without extension) is the post's file name, id or md5.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser
    from library.data import danbooru_captions as dc

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metadata", type=Path, nargs="+", required=True, help="post metadata: .json, .jsonl or .csv")
    p.add_argument("--image_dir", type=Path, required=True, help="folder of the images (searched recursively)")
    p.add_argument("--output_dir", type=Path, help="write captions here instead of beside the images")
    p.add_argument("--caption_extension", default=".txt")
    p.add_argument("--quality_percentiles", default=",".join(f"{v:g}" for v in dc.DELTA_PERCENTILES),
                   help="six decreasing percentiles separating the seven quality tags (default: Kohaku XL Δ; "
                        "Kohaku XL ε used 90,75,60,45,30,10)")
    p.add_argument("--quality_by", choices=("fav_count", "score"), default="fav_count")
    p.add_argument("--escape_parentheses", action="store_true", help=r"write ask \(askzy\) for ask_(askzy)")
    p.add_argument("--keep_tokens_separator", help='e.g. "|||": put it before and after the general tags')
    p.add_argument("--exclude_tags", default=",".join(dc.EXCLUDE_TAGS),
                   help="comma-separated tags whose posts are skipped (default: the SD3.5-M anime card's list; "
                        "'' for none)")
    p.add_argument("--exclude_action", choices=("skip", "drop"), default="skip",
                   help="skip posts with an excluded tag, or only drop the tag")
    p.add_argument("--year_tag", action="store_true", help="also write 'year 2021' after the date tag")
    p.add_argument("--dry_run", action="store_true", help="print the first captions and the summary, write nothing")
    p.add_argument("--top", type=int, default=10, help="tags listed per section in the summary")
    return p


def read_posts(paths: list[Path]) -> list:
    from library.data.danbooru_captions import parse_post, records_from_text
    from library.errors import UserError

    posts = []
    for path in paths:
        kind = KINDS.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"--metadata {path}: unknown file type; use .json, .jsonl or .csv")
        if not path.is_file():
            raise UserError(f"--metadata {path} not found")
        try:
            records = records_from_text(path.read_text(encoding="utf-8-sig"), kind)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"--metadata {path}: {exc}") from None
        posts.extend(parse_post(record) for record in records)
    return posts


def image_index(folder: Path) -> dict[str, Path]:
    from library.data.sources import IMAGE_EXTENSIONS
    from library.errors import UserError

    if not folder.is_dir():
        raise UserError(f"--image_dir {folder} is not a folder")
    index: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            index.setdefault(path.stem, path)
            index.setdefault(path.name, path)
    return index


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(ns: argparse.Namespace) -> None:
    from collections import Counter

    from tqdm.auto import tqdm

    from library.data import danbooru_captions as dc
    from library.errors import UserError

    try:
        percentiles = dc.check_percentiles([float(v) for v in ns.quality_percentiles.split(",")])
    except ValueError as exc:
        raise UserError(f"--quality_percentiles: {exc}") from None
    excluded = frozenset(dc.tag_key(t) for t in ns.exclude_tags.split(",") if t.strip())
    settings = dc.CaptionSettings(escape_parentheses=ns.escape_parentheses, keep_separator=ns.keep_tokens_separator,
                                  exclude_tags=excluded, exclude_action=ns.exclude_action, year_tag=ns.year_tag)
    posts, index = read_posts(ns.metadata), image_index(ns.image_dir)
    skip = settings.exclude_action == "skip"
    kept = [p for p in posts if not (skip and dc.excluded_tags(p, settings))]
    thresholds = dc.quality_thresholds(kept, percentiles, ns.quality_by)
    stats: Counter = Counter()
    written = []
    for post in tqdm(posts, desc="captions", unit="post", disable=ns.dry_run):
        if skip and dc.excluded_tags(post, settings):
            stats["skipped (excluded tag)"] += 1
            continue
        image = next((index[n] for n in post.names if n in index), None)
        if image is None:
            stats["skipped (no image)"] += 1
            continue
        if post.rating is None:
            stats["without rating"] += 1
        sections = dc.caption_sections(post, dc.post_quality(post, thresholds, ns.quality_by), settings)
        caption = dc.join_caption(sections, settings.keep_separator)
        written.append(sections)
        target = (ns.output_dir / image.relative_to(ns.image_dir)).parent if ns.output_dir else image.parent
        if ns.dry_run:
            if len(written) <= 5:
                print(f"{image.name}: {caption}")
        else:
            write_atomic(target / (image.stem + ns.caption_extension), caption + "\n")
    action = "would write" if ns.dry_run else "wrote"
    print(f"{len(posts)} posts: {action} {len(written)} captions; " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print("\n".join(dc.summary_lines(dc.tag_counts(written), thresholds, ns.top)))


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
