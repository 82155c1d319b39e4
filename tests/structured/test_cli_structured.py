"""``frugallm generate --json-schema FILE`` / ``--grammar FILE``: constrained output, streamed or as ``--json``;
a file that is missing, unreadable or rejected by the library is one ``error:`` line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frugallm.cli import main

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
                                                                              "maximum": 5}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return str(tiny_models.hf("llama"))


def run(model: str, *extra: str) -> list[str]:
    return ["generate", "give me json", "--model", model, "--dtype", "float32", "-n", "40", *extra]


def test_json_schema_file(model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(SCHEMA))
    assert main(run(model, "--json-schema", str(f), "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert out["finish_reason"] == "stop"
    assert main(run(model, "--json-schema", str(f))) == 0  # streamed: the same text
    assert capsys.readouterr().out.strip() == out["text"]


def test_grammar_file(model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "yes_no.lark"
    f.write_text('start: "yes" | "no"\n')
    assert main(run(model, "--grammar", str(f), "--json")) == 0
    assert json.loads(capsys.readouterr().out)["text"] in ("yes", "no")


@pytest.mark.parametrize(("flag", "content", "needle"), [
    ("--json-schema", None, "cannot read"),
    ("--json-schema", "{not json", "not valid JSON"),
    ("--json-schema", "[1, 2]", "must be an object"),
    ("--json-schema", '{"type": "nonsense"}', "nonsense"),
    ("--grammar", "start: undefined_rule", "undefined_rule"),
    ("--grammar", b"\xff\xfe", "cannot read"),
])
def test_bad_files_name_themselves(model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                                   content: str | bytes | None, needle: str) -> None:
    f = tmp_path / "constraint"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    assert main(run(model, flag, str(f))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {f}") and needle in err and "Traceback" not in err


def test_flags_are_exclusive(model: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(run(model, "--json-schema", "a.json", "--grammar", "b.lark"))
