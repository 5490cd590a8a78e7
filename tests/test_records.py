"""Reproduction records: validation, the card, and the embedded machine-readable copy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from interpbook import records
from interpbook.records import Record, record, records_in_html


def make(**overrides):
    args = dict(name="IOI logit difference", ours=4.91234, paper=3.56, units="nats",
                verdict="reproduces", note="SmolLM2 instead of GPT-2", paper_ref="wang2023ioi")
    args.update(overrides)
    return Record(**args)


def test_card_html_embeds_the_record():
    rec = make()
    html = rec._repr_html_()
    assert "Reproduction: IOI logit difference" in html
    assert "4.91 nats" in html and "3.56 nats" in html and "verdict-reproduces" in html
    assert records_in_html("<p>before</p>" + html + html) == [rec, rec]


def test_text_form():
    text = str(make())
    assert text.splitlines() == [
        "Reproduction: IOI logit difference",
        "  paper:   3.56 nats",
        "  ours:    4.91 nats",
        "  verdict: reproduces",
        "  note:    SmolLM2 instead of GPT-2",
    ]


def test_markup_in_values_cannot_break_the_card():
    rec = make(note="</script><b>x</b> & more", name="a <b> name")
    html = rec._repr_html_()
    assert "</script><b>" not in html.split('class="interpbook-record">', 2)[-1].split("</script>")[0]
    assert records_in_html(html) == [rec]


def test_strings_and_numpy_scalars():
    rec = make(ours=np.float32(0.5), paper="30/30")
    assert rec.ours == 0.5 and type(rec.ours) is float and rec.paper == "30/30"
    assert make(ours=np.int64(7)).ours == 7


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"verdict": "yes"}, ValueError, "'reproduces', 'partially', 'not at this scale'"),
        ({"ours": True}, TypeError, "bool"),
        ({"ours": math.nan}, ValueError, "not finite"),
        ({"paper": [1, 2]}, TypeError, "number .* or a string"),
        ({"ours": np.array([1.0, 2.0])}, TypeError, "reduce it to one value"),
        ({"ours": " "}, ValueError, "empty string"),
        ({"name": ""}, ValueError, "name must be a non-empty string"),
        ({"units": 3}, TypeError, "units must be a string"),
    ],
)
def test_invalid_records_say_what_is_wrong(overrides, error, message):
    with pytest.raises(error, match=message):
        make(**overrides)


def test_from_dict_rejects_unknown_fields():
    data = make().to_dict() | {"extra": 1}
    with pytest.raises(ValueError, match="unknown record fields"):
        Record.from_dict(data)


def test_record_displays_the_card(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    assert record("x", ours=1.0, paper=2.0, verdict="partially") is None
    assert shown == [Record("x", 1.0, 2.0, verdict="partially")]


def test_record_requires_keyword_verdict():
    with pytest.raises(TypeError):
        record("x", 1.0, 2.0)  # verdict is required


def test_format_value():
    assert records.format_value(0.5123456) == "0.512"
    assert records.format_value(12.3456) == "12.3"
    assert records.format_value(-0.000123456) == "-0.000123"
    assert records.format_value(1234.5) == "1,234" and records.format_value(150.0) == "150"
    assert records.format_value(2.0) == "2"
    assert records.format_value(30) == "30"
    assert records.format_value("30/30") == "30/30"
