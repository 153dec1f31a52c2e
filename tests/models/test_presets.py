"""Model presets load, and the parameter counts in their headers are what param_count says."""

import re
from pathlib import Path

import pytest

from seismo import config, models

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted((CONFIGS / "models").glob("*.yaml"))
COUNT = re.compile(r"Parameters: ([\d,]+) non-embedding.*?([\d,]+) total", re.S)


def test_the_family_is_there():
    names = {p.stem for p in PRESETS}
    assert {"tiny", "gpt2_small", "proxy_256", "proxy_384", "proxy_512", "proxy_768", "proxy_1024"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_header_counts_match_param_count(path):
    text = path.read_text()
    found = COUNT.search(text)
    assert found, f"{path.name}: the header must state 'Parameters: N non-embedding, M total'"
    non_emb, total = (int(s.replace(",", "")) for s in found.groups())
    cfg = config.from_dict({"model": path.stem}).model
    got = (models.param_count(cfg, non_embedding=True), models.param_count(cfg, non_embedding=False))
    assert got == (non_emb, total), (
        f"{path.name}: header says {non_emb:,} / {total:,} but param_count gives {got[0]:,} / {got[1]:,}; "
        "update the header comment (or the preset) so they agree")
    assert text.lstrip().startswith("#") and "model:" in text


def test_proxy_family_keeps_head_dim_64_and_the_aspect_ratio():
    for path in PRESETS:
        if path.stem.startswith("proxy_"):
            m = config.from_dict({"model": path.stem}).model
            assert m.resolved_head_dim == 64 and m.d_model // m.n_layers == 128, path.stem
            assert m.d_model == int(path.stem.split("_")[1])


def test_gpt2_small_is_124m():
    m = config.from_dict({"model": "gpt2_small"}).model
    assert models.param_count(m) == 124_439_808  # Hugging Face's count for gpt2


def test_runnable_tiny_config_loads():
    cfg = config.load(CONFIGS / "tiny.yaml")
    assert cfg.model.d_model == 64 and cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.run.steps == 200 and cfg.data.source == "stdlib"
