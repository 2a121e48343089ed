"""Data readers execute nothing a file says: CIFAR pickles go through a restricted unpickler, VOC
XML is parsed without any DTD, COCO JSON errors name the file, and every other loader is pinned
to its safe mode (``torch.load(weights_only=True)``, no bare ``pickle.load`` / ``ET.parse``)."""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from kdlib.data.layouts.cifar import CifarUnpickler, scan_cifar10
from kdlib.data.layouts.coco2014 import scan_coco2014
from kdlib.data.layouts.voc2007 import read_xml, scan_voc2007
from tests.test_layout_cifar_voc_coco import make_cifar10, make_voc

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- crafted pickles
class _System:
    """Unpickles as ``os.system(command)`` (``posix.system`` on Linux), as the issue's crafted file did."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Exec:
    """Unpickles as ``exec(source)``, hidden inside an otherwise normal batch dict."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def _touch_command(marker: Path) -> str:
    return f"touch '{marker}'"


def _touch_source(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def test_the_crafted_payloads_are_live(tmp_path: Path) -> None:
    """A plain ``pickle.loads`` of the same payloads creates the marker: the refusals below are
    refusals of working exploits, not of harmless files."""
    for payload, marker in ((_System(_touch_command(tmp_path / "a")), tmp_path / "a"),
                            ({b"data": _Exec(_touch_source(tmp_path / "b"))}, tmp_path / "b")):
        pickle.loads(pickle.dumps(payload, protocol=2))
        assert marker.exists()


def test_crafted_batches_meta_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": _System(_touch_command(marker))}, protocol=2))
    staging = tmp_path / "staging"
    with pytest.raises(ValueError) as info:
        scan_cifar10(tmp_path, staging=staging)
    message = str(info.value)
    assert str(meta) in message
    assert f"refuses to load '{os.system.__module__}.system'" in message
    assert "not a CIFAR batch (or was crafted)" in message
    assert not marker.exists()
    assert not list(staging.rglob("*.png"))  # the meta file is read before any image is written


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_crafted_data_batch_is_refused_and_runs_nothing(tmp_path: Path, protocol: int) -> None:
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"labels": [0], b"data": _Exec(_touch_source(marker))}, protocol=protocol))
    with pytest.raises(ValueError, match=r"data_batch_1: refuses to load '(__builtin__|builtins)\.exec'"):
        scan_cifar10(tmp_path, staging=tmp_path / "staging")
    assert not marker.exists()


def test_codecs_encode_is_only_latin1(tmp_path: Path) -> None:
    """Python 3 pickles bytes at protocol 2 as ``_codecs.encode(text, "latin1")``; that global is
    allowed for exactly that call, so no other codec can be reached."""
    crafted = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        CifarUnpickler(io.BytesIO(crafted), encoding="bytes").load()
    latin1 = crafted.replace(b"X\x05\x00\x00\x00rot13", b"X\x06\x00\x00\x00latin1")
    assert CifarUnpickler(io.BytesIO(latin1), encoding="bytes").load() == b"abc"


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2's cPickle did at protocol 2 (BINSTRING, no ``_codecs``)."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def _py2_pickle(obj: dict) -> bytes:
    """``obj`` as the real CIFAR files are: Python 2 strings, numpy 1's module names."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def test_python2_numpy1_batches_load(tmp_path: Path) -> None:
    """The distributed CIFAR batches (Python 2, numpy 1) reference exactly three globals, all allowed."""
    batches = make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for name, obj in batches.items():
        (folder / name).write_bytes(_py2_pickle(obj))
    raw = _py2_pickle(batches["test_batch"])
    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    scan = scan_cifar10(tmp_path, staging=tmp_path / "staging")
    assert len(scan.images) == sum(len(b[b"labels"]) for b in batches.values())
    loaded = CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    np.testing.assert_array_equal(loaded[b"data"], batches["test_batch"][b"data"])
    assert loaded[b"labels"] == batches["test_batch"][b"labels"]


# ---------------------------------------------------------------- XML without DTDs
BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><object><name>&lol9;</name></object></annotation>
"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<annotation><object><name>&x;</name></object></annotation>
"""
EXTERNAL_DTD = """<?xml version="1.0"?>
<!DOCTYPE annotation SYSTEM "file:///etc/passwd">
<annotation/>
"""


@pytest.mark.parametrize("text", [BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD],
                         ids=["billion_laughs", "external_entity", "external_dtd"])
def test_voc_annotation_with_a_dtd_is_refused(tmp_path: Path, text: str) -> None:
    voc = make_voc(tmp_path)
    path = voc / "Annotations" / "000002.xml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        scan_voc2007(tmp_path)
    message = str(info.value)
    assert str(path) in message and "refuses a <!DOCTYPE> declaration" in message
    assert ":0:0:" not in message  # nothing of /etc/passwd (root:x:0:0:...) was read into the error


def test_undeclared_entity_is_malformed_and_predefined_ones_work(tmp_path: Path) -> None:
    path = tmp_path / "a.xml"
    path.write_text("<annotation><name>&x;</name></annotation>")
    with pytest.raises(ValueError, match=re.escape(f"{path}: malformed XML (undefined entity")):
        read_xml(path)
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n<annotation><name a="1">A &amp; B &#67;</name>'
                    "<!-- c --><?pi x?></annotation>")
    root = read_xml(path)
    assert root.tag == "annotation" and root.findtext("name") == "A & B C" and root.find("name").get("a") == "1"


# ---------------------------------------------------------------- COCO JSON
def test_coco_json_nested_past_the_recursion_limit_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "annotations" / "instances_train2014.json"
    path.parent.mkdir()
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON (RecursionError")):
        scan_coco2014(tmp_path)


# ---------------------------------------------------------------- every loader in the code base
def _sources() -> list[Path]:
    return sorted(p for top in ("kdlib", "stages", "scripts", "bench") for p in (REPO_ROOT / top).rglob("*.py"))


def test_every_torch_load_is_weights_only() -> None:
    calls = [(p, m.group(0)) for p in _sources() for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls, "the audit found no torch.load call: the pattern is stale"
    unsafe = [f"{p.relative_to(REPO_ROOT)}: {call}" for p, call in calls if "weights_only=True" not in call]
    assert not unsafe, unsafe


def test_no_unrestricted_pickle_or_xml_parser() -> None:
    """``pickle.load(s)``, ``numpy.load(allow_pickle=True)``, ``yaml.load`` / ``yaml.unsafe_load`` and
    ElementTree's DTD-expanding parsers appear nowhere (CIFAR uses CifarUnpickler, VOC read_xml)."""
    banned = re.compile(r"pickle\.loads?\(|allow_pickle\s*=\s*True|yaml\.(unsafe_)?load\(|"
                        r"\bET\.(parse|fromstring|XML|iterparse)\(|minidom|xml\.sax")
    found = [f"{p.relative_to(REPO_ROOT)}: {m.group(0)}" for p in _sources() for m in banned.finditer(p.read_text())]
    assert not found, found
