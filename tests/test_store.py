"""Large-model runs keep their weights on disk (onnxopt.store).

``ONNXOPT_SPILL_BYTES=0`` puts every run in that mode, so the sample models exercise it:
the results must be byte-identical to an in-memory run, the models the run holds must
be light, and the store must clean up after itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT, model_path, run, seeded_feeds
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.check import structural_checks
from onnxopt.model import load_model, save_model
from onnxopt.pipeline import Pass, PassResult, option, register_pass, unregister_pass
from onnxopt.store import FOLDER_PREFIX, WeightStore, remove_orphaned_stores, spill_threshold
from onnxopt.stored import has_stored, inline_stored, stored_path
from onnxopt.wire import proto_nbytes, serialize, write_serialized

DATA = str(MODELS / "digits_test.npz")
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture
def spill(monkeypatch):
    monkeypatch.setenv("ONNXOPT_SPILL_BYTES", "0")


def _optimize(model, pipeline, **kwargs):
    kwargs.setdefault("data", DATA)
    kwargs.setdefault("validation_samples", 16)
    kwargs.setdefault("calibration_samples", 16)
    return onnxopt.optimize(model, pipeline, **kwargs)


CASES = [
    ("digits_cnn", "fold-batchnorm,cleanup,prune-initializers(sparsity=0.5)"),
    ("digits_mlp", "quantize-int8"),
    ("digits_mlp", "prune-initializers(sparsity=0.8,store=sparse)"),
    ("digits_mlp", "share-weights(bits=4,upgrade_opset=true)"),
    ("digits_transformer", "remove-neurons(ratio=0.5)"),
    ("digits_mlp_op11_constants", "fold-constants,prune-initializers(sparsity=0.5)"),
    ("digits_cnn", "quantize-int4(op_types=[Gemm])"),  # conv int4 leaves mostly <1 KB tensors
]


@pytest.mark.parametrize("name,pipeline", CASES)
def test_disk_backed_run_writes_the_same_bytes(name, pipeline, tmp_path, monkeypatch):
    monkeypatch.delenv("ONNXOPT_SPILL_BYTES", raising=False)
    memory = _optimize(model_path(name), pipeline, budget="none")
    assert memory.outcome.store is None
    memory.save(tmp_path / "memory.onnx")
    monkeypatch.setenv("ONNXOPT_SPILL_BYTES", "0")
    disk = _optimize(model_path(name), pipeline, budget="none")
    store = disk.outcome.store
    assert store is not None and store.folder.is_dir()
    assert [s["status"] for s in disk.steps] == [s["status"] for s in memory.steps]
    assert "accepted" in [s["status"] for s in disk.steps]
    # the run's result is light: its weights are stubs into the store (sparse
    # initializers stay in the proto: they are what makes the file small)
    if "sparse" not in pipeline:
        assert has_stored(disk.outcome.model)
        assert disk.outcome.model.ByteSize() < proto_nbytes(disk.outcome.model) / 2
    assert proto_nbytes(disk.outcome.model) == len(serialize(disk.model))
    disk.save(tmp_path / "disk.onnx")
    assert (tmp_path / "disk.onnx").read_bytes() == (tmp_path / "memory.onnx").read_bytes()
    # and with external data: the same data file, streamed from the store
    for result, sub in ((memory, "m"), (disk, "d")):
        (tmp_path / sub).mkdir()
        result.save(tmp_path / sub / "x.onnx", external_data=True)
    m_files = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    assert len(m_files) == 2
    assert m_files == {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    folder = store.folder
    disk.close()
    assert not folder.exists()
    assert disk.model is not None  # read into memory before close: still usable


def test_steps_see_light_models_and_run_the_checker_by_path(spill):
    seen = {}

    class Probe(Pass):
        name = "test-probe"
        summary = "record what a pass is given"
        lossless = True

        def run(self, graph, ctx):
            seen["template"] = ctx.template.ByteSize()
            seen["stored"] = has_stored(ctx.template)
            weight = next(t for t in graph.tensors().values() if t.name == "fc1.weight")
            seen["lazy"] = type(weight._values).__name__
            seen["loaded"] = weight.values.shape
            weight.values = weight.values.copy()  # an unchanged copy: lossless
            candidate = ctx.to_model(graph)
            seen["checks"] = structural_checks(candidate)[0].failures
            return PassResult(changed=True)

    register_pass(Probe)
    try:
        result = _optimize(model_path("digits_mlp"), "test-probe")
    finally:
        unregister_pass("test-probe")
    assert result.steps[0]["status"] == "accepted"
    assert seen["stored"] and seen["template"] < 4000  # the MLP's weights are 69 KB
    assert seen["lazy"] == "StoredValues" and seen["loaded"] == (128, 64)
    assert seen["checks"] == {}
    result.close()


class Corrupt(Pass):
    """Writes into loaded weights in place, then makes a budget-breaking change."""

    name = "test-corrupt"
    summary = "in-place write then noise"

    @dataclass
    class Options:
        scale: float = option(10.0, "noise scale")

    def run(self, graph, ctx):
        for tensor in graph.tensors().values():
            if tensor.name.endswith("weight"):
                tensor.values[...] = 0.0  # must not leak into the store's files
                tensor.values = tensor.values + np.float32(self.options.scale)
        return PassResult(changed=True)


def test_rolled_back_step_leaves_neither_changes_nor_files(spill):
    register_pass(Corrupt)
    try:
        result = _optimize(
            model_path("digits_mlp"), "prune-initializers(sparsity=0.5),test-corrupt"
        )
    finally:
        unregister_pass("test-corrupt")
    assert [s["status"] for s in result.steps] == ["accepted", "rolled back"]
    store = result.outcome.store
    referenced = {
        stored_path(t).name for t in result.outcome.model.graph.initializer if stored_path(t)
    }
    # what is left: the original's weights (passes may read ctx.original) and the
    # accepted prune step's; the rolled-back candidate's data file is gone
    assert referenced < store.files() and len(store.files()) == 2
    assert {p.name for p in store.folder.iterdir()} == store.files()
    expected = _optimize(model_path("digits_mlp"), "prune-initializers(sparsity=0.5)")
    feeds = seeded_feeds(result.model, 8)
    np.testing.assert_array_equal(
        run(result.model, feeds)[0]["logits"], run(expected.model, feeds)[0]["logits"]
    )
    result.close()
    expected.close()


def _external_copy(tmp_path, name="digits_mlp"):
    folder = tmp_path / "in"
    folder.mkdir()
    path = save_model(onnx.load(str(model_path(name))), folder / "m.onnx", external_data=True)
    return path, {p.name: p.read_bytes() for p in folder.iterdir()}


def test_large_external_model_is_not_loaded_into_memory(tmp_path, spill):
    path, before = _external_copy(tmp_path)
    loaded = load_model(path, lazy_over=spill_threshold())
    assert loaded.lazy
    stubs = [t for t in loaded.proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(stubs) >= 2 and not any(t.raw_data for t in stubs)
    eager = load_model(path)
    assert not eager.lazy and not has_stored(eager.proto)
    result = _optimize(path, "prune-initializers(sparsity=0.5)")
    reference = _optimize(model_path("digits_mlp"), "prune-initializers(sparsity=0.5)")
    assert serialize(result.model) == serialize(reference.model)
    # the input and its data file are untouched
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before
    result.close()


def test_in_memory_model_is_copied_not_modified(spill):
    model = onnx.load(str(model_path("digits_cnn")))
    snapshot = model.SerializeToString()
    result = _optimize(model, "fold-batchnorm,prune-initializers(sparsity=0.5)")
    assert model.SerializeToString() == snapshot
    assert result.outcome.store is not None
    result.close()


def test_exact_size_of_a_model_with_stored_weights(tmp_path):
    store = WeightStore(tmp_path)
    rng = np.random.default_rng(0)
    model = onnx.load(str(model_path("digits_transformer")))
    model.graph.initializer.append(
        numpy_helper.from_array(rng.standard_normal((300, 5)).astype(np.float16), "extra16")
    )
    model.graph.initializer[-1].doc_string = "a documented tensor"
    light = store.adopt(model)
    assert has_stored(light)
    assert proto_nbytes(light) == model.ByteSize() == len(serialize(light))
    assert inline_stored(light) == model
    # a single-file save streams the stored bytes into the same serialization
    write_serialized(light, tmp_path / "streamed.onnx")
    assert (tmp_path / "streamed.onnx").read_bytes() == model.SerializeToString()
    store.close()
    assert not store.folder.exists()


def test_uint4_and_float16_round_trip_through_the_store(tmp_path):
    store = WeightStore(tmp_path)
    values = np.arange(4096, dtype=np.uint8) % 16
    u4 = helper.make_tensor("u4", TensorProto.UINT4, [4096], values.tolist())
    f16 = numpy_helper.from_array(np.linspace(-1, 1, 2048, dtype=np.float16), "f16")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["u4"], ["a"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["f16"], ["b"], to=TensorProto.FLOAT),
        ],
        "g",
        [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "ab"],
        [u4, f16],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    light = store.adopt(model)
    assert all(stored_path(t) for t in light.graph.initializer)
    from onnxopt.graph import to_graph

    tensors = to_graph(light).tensors()
    np.testing.assert_array_equal(tensors["f16"].values, numpy_helper.to_array(f16))
    np.testing.assert_array_equal(
        np.asarray(tensors["u4"].values, dtype=np.uint8), numpy_helper.to_array(u4).astype(np.uint8)
    )
    out = run(light, [{}])[0]
    np.testing.assert_array_equal(out["a"], values.astype(np.float32))
    store.close()


def test_folders_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = tmp_path / f"{FOLDER_PREFIX}{dead.stdout.strip()}-abcd"
    orphan.mkdir()
    (orphan / "x.data").write_bytes(b"1")
    alive = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-efgh"
    alive.mkdir()
    remove_orphaned_stores(tmp_path)
    assert not orphan.exists() and alive.exists()


def test_bad_spill_setting_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("ONNXOPT_SPILL_BYTES", "lots")
    with pytest.raises(onnxopt.UsageError, match="ONNXOPT_SPILL_BYTES"):
        _optimize(model_path("digits_mlp"), "cleanup")


MEMORY_SCRIPT = """
import sys
import onnxopt

def high_water():  # VmHWM: this process's peak RSS since the last reset
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0]) * 1024

# ru_maxrss would include the pytest process the child was forked from: reset instead
open("/proc/self/clear_refs", "w").write("5")
before = high_water()
result = onnxopt.optimize(sys.argv[1], sys.argv[2], shapes=["input=1x4096"],
                          validation_samples=2, calibration_samples=2, budget="none")
result.save(sys.argv[3])  # one file, streamed from the store
print(before, high_water())
"""


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["cleanup,prune-initializers(sparsity=0.5,reconstruct=false)"])
def test_peak_memory_of_a_512_mb_model(tmp_path, pipeline):
    """Above the spill threshold, peak RSS stays near one copy of the weights."""
    import make_large_model  # tools/: the model of docs/large-models.md, smaller

    path = tmp_path / "big.onnx"
    size = make_large_model.build(path, layers=8, width=4096, seed=0)
    env = {**os.environ, "ONNXOPT_SPILL_BYTES": str(256 * 2**20)}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), pipeline, str(tmp_path / "out.onnx")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    start, peak = (int(x) for x in done.stdout.split()[-2:])
    assert peak - start < 1.6 * size, (peak, start, size)
    assert peak < 2.5 * size


def test_inspect_reads_large_external_weights_lazily(tmp_path, monkeypatch):
    from onnxopt.inspection import describe

    path, _ = _external_copy(tmp_path, "digits_cnn")
    eager = describe(path)
    monkeypatch.setenv("ONNXOPT_SPILL_BYTES", "0")
    lazy = describe(path)
    assert load_model(path, lazy_over=0).lazy
    assert lazy["weights"] == eager["weights"] and len(lazy["weights"]) >= 8
    assert lazy["params"] == eager["params"] == 12778
    assert lazy["compressed_bytes"] is None


def test_to_model_leaves_its_graph_alone_and_spills_only_into_the_given_store(tmp_path):
    import onnx_graphsurgeon as gs

    from onnxopt.graph import to_graph, to_model

    model = onnx.load(str(model_path("digits_mlp")))
    graph = to_graph(model)
    weight = graph.tensors()["fc1.weight"]
    assert isinstance(weight, gs.Constant)
    weight.values = weight.values * 2  # a new array: a store-backed export writes it out
    kept = weight._values
    in_memory = to_model(graph, model)  # no store given: nothing goes to disk
    assert not has_stored(in_memory)
    store = WeightStore(tmp_path)
    try:
        light = to_model(graph, model, store)
        assert stored_path(next(t for t in light.graph.initializer if t.name == "fc1.weight"))
        assert weight._values is kept  # the caller's graph still holds its array
        np.testing.assert_array_equal(
            numpy_helper.to_array(inline_stored(light).graph.initializer[0]),
            numpy_helper.to_array(in_memory.graph.initializer[0]),
        )
    finally:
        store.close()
