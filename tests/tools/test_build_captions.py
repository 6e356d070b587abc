"""tools/build_captions.py and library.data.danbooru_captions: Kohaku-order captions from Danbooru metadata."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import build_captions  # noqa: E402
from library.data import danbooru_captions as dc  # noqa: E402
from library.data.captions import partition_tags  # noqa: E402
from library.data.spec import CaptionOptions  # noqa: E402

MIKU = {"id": 1020, "tag_string_general": "1girl ^_^ long_hair smile solo", "tag_string_character": "hatsune_miku",
        "tag_string_copyright": "vocaloid", "tag_string_artist": "ask_(askzy)",
        "tag_string_meta": "commentary_request highres", "rating": "g", "fav_count": 20,
        "created_at": "2021-03-04T05:06:07.000-05:00"}


def _posts() -> list[dict]:
    """20 general posts with fav_count 1..20 and 20 explicit ones with 100..119 (ids 1001.. / 2001..)."""
    posts = [{"id": 1000 + i, "tag_string_general": "1boy solo", "rating": "g", "fav_count": i,
              "created_at": "2015-01-01T00:00:00Z"} for i in range(1, 20)]
    posts.append(MIKU)
    posts += [{"id": 2000 + i, "tag_string_general": "2girls multiple_girls kiss", "tag_string_artist": "some_artist",
               "rating": "e", "fav_count": 99 + i, "created_at": 1230000000} for i in range(1, 21)]  # 2008
    posts.append({"id": 3000, "tag_string_general": "1girl", "tag_string_meta": "lowres", "rating": "s",
                  "fav_count": 5, "created_at": "2019-06-01"})
    return posts


def _images(folder: Path, ids: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")


def _caption(folder: Path, post_id: int) -> str:
    return (folder / f"{post_id}.txt").read_text(encoding="utf-8").strip()


def test_captions_quality_within_rating_dates_underscores_and_exclusions(tmp_path, capsys):
    meta = tmp_path / "posts.json"
    meta.write_text(json.dumps(_posts()))
    images = tmp_path / "img"
    _images(images, [1001, 1002, 1003, 1006, 1011, 1016, 1018, 1020, 2001, 2020, 3000])
    assert build_captions.main(["--metadata", str(meta), "--image_dir", str(images)]) == 0
    assert _caption(images, 1020) == ("1girl, hatsune miku, vocaloid, ask (askzy), ^_^, long hair, smile, solo, "
                                      "masterpiece, newest, commentary request, highres, safe")
    # general 1..20: thresholds 19.05, 17.15, 15.25, 10.5, 5.75, 2.9 (linear percentiles)
    quality = {i: _caption(images, i).split(", ")[-3] for i in (1001, 1002, 1003, 1006, 1011, 1016, 1018)}
    assert quality == {1001: "worst quality", 1002: "worst quality", 1003: "low quality", 1006: "normal quality",
                       1011: "good quality", 1016: "great quality", 1018: "best quality"}
    # explicit posts are ranked among explicit posts: 100 favourites is the worst there, 119 the best
    assert _caption(images, 2001) == "2girls, multiple girls, some artist, kiss, worst quality, old, nsfw, explicit"
    assert _caption(images, 2020).startswith("2girls, multiple girls, some artist, kiss, masterpiece, old,")
    assert _caption(images, 1001) == "1boy, solo, worst quality, mid, safe"
    assert not (images / "3000.txt").exists()  # lowres is on the exclusion list: the post is skipped
    out = capsys.readouterr().out
    assert "41 posts: wrote 10 captions" in out and "skipped (excluded tag) 1" in out and "skipped (no image) 30" in out
    assert "general: 19.05, 17.15, 15.25, 10.5, 5.75, 2.9" in out and "newest 1" in out

    assert build_captions.main(["--metadata", str(meta), "--image_dir", str(images), "--exclude_action", "drop"]) == 0
    # only the tag is dropped; the lone sensitive post is at (not above) every threshold of its rating
    assert _caption(images, 3000) == "1girl, worst quality, recent, sensitive"


def test_separator_and_escapes_feed_the_trainers_caption_split(tmp_path):
    meta = tmp_path / "posts.jsonl"
    meta.write_text("\n".join(json.dumps(p) for p in _posts()) + "\n")
    images = tmp_path / "img"
    _images(images, [1020])
    out = tmp_path / "captions"
    argv = ["--metadata", str(meta), "--image_dir", str(images), "--output_dir", str(out), "--escape_parentheses",
            "--keep_tokens_separator", "|||", "--year_tag", "--caption_extension", ".caption"]
    assert build_captions.main(argv) == 0
    text = (out / "1020.caption").read_text().strip()
    assert text == (r"1girl, hatsune miku, vocaloid, ask \(askzy\) ||| ^_^, long hair, smile, solo ||| "
                    "masterpiece, newest, year 2021, commentary request, highres, safe")
    head, flexible, tail = partition_tags(text, CaptionOptions(keep_tokens_separator="|||"))
    assert head == ["1girl", "hatsune miku", "vocaloid", r"ask \(askzy\)"]
    assert flexible == ["^_^", "long hair", "smile", "solo"]
    assert tail[0] == "masterpiece" and tail[-1] == "safe"
    assert not list(images.glob("*.caption")) and not list(images.glob("*.txt"))


def test_csv_metadata_gives_the_same_captions(tmp_path, capsys):
    posts = _posts()
    meta = tmp_path / "posts.csv"
    with open(meta, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for p in posts for k in p}))
        writer.writeheader()
        writer.writerows(posts)
    images = tmp_path / "img"
    _images(images, [1020, 2001])
    argv = ["--metadata", str(meta), "--image_dir", str(images), "--exclude_tags", ""]
    assert build_captions.main([*argv, "--dry_run"]) == 0
    assert "would write 2 captions" in capsys.readouterr().out and not list(images.glob("*.txt"))
    assert build_captions.main(argv) == 0
    assert _caption(images, 1020).endswith("masterpiece, newest, commentary request, highres, safe")
    assert "worst quality, old" in _caption(images, 2001)


@pytest.mark.parametrize("year, tag", [(2005, "old"), (2010, "old"), (2011, "early"), (2014, "early"),
                                       (2015, "mid"), (2017, "mid"), (2018, "recent"), (2020, "recent"),
                                       (2021, "newest"), (2024, "newest")])
def test_date_tags(year, tag):
    assert dc.date_tag(year) == tag


def test_tag_rules_and_ratings():
    assert dc.normalize_tag("o_o") == "o_o" and dc.normalize_tag(">_<") == ">_<"
    assert dc.normalize_tag("long_hair") == "long hair" and dc.normalize_tag("star_(symbol)") == "star (symbol)"
    assert dc.normalize_tag("photo_(medium)", escape_parentheses=True) == r"photo \(medium\)"
    assert [dc.rating_name(r) for r in ("g", "s", "q", "e", "Explicit", "x", None)] == [
        "general", "sensitive", "questionable", "explicit", "explicit", None, None]
    assert dc.rating_tags("explicit") == ("nsfw", "explicit") and dc.rating_tags("questionable") == ("nsfw",)
    assert dc.upload_year("2011-05-01 10:00:00") == 2011 and dc.upload_year(1609459200) == 2021
    assert dc.is_people_tag("6+girls") and dc.is_people_tag("1other") and not dc.is_people_tag("girl")
    with pytest.raises(ValueError, match="decrease"):
        dc.check_percentiles([10, 25, 50, 75, 85, 95])


def test_bad_input_is_one_line(tmp_path, capsys):
    meta = tmp_path / "posts.xml"
    meta.write_text("<posts/>")
    assert build_captions.main(["--metadata", str(meta), "--image_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown file type" in err[0]
    bad = tmp_path / "posts.json"
    bad.write_text('[{"id": 1}')
    assert build_captions.main(["--metadata", str(bad), "--image_dir", str(tmp_path)]) == 2
    assert "invalid JSON" in capsys.readouterr().err
