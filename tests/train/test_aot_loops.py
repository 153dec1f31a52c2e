"""FLOPs with every loop iteration counted (seismo.train.aot.loop_cost / cost_for_compiled).

XLA's cost analysis counts a while loop's body once; a scanned layer stack then reads as
about one layer. These tests hold the counted-in-full numbers to programs without loops that
do the same arithmetic: a scan against the same scan unrolled, nested scans against their
trip counts, seismo's scanned step against its unrolled step, and the trip count that the TPU
compiler does not record, read off the loop condition of a loop in the shape it leaves them.
"""


import jax
import jax.numpy as jnp
import pytest

from seismo import config
from seismo.train import aot, engine
from seismo.train import mesh as mesh_lib


def _scan_grad(unroll):
    def f(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w, unroll=unroll)[0].sum()

    x, w = jnp.ones((8, 16)), jnp.ones((3, 16, 16))
    return jax.jit(jax.grad(f)).lower(x, w).compile()


def test_a_scan_counts_as_its_unrolled_twin():
    looped, unrolled = _scan_grad(1), _scan_grad(True)
    flat = unrolled.cost_analysis()
    flat = flat[0] if isinstance(flat, list) else flat
    got = aot.cost_for_compiled(looped)
    assert got["loops_counted"] and got["loop_trips"] == [3, 3]  # forward scan and its transpose
    assert got["flops_once"] < 0.4 * flat["flops"]  # XLA's own count: each body once
    assert got["flops"] == pytest.approx(flat["flops"], rel=0.02)
    assert aot.cost_for_compiled(unrolled)["flops"] == flat["flops"]  # no loop: XLA's count as it is


def test_nested_loops_multiply():
    x, w = jnp.ones((8, 16)), jnp.ones((3, 16, 16))

    def inner(c):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), c, w)[0]

    one = jax.jit(inner).lower(x).compile()
    nested = jax.jit(lambda c: jax.lax.scan(lambda c, _: (inner(c), None), c, None, length=5)[0]).lower(x).compile()
    one_full = aot.cost_for_compiled(one)["flops"]
    got = aot.cost_for_compiled(nested)
    assert got["loop_trips"] == [5]
    assert got["flops"] == pytest.approx(5 * one_full, rel=0.01)


# A loop in the form the TPU compiler leaves it (no known_trip_count; the counter starts as a
# copy of a constant): 4 iterations of an [8, 8] matmul (2 * 8^3 = 1024 FLOPs each).
TPU_SHAPED = """HloModule loop, is_scheduled=true

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %x = f32[8,8]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %y = f32[8,8]{1,0:T(8,128)} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}) tuple(%next, %y)
}

%cond (p: (s32[], f32[8,8])) -> pred[] {
  %n = s32[]{:T(128)} constant(4)
  %p = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT, metadata={op_name="while/cond/lt" stack_frame_id=3}
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8]{1,0:T(8,128)} parameter(0)
  %zero = s32[]{:T(128)} constant(0)
  %start = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}) tuple(%start, %x)
  %w = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,8]{1,0:T(8,128)} get-tuple-element(%w), index=1
}
"""


def test_trip_count_from_the_loop_condition():
    hlo = aot._Hlo.parse(TPU_SHAPED)
    assert hlo.entry == "%main" and hlo.loops("%main") == [("%body", 4)]
    got = aot.loop_cost(TPU_SHAPED)
    assert got["flops_once"] == pytest.approx(1024, abs=8) and got["flops"] == pytest.approx(4 * 1024, abs=32)
    other_start = TPU_SHAPED.replace("%zero = s32[]{:T(128)} constant(0)", "%zero = s32[]{:T(128)} constant(1)")
    assert aot._Hlo.parse(other_start).loops("%main") == [("%body", 3)]
    unknown = TPU_SHAPED.replace("copy(%zero)", "parameter(1)")  # a counter that is not a constant
    assert aot._Hlo.parse(unknown).loops("%main") == [("%body", None)]


MICRO = ["model.d_model=32", "model.n_heads=2", "model.max_seq_len=16", "data.batch_size=8",
         "data.seq_len=16", "optimizer.warmup_steps=2", "run.steps=10"]


def _report(*extra):
    cfg = config.load(None, [*MICRO, *extra])
    return aot.compile_for_devices(cfg, jax.devices()[:1])


def test_scanned_step_counts_every_layer():
    scanned = _report("model.n_layers=4", "model.scan_layers=true", "model.scan_unroll=1")
    unrolled = _report("model.n_layers=4", "model.scan_layers=false")
    s, u = scanned["steps"]["train"], unrolled["steps"]["train"]
    assert s["loop_trips"] == [4, 4] and u["loop_trips"] == []
    assert s["flops_once"] < 0.5 * u["flops"]  # XLA's own count: about one layer
    # the same arithmetic; the unrolled program's fusions repeat some elementwise work (4% here)
    assert s["flops"] == pytest.approx(u["flops"], rel=0.06)
    assert scanned["flops_note"] is None
    # the model FLOPs (PaLM count: matmuls only) stay below XLA's count, which adds the rest
    assert 0.8 * s["flops"] < scanned["model_flops_per_step"] < s["flops"]


def test_microbatches_count_in_full():
    whole = _report("model.n_layers=2", "model.scan_layers=true", "model.scan_unroll=1")["steps"]["train"]
    split = _report("model.n_layers=2", "model.scan_layers=true", "model.scan_unroll=1",
                    "optimizer.grad_accum_steps=4")["steps"]["train"]
    assert split["loop_trips"] == [4]  # the microbatch scan, with the layer scans inside it
    assert split["flops_once"] < 0.5 * whole["flops"]
    assert split["flops"] == pytest.approx(whole["flops"], rel=0.02)


def test_engine_steps_on_cpu_report_the_counted_flops():
    cfg = config.load(None, [*MICRO, "model.n_layers=3", "model.scan_unroll=1", "run.probe_every=2"])
    built = engine.build(cfg, mesh_lib.make_mesh(cfg.mesh))
    for name, (fn, args) in built.lowerable().items():
        got = aot.compile_one(fn, args)
        assert got["loops_counted"] and got["loop_trips"] and got["flops"] > 2 * got["flops_once"], name


@pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu is not installed: compiling for a TPU topology needs it")
def test_tpu_step_counts_every_layer():
    cfg = lambda scan: config.load(None, [*MICRO, "model.n_layers=4", f"model.scan_layers={scan}", "model.scan_unroll=1"])
    scanned = aot.compile_for_topology(cfg("true"), "v5e:2x2")["steps"]["train"]
    unrolled = aot.compile_for_topology(cfg("false"), "v5e:2x2")["steps"]["train"]
    assert scanned["loop_trips"] == [4, 4]  # read off the loop conditions: the TPU compiler records none
    assert scanned["flops_once"] < 0.5 * unrolled["flops"]
    assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.06)
