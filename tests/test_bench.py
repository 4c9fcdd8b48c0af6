"""``python -m custom bench --quick``: the harness runs end to end on tiny sizes and writes every table."""

import re

import pytest

from monai.bundle import ConfigParser

from custom.bench import BEGIN, END, CONFIGS, bench, plain_optimizer, with_tables

SECTIONS = {
    "## Machine": ["item", "value"],
    "## (a, b) Training throughput": ["configuration", "slices per step", "bundle slices/s", "plain slices/s", "ratio",
                                      "data wait", "epochs peak MiB"],
    "### Data-loading settings": ["train#dataloader", "bundle slices/s", "ratio to plain", "data wait"],
    "## (c) Inference per volume": ["runner", "warm s/volume", "peak MiB", "cold start s"],
    "## (d) Scaling": ["cases", "cache fill s", "cache MiB", "train epoch s", "train epoch peak MiB", "inference s",
                       "inference peak MiB"],
    "## (e) FLOPs": ["what", "slice", "GFLOP/slice", "achieved GFLOP/s", "of peak"],
    "## (f) Distributed": ["processes", "threads per process", "slices/s", "data wait (rank 0)"],
}
NUMBER = re.compile(r"^\d+(\.\d+)?( %)?$")


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Each section heading's first Markdown table, as rows of cells (header first, separator dropped)."""
    tables, heading = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line
        elif line.startswith("|") and not line.startswith("|---"):
            tables.setdefault(heading, []).append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


@pytest.mark.integration
def test_quick_bench_writes_every_table(tmp_path, monkeypatch):
    """Run as docs/performance.md says, ``python -m custom bench --quick`` from the repository root: the quick run
    writes ``runs/bench_quick.md`` and leaves the measured tables of ``docs/performance.md`` alone (it replaced
    them with its toy sizes' numbers, under the prose that interprets the measured ones)."""
    monkeypatch.chdir(tmp_path)
    measured = tmp_path / "docs" / "performance.md"
    measured.parent.mkdir()
    measured.write_text(f"# Performance\n{BEGIN}\nthe measured tables\n{END}\nwhat they say\n")
    out = tmp_path / bench(quick=True)
    assert out == tmp_path / "runs" / "bench_quick.md"
    assert measured.read_text() == f"# Performance\n{BEGIN}\nthe measured tables\n{END}\nwhat they say\n"
    text = out.read_text()
    assert BEGIN in text and END in text
    assert "python -m custom bench --quick --out runs/bench_quick.md" in text
    tables = _tables(text)
    for prefix, header in SECTIONS.items():
        (heading,) = [h for h in tables if h.startswith(prefix)]
        assert tables[heading][0] == header, heading
        assert len(tables[heading]) > 1, f"{heading} has no rows"
    training = tables[next(h for h in tables if h.startswith("## (a, b)"))][1:]
    assert [row[0].split(" (")[0] for row in training] == ["full slices", "demo patches"]
    assert all(NUMBER.match(cell) for row in training for cell in row[1:]), training
    runners = [row[0] for row in tables[next(h for h in tables if h.startswith("## (c)"))][1:]]
    assert runners == ["inference.json (monai.bundle)", "TorchScript (custom.deploy)", "ONNX Runtime (OnnxNetwork)"]
    processes = [row[0] for row in tables[next(h for h in tables if h.startswith("## (f)"))][1:]]
    assert processes == ["1", "2"]


def test_rerun_replaces_only_the_generated_block(tmp_path):
    out = tmp_path / "performance.md"
    out.write_text(f"# Title\nprose before\n{BEGIN}\nold tables\n{END}\nprose after\n")
    expected = f"# Title\nprose before\n{BEGIN}\nnew tables\n{END}\nprose after\n"
    assert with_tables(out, f"{BEGIN}\nnew tables\n{END}") == expected


def test_refuses_to_overwrite_a_file_without_the_block(tmp_path):
    out = tmp_path / "notes.md"
    out.write_text("someone's notes\n")
    with pytest.raises(ValueError, match="no .* block to replace"):
        with_tables(out, f"{BEGIN}\nnew\n{END}")


def test_plain_loop_optimizer_follows_train_json():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["optimizer#weight_decay"] = 0.25  # any change to train.json's settings must reach the plain loop
    parser["learning_rate"] = 0.003
    expected = parser.get_parsed_content("optimizer")
    optimizer = plain_optimizer(parser, parser.get_parsed_content("network_def", instantiate=True))
    assert type(optimizer) is type(expected) and optimizer.defaults == expected.defaults
    assert optimizer.defaults["weight_decay"] == 0.25 and optimizer.defaults["lr"] == 0.003
