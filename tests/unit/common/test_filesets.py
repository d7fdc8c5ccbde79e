"""File sets' pure parts (common/imaging/filesets.py): the pattern language, `--fileset` specs,
the metadata object as hostile input, matching, and the header's minor version."""

import string

import pytest
from hypothesis import given, settings, strategies as st

from common.imaging import filesets as fs
from common.imaging.filesets import (FileSets, FilesetError, build, from_metadata, parse_pattern,
                                     parse_spec, to_metadata)
from common.imaging.imageformat import decode_header, encode_header
from common.policy.model import MAX_FILESETS


def test_the_policy_wing_and_the_image_format_agree_on_the_bound():
    assert MAX_FILESETS == fs.MAX_SETS == 10


def test_the_editable_filesystems_are_the_writable_ones():
    from img.addon import WRITERS
    from img.filesets import CHECKERS
    assert set(CHECKERS) == set(WRITERS)


@pytest.mark.parametrize("text, partition, parts", [
    ("2:/home/*/Downloads", 2, ("home", "*", "Downloads")),
    ("0:/pagefile.sys", 0, ("pagefile.sys",)),
    ("1:/var/cache/**", 1, ("var", "cache", "**")),
    ("1:/a/**/**/b", 1, ("a", "**", "b")),          # '**/**' is '**'
    ("3:/tmp/", 3, ("tmp",)),                       # a trailing '/' is dropped
    ("12:/Program Files/Old [0-9]?", 12, ("Program Files", "Old [0-9]?")),
    ("4096:/x", 4096, ("x",)),
])
def test_patterns_parse(text, partition, parts):
    pattern = parse_pattern(text)
    assert (pattern.partition, pattern.parts) == (partition, parts)


@pytest.mark.parametrize("text, message", [
    ("/home", "must start with a partition number and ':'"),
    ("home", "must start with a partition number and ':'"),
    ("x:/home", "must start with a partition number and ':'"),
    ("-1:/home", "must start with a partition number and ':'"),
    ("٣:/home", "must start with a partition number and ':'"),          # not an ASCII digit
    ("4097:/x", "partition 4097 is above 4096"),
    ("2:home", "the path must start with '/'"),
    ("2:", "the path must start with '/'"),
    ("2:/", "an empty component"),
    ("2://etc", "an empty component"),
    ("2:/a//b", "an empty component"),
    ("2:/a/../b", "'..' components are not allowed"),
    ("2:/./b", "'.' components are not allowed"),
    ("2:/a**/b", "'**' must be a whole component"),
    ("2:/a/b**", "'**' must be a whole component"),
    ("2:/a,b", "has a comma"),
    ("2:/a\\b", "a backslash"),
    ("2:/a\nb", "a control character"),
    ("2:/a\x00b", "a control character"),
    ("2:/*", "matches everything at its depth"),
    ("2:/**", "matches everything at its depth"),
    ("2:/*/?/**", "matches everything at its depth"),
    ("2:/" + "a" * 300, "longer than 255 characters"),
])
def test_malformed_patterns_are_refused_with_the_reason(text, message):
    with pytest.raises(FilesetError) as caught:
        parse_pattern(text)
    assert message in str(caught.value) and "pattern '" in str(caught.value)
    assert "\n" not in str(caught.value).replace(text[:60], "")


@pytest.mark.parametrize("pattern, path, fold, expected", [
    ("2:/home/*/Downloads", "home/bob/Downloads", False, True),
    ("2:/home/*/Downloads", "home/bob/downloads", False, False),
    ("2:/home/*/Downloads", "home/bob/downloads", True, True),
    ("2:/home/*/Downloads", "home/Downloads", False, False),
    ("2:/home/*/Downloads", "home/a/b/Downloads", False, False),     # '*' never crosses '/'
    ("2:/home/*/Downloads", "home/bob/Downloads/x", False, False),   # the folder matches
    ("1:/**/*.tmp", "a.tmp", False, True),
    ("1:/**/*.tmp", "x/y/z/a.tmp", False, True),
    ("1:/**/*.tmp", "x/y/z/a.txt", False, False),
    ("1:/var/cache/**", "var/cache", False, False),                 # trailing '**': one or more
    ("1:/var/cache/**", "var/cache/apt", False, True),
    ("1:/var/cache/**", "var/cache/apt/x/y", False, True),
    ("1:/a/**/b", "a/b", False, True),                               # inner '**': none is fine
    ("1:/a/**/b", "a/x/y/b", False, True),
    ("1:/a/**/b", "a/x/y/c", False, False),
    ("1:/f[0-9].log", "f7.log", False, True),
    ("1:/f[0-9].log", "fx.log", False, False),
    ("1:/f?.log", "f.log", False, False),
])
def test_matching(pattern, path, fold, expected):
    assert parse_pattern(pattern).matches(tuple(path.split("/")), fold) is expected


@pytest.mark.parametrize("pattern, folder, expected", [
    ("2:/home/*/Downloads", "home", True),
    ("2:/home/*/Downloads", "home/bob", True),
    ("2:/home/*/Downloads", "etc", False),
    ("2:/home/*/Downloads", "home/bob/Downloads", False),   # it matches: nothing below to find
    ("1:/**/*.tmp", "anything/deep", True),
    ("1:/var/cache/**", "var", True),
    ("1:/var/cache/**", "var/cache", True),
    ("1:/var/cache/**", "usr", False),
])
def test_walks_go_only_where_a_match_may_be(pattern, folder, expected):
    assert parse_pattern(pattern).may_match_below(tuple(folder.split("/"))) is expected


def test_many_double_stars_match_in_linear_time():
    pattern = parse_pattern("1:/" + "/".join(["**", "a"] * 60)[:250].rstrip("/*"))
    path = tuple(["a"] * 200 + ["b"])
    assert pattern.matches(path) is False           # exponential backtracking would hang here


@pytest.mark.parametrize("spec, message", [
    ("lean", "expected NAME:PATTERN[,PATTERN...]"),
    (":2:/x", "file set name '' must be"),
    ("-x:2:/x", "file set name '-x' must be"),
    ("a/b:2:/x", "file set name 'a/b' must be"),
    ("x" * 33 + ":2:/x", "must be 1 to 32"),
    ("lean:", "file set 'lean': no patterns"),
    ("lean: , ,", "file set 'lean': no patterns"),
    ("lean:2:/x,/y", "file set 'lean': pattern '/y': must start with a partition number"),
    ("lean:" + ",".join(f"2:/f{i}" for i in range(33)), "more than 32 patterns"),
])
def test_malformed_specs_are_refused(spec, message):
    with pytest.raises(FilesetError) as caught:
        parse_spec(spec, 2)
    assert message in str(caught.value)


def test_specs_build_sets_2_and_up():
    sets = build(["lean:2:/home/*/Downloads, 2:/**/*.tmp", "tiny:1:/usr/share/doc"])
    assert [(s.number, s.name) for s in sets.sets] == [(2, "lean"), (3, "tiny")]
    assert [str(p) for p in sets.sets[0].exclude] == ["2:/home/*/Downloads", "2:/**/*.tmp"]
    assert sets.choose(1) is None and sets.choose(3).name == "tiny"
    with pytest.raises(FilesetError, match=r"file set 4: the image has no such set \(it has "
                                           r"1 \(everything\), 2 \(lean\), 3 \(tiny\)\)"):
        sets.choose(4)
    assert FileSets().describe() == ["1 (everything): excludes nothing"]


def test_build_refuses_too_many_sets_and_shared_names():
    with pytest.raises(FilesetError, match="at most 9 file sets"):
        build([f"s{i}:1:/x" for i in range(10)])
    with pytest.raises(FilesetError, match="file sets 2 and 3 are both named 'Lean'"):
        build(["lean:1:/x", "Lean:1:/y"])
    assert len(build([f"s{i}:1:/x" for i in range(9)]).sets) == 9


def test_metadata_round_trips_and_an_image_without_sets_has_set_1_only():
    sets = build(["lean:2:/home/*/Downloads", "tiny:1:/usr/share/doc"])
    assert from_metadata({"filesets": to_metadata(sets)}) == sets
    assert from_metadata({"type": "base"}) == FileSets()
    with pytest.raises(FilesetError, match="file set 2: the image has no such set"):
        from_metadata({}).choose(2)


def _meta(sets, version=1):
    return {"filesets": {"version": version, "sets": sets}}


@pytest.mark.parametrize("metadata, message", [
    ({"filesets": []}, "is not an object with a 'sets' list"),
    ({"filesets": {"version": 1}}, "is not an object with a 'sets' list"),
    (_meta([], 2), "file sets version 2 is not supported"),
    (_meta([], "1"), "file sets version '1' is not supported"),
    (_meta([{"number": 3, "name": "a", "exclude": ["1:/x"]}]), "file set 2 is missing or out"),
    (_meta(["lean"]), "file set 2 is missing or out of order"),
    (_meta([{"number": 2, "exclude": ["1:/x"]}]), "needs a name and a list of patterns"),
    (_meta([{"number": 2, "name": "a", "exclude": "1:/x"}]), "needs a name and a list"),
    (_meta([{"number": 2, "name": "a", "exclude": [7]}]), "needs a name and a list"),
    (_meta([{"number": 2, "name": "a", "exclude": ["1:/../etc"]}]), "'..' components"),
    (_meta([{"number": 2, "name": "a", "exclude": []}]), "no patterns"),
    (_meta([{"number": n, "name": f"s{n}", "exclude": ["1:/x"]} for n in range(2, 12)]),
     "more than 9 file sets"),
    (_meta([{"number": 2, "name": "a", "exclude": ["1:/x"]},
            {"number": 3, "name": "A", "exclude": ["1:/y"]}]), "both named"),
])
def test_malformed_metadata_is_refused(metadata, message):
    with pytest.raises(FilesetError) as caught:
        from_metadata(metadata)
    assert message in str(caught.value)


_SPEC_CHARS = string.ascii_letters + string.digits + ":/*?[]!,. -\\\n\x00é"


@settings(max_examples=400, deadline=None)
@given(st.text(_SPEC_CHARS, max_size=80))
def test_any_spec_parses_or_is_a_fileset_error(text):
    try:
        fileset = parse_spec(text, 2)
    except FilesetError:
        return
    # what parses is what a reader takes back from the metadata
    back = from_metadata({"filesets": to_metadata(FileSets((fileset,)))})
    assert back.sets == (fileset,)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["version", "sets", "number", "name",
                                                       "exclude"]), inner, max_size=4),
                    max_leaves=12))
def test_any_metadata_value_reads_or_is_a_fileset_error(value):
    try:
        from_metadata({"filesets": value})
    except FilesetError:
        pass


def test_the_header_minor_is_1_only_with_file_sets():
    plain = {"format": 1, "type": "base"}
    assert decode_header(encode_header(plain)).version == (1, 0)
    with_sets = dict(plain, filesets=to_metadata(build(["lean:1:/x"])))
    header = decode_header(encode_header(with_sets))
    assert header.version == (1, 1) and from_metadata(header.metadata).sets[0].name == "lean"
