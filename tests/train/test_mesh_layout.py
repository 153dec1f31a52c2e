"""Mesh layouts (seismo.train.mesh.device_layout): jax's physical layout, split physical axes,
multislice (hybrid) meshes with DCN axes, and a fallback to device order that warns and is
recorded in config.yaml.

The layout logic runs everywhere on stand-in devices (objects with a TPU's attributes: id,
coords, slice_index, process_index); the libtpu tests check the device order for real TPU
topologies (compile-only devices from `jax.experimental.topologies`) and compile a step on one,
and skip where libtpu is absent (CI's venv)."""

import dataclasses
import warnings

import numpy as np
import pytest

from seismo import config
from seismo.config import ConfigError, MeshConfig
from seismo.train import aot
from seismo.train import mesh as mesh_lib

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (CI's venv): real TPU topologies need the TPU compiler; "
           "run in a venv with `pip install -e '.[tpu]'` to include these")


@dataclasses.dataclass(frozen=True, eq=False)
class FakeTpu:
    """What jax's mesh_utils reads off a TPU device."""

    id: int
    coords: tuple
    process_index: int = 0
    slice_index: int | None = None
    platform: str = "tpu"
    device_kind: str = "TPU v5 lite"
    core_on_chip: int = 0


def grid(nx, ny, slices=1):
    """`slices` slices of nx x ny chips; hosts of 2 x 2 chips; devices listed host by host."""
    out = []
    for s in range(slices):
        chips = [(x, y) for y in range(ny) for x in range(nx)]
        chips.sort(key=lambda c: (c[1] // 2, c[0] // 2, c[1], c[0]))  # host-major, as libtpu numbers them
        for x, y in chips:
            host = s * 100 + (y // 2) * (nx // 2) + x // 2
            out.append(FakeTpu(len(out), (x, y, 0), host, s if slices > 1 else None))
    return out


def groups(arr, axis):
    """The device groups along mesh axis `axis` (each group: the devices that differ only there)."""
    moved = np.moveaxis(arr, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def is_block(devs):
    """Whether devices occupy a whole sub-grid of their slice (the product of the coordinate
    values they use along each physical axis is their number): a ring or rectangle on the torus."""
    coords = np.array([d.coords for d in devs])
    return int(np.prod([len(set(c)) for c in coords.T])) == len(devs) and len({getattr(d, "slice_index", None) for d in devs}) == 1


def cfg(data, fsdp, tensor, **kw):
    return MeshConfig(data=data, fsdp=fsdp, tensor=tensor, **kw)


# --------------------------------------------------------------------------- stand-in devices


def test_physical_layout_when_the_sizes_match_the_torus():
    arr, layout = mesh_lib.device_layout(cfg(4, 4, 1), grid(4, 4))
    assert layout == mesh_lib.Layout("physical") and arr.shape == (4, 4, 1)
    assert all(is_block(g) for axis in (0, 1) for g in groups(arr, axis))


@pytest.mark.parametrize("shape", [(2, 8, 1), (4, 2, 2)])
def test_split_layout_when_an_axis_needs_part_of_a_physical_axis(shape):
    arr, layout = mesh_lib.device_layout(cfg(*shape), grid(4, 4))
    assert layout.layout == "split" and layout.note is None and arr.shape == shape
    assert all(is_block(g) for axis in range(3) for g in groups(arr, axis))
    with pytest.raises(ConfigError, match="mesh.layout=physical: jax has no such layout.*use mesh.layout=split"):
        mesh_lib.device_layout(cfg(*shape, layout="physical"), grid(4, 4))


def test_multislice_is_hybrid_with_the_data_axis_over_slices():
    devs = grid(2, 2, slices=2)
    arr, layout = mesh_lib.device_layout(cfg(-1, 2, 1), devs)  # no dcn_* given: data spans the slices
    assert layout == mesh_lib.Layout("physical", (2, 1, 1)) and arr.shape == (4, 2, 1)
    assert [d.slice_index for d in arr[:, 0, 0]] == [0, 0, 1, 1]  # the outer part of data is the slice
    assert all(is_block(g) for g in groups(arr, 1))  # fsdp groups stay within a slice, on neighbours
    assert layout.resolve(cfg(-1, 2, 1)).dcn_data == 2
    # fsdp across slices when asked for
    arr, layout = mesh_lib.device_layout(cfg(2, 4, 1, dcn_fsdp=2), devs)
    assert layout.dcn == (1, 2, 1) and [d.slice_index for d in arr[0, :, 0]] == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="dcn_data\\*dcn_fsdp\\*dcn_tensor = 4 but the job has 2 slices"):
        mesh_lib.device_layout(cfg(4, 2, 1, dcn_data=4), devs)
    with pytest.raises(ConfigError, match="tensor=1 cannot span 2 slices"):
        mesh_lib.device_layout(cfg(8, 1, 1, dcn_tensor=2), devs)


def test_processes_are_the_dcn_units_when_devices_name_no_slice():
    devs = [FakeTpu(i, (i, 0, 0), process_index=i // 4, platform="gpu", device_kind="NVIDIA H100") for i in range(8)]
    arr, layout = mesh_lib.device_layout(cfg(4, 2, 1, dcn_data=2), devs)
    assert layout.dcn == (2, 1, 1) and [d.process_index for d in arr[:, 0, 0]] == [0, 0, 1, 1]


def test_fallback_warns_and_says_why():
    odd = [FakeTpu(i, c) for i, c in enumerate([(0, 0, 0), (2, 0, 0), (0, 2, 0), (2, 2, 0)])]  # chips with gaps
    arr, layout = mesh_lib.device_layout(cfg(-1, 1, 1), odd)
    assert layout.layout == "fallback" and [d.id for d in arr.reshape(-1)] == [0, 1, 2, 3]
    assert "no physical layout" in layout.note and "mesh.layout: fallback" in layout.note
    assert layout.resolve(MeshConfig()).layout == "fallback"
    # asked for by name: device order, nothing to warn about
    arr, layout = mesh_lib.device_layout(cfg(2, 2, 1, layout="fallback"), grid(2, 2))
    assert layout == mesh_lib.Layout("fallback") and [d.id for d in arr.reshape(-1)] == [0, 1, 2, 3]


def test_make_mesh_warns_on_a_fallback(monkeypatch):
    import jax

    def refuse(*a, **k):
        raise NotImplementedError("no layout")

    monkeypatch.setattr(mesh_lib, "_arrange", refuse)
    with pytest.warns(mesh_lib.MeshFallbackWarning, match="no layout"):
        mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mesh_lib.make_mesh(MeshConfig(layout="fallback"), jax.devices())  # asked for: no warning


def test_a_training_run_records_a_fallback(tmp_path, monkeypatch, capsys):
    """A fallback is in config.yaml, a warning row and a line on stderr (a layout jax made is
    recorded too: tests/train/test_loop.py::test_run_directory_is_complete)."""
    import json

    from seismo.train.loop import train

    over = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16", "data.batch_size=2",
            "data.seq_len=8", "data.eval_sequences=2", "optimizer.warmup_steps=1", "run.steps=2",
            "run.progress=off", "run.checkpoint_async=false"]

    def refuse(*a, **k):
        raise NotImplementedError("no layout for these devices")

    monkeypatch.setattr(mesh_lib, "_arrange", refuse)
    train(config.load(None, over), tmp_path / "b")
    assert config.load(tmp_path / "b" / "config.yaml").mesh.layout == "fallback"
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    (warning,) = [r for r in rows if r.get("kind") == "warning"]
    assert "no layout for these devices" in warning["warning"] and warning["step"] == 0
    assert "mesh.layout: fallback" in capsys.readouterr().err


# --------------------------------------------------------------------------- real TPU topologies (libtpu)


TINY_STEP = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16", "data.batch_size=8",
             "data.seq_len=16", "optimizer.warmup_steps=1", "run.steps=2"]


def _jax_layout(shape, devs, split):
    from jax.experimental import mesh_utils

    return mesh_utils.create_device_mesh(shape, devs, allow_split_physical_axes=split)


@needs_libtpu
@pytest.mark.parametrize("topology, shape", [("v5e:8x8", (16, 4, 1)), ("v5e:4x4", (2, 8, 1)),
                                             ("v5e:4x4", (4, 2, 2))])
def test_split_layouts_on_tpu_topologies(topology, shape):
    """The cases the old reshape fallback fired on: now jax's split layout, in its device order."""
    devs = aot.topology_devices(topology)
    with pytest.raises(NotImplementedError):
        _jax_layout(shape, devs, split=False)
    arr, layout = mesh_lib.device_layout(cfg(*shape), devs)
    assert layout.layout == "split" and layout.note is None
    assert [d.id for d in arr.reshape(-1)] == [d.id for d in _jax_layout(shape, devs, True).reshape(-1)]
    assert [d.id for d in arr.reshape(-1)] != [d.id for d in devs]  # not the device order a fallback takes
    for axis in range(3):
        assert all(is_block(g) for g in groups(arr, axis)), (topology, shape, axis)
    if shape == (4, 2, 2):  # and the real train step compiles on that layout (data, fsdp and tensor all > 1)
        report = aot.compile_for_topology(config.load(None, TINY_STEP), topology, probes=False,
                                          mesh=dict(zip(("data", "fsdp", "tensor"), shape)))
        assert report["mesh_layout"] == "split" and report["mesh"] == {"data": 4, "fsdp": 2, "tensor": 2}
        assert report["fits"] and report["steps"]["train"]["compiled"]


@needs_libtpu
def test_multislice_layout_on_tpu_topologies_compiles():
    """Two v5e:2x2 slices: create_hybrid_device_mesh, data over DCN, fsdp within each slice's
    torus; the real train step compiles on it."""
    devs = aot.topology_devices("v5e:2x2", num_slices=2)
    arr, layout = mesh_lib.device_layout(cfg(-1, 2, 1), devs)
    assert layout == mesh_lib.Layout("physical", (2, 1, 1))
    assert [d.slice_index for d in arr[:, 0, 0]] == [0, 0, 1, 1]
    for s in (0, 1):
        part = arr[2 * s:2 * s + 2]
        ref = _jax_layout((2, 2, 1), [d for d in devs if d.slice_index == s], False)
        assert [d.id for d in part.reshape(-1)] == [d.id for d in ref.reshape(-1)]
    assert all(is_block(g) for g in groups(arr, 1))
    tiny = config.load(None, TINY_STEP + ["mesh.fsdp=2"])
    report = aot.compile_for_topology(tiny, "v5e:2x2", num_slices=2, probes=False)
    assert report["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1} and report["mesh_layout"] == "physical"
    assert report["mesh_dcn"] == [2, 1, 1] and report["steps"]["train"]["compiled"]
