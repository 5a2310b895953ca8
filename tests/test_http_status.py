"""aem.http.status: what people see on /_aem/status (formatting, order, empty sections)."""

from __future__ import annotations

import json
import re

from aem.http import status


def test_values_are_shown_one_way() -> None:
    f = status.format_value
    assert f(True) == "yes" and f(False) == "no"
    assert f(1234567) == "1,234,567" and f(0) == "0" and f(-5) == "-5"
    assert f(2.0) == "2" and f(0.123456) == "0.123" and f(12.3456) == "12.3"
    assert f(1234.5678) == "1,234.6" and f(None) == "—" and f("text") == "text"


def test_rows_in_natural_order_and_empty_sections_explained() -> None:
    data = {"pid": 1, "time": 0.0,
            "engine": {"size.512": 1, "size.64": 2, "size.4096": 3, "flag": True, "ratio": 0.333333},
            "server": {"responses": {}}, "capsules": {}}
    page = status.render_html(data).decode()
    keys = re.findall(r'data-key="([^"]+)"', page)
    assert keys == ["flag", "ratio", "size.64", "size.512", "size.4096", "responses"]
    assert 'data-key="flag">yes<' in page and 'data-key="ratio">0.333<' in page
    assert 'data-key="responses">none yet<' in page
    for section in ("capsules", "vmtable"):   # empty, and absent
        assert f'<section id="{section}"><h2>{section}</h2><p class="empty">' in page
    assert "True" not in page


def test_json_is_asked_for_by_query_or_accept() -> None:
    assert status.wants_json(None, "format=json")
    assert status.wants_json("text/html", "a=1&format=json")
    assert not status.wants_json("application/json", "format=html")
    assert status.wants_json("application/json", "")
    assert not status.wants_json("text/html,application/json;q=0.9", "")
    assert not status.wants_json(None, "")
    data = status.collect({"requests": 3})
    assert json.loads(status.render_json(data))["server"] == {"requests": 3}


def test_who_sees_the_page() -> None:
    import pytest

    from aem.http import HTTPServer
    from aem.http.server import _is_loopback

    assert _is_loopback(("127.0.0.1", 5)) and _is_loopback(("::1", 5, 0, 0))
    assert _is_loopback(("127.8.9.10", 1)) and _is_loopback("")     # a Unix socket peer
    assert not _is_loopback(("10.1.2.3", 5)) and not _is_loopback(("2001:db8::1", 5, 0, 0))
    assert not _is_loopback(("not an address", 1))
    with pytest.raises(ValueError):
        HTTPServer(status_page="everyone", port=0)
