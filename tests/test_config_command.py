"""`seismo config CONFIG --set ...`: the resolved config as config.yaml would record it, the
parameter count (checked against a count by hand and against the initialised param tree),
exit 0 with nothing written; bad input is one line and exit 2."""

import math

import jax
import jax.numpy as jnp
import yaml

from seismo import cli, config, models


def by_hand(d: int, n_layers: int, vocab: int = 256, d_ff: int | None = None) -> tuple[int, int]:
    """The tiny family's parameters counted by hand: untied token embedding and head (V x d
    each), per block q, k, v, o (d x d), the MLP (d x 4d, 4d x d) and two layernorm scales,
    no biases, RoPE (no position table), the final norm's scale. (total, non-embedding)."""
    f = d_ff or 4 * d
    body = n_layers * (4 * d * d + 2 * d * f + 2 * d) + d
    return body + 2 * vocab * d, body


def test_prints_the_resolved_config_and_the_parameter_count(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder stays empty
    overrides = ["model.n_layers=3", "model=tiny", "optimizer.lr=3e-3", "run.trackers=[jsonl, tensorboard]"]
    args = ["config", str(config.find_file("tiny"))] + [a for o in overrides for a in ("--set", o)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    want = models.resolve_attention(config.load("tiny", overrides))
    assert printed["model"] == config.to_dict(want.model)  # n_layers 3: the preset switch applies first
    assert printed["model"]["n_layers"] == 3 and printed["model"]["attention_impl"] == "explicit"
    assert printed["optimizer"]["lr"] == 3e-3 and printed["run"]["trackers"] == ["jsonl", "tensorboard"]
    (tmp_path / "printed.yaml").write_text(out)  # the YAML reads back as the same config
    assert config.load(tmp_path / "printed.yaml").model == want.model
    count = out.strip().splitlines()[-1]
    total, body = by_hand(64, 3)
    assert count.startswith("# parameters: ") and f"{total:,} ({body:,} non-embedding" in count, count
    params = jax.eval_shape(models.build(want.model).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == total  # the initialised tree
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]


def test_bad_input_is_one_line_and_exit_2(capsys):
    for overrides, words in [(["model.n_layer=3"], "Did you mean 'model.n_layers'"),
                             (["run.trackers=[tensorbord]"], "did you mean 'tensorboard'"),
                             (["model.activation=softsign"], "softsign")]:
        rc = cli.main(["config", "tiny", *(a for o in overrides for a in ("--set", o))])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("seismo config: ") and words in err[0], err
