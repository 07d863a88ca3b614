"""The kernel choice table (runtime/choice.py): each layer takes the kernel measured fastest at each bucket of rows,
measured once per (format, shape, rows) and read back from the cache file afterwards. The timing itself needs a GPU;
here a stand-in clock gives each candidate a known time, so the test checks the choosing and the caching."""

import json

import torch

from ptqlab.runtime import choice


class FakeLayer(torch.nn.Module):
    """Two candidates whose speed order flips at 16 rows."""

    def __init__(self, n=256, k=512):
        super().__init__()
        self.n, self.k = n, k
        self.kernel_by_rows = None

    def choice_key(self):
        return "int4", self.n, self.k, 128

    def candidates(self, rows):
        return {"small": lambda x: ("small", rows), "big": lambda x: ("big", rows)}

    def example_input(self, rows):
        return rows


def test_bucket_rounds_rows_up():
    assert [choice.bucket(r) for r in (1, 2, 3, 5, 16, 17, 64, 65, 5000)] == [1, 2, 4, 8, 16, 32, 64, 2048, 2048]


def test_fastest_kernel_per_bucket_measured_once_then_cached(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setattr(choice, "table_path", lambda device: path)
    timed = []

    def clock(fn, rows):
        timed.append(rows)
        name, _ = fn(None)
        return rows * (1.0 if name == "small" else 0.1) + (0.0 if name == "small" else 2.0)

    monkeypatch.setattr(choice, "_time_us", clock)
    model = torch.nn.Sequential(FakeLayer(), FakeLayer(), FakeLayer(n=512))
    model.register_buffer("anchor", torch.zeros(1))
    monkeypatch.setattr(choice, "_device_of", lambda model: torch.device("cpu"))
    used = choice.choose_kernels(model)
    # small: rows; big: 2 + rows / 10 -> small up to 2 rows (2 < 2.2), big from 4 (4 > 2.4)
    expected = {1: "small", 2: "small", 4: "big", 8: "big", 16: "big", 32: "big", 64: "big", 2048: "big"}
    assert model[0].kernel_by_rows == expected and model[1].kernel_by_rows == expected
    assert len(timed) == 2 * 2 * len(choice.ROW_BUCKETS)  # two shapes, two candidates, each bucket: once
    assert len(used) == 2 * len(choice.ROW_BUCKETS)
    saved = json.loads(path.read_text())
    assert saved["int4 n=256 k=512 group=128 rows=8"]["kernel"] == "big"
    timed.clear()
    again = torch.nn.Sequential(FakeLayer())
    again.register_buffer("anchor", torch.zeros(1))
    choice.choose_kernels(again)
    assert timed == [] and again[0].kernel_by_rows == expected  # read from the cache, nothing measured


def test_a_cached_kernel_the_layer_no_longer_offers_is_measured_again(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({f"int4 n=256 k=512 group=128 rows={r}": {"kernel": "gone", "us": {}}
                                for r in choice.ROW_BUCKETS}))
    monkeypatch.setattr(choice, "table_path", lambda device: path)
    monkeypatch.setattr(choice, "_time_us", lambda fn, rows: 1.0 if fn(None)[0] == "big" else 2.0)
    monkeypatch.setattr(choice, "_device_of", lambda model: torch.device("cpu"))
    model = torch.nn.Sequential(FakeLayer())
    choice.choose_kernels(model)
    assert set(model[0].kernel_by_rows.values()) == {"big"}
